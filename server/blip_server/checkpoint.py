"""Reading a HuggingFace BLIP captioning checkpoint: the model, its image processor and its tokenizer.

Everything model-specific (sizes, special token ids, vocabulary, normalisation) is read from the checkpoint's
own files here; nothing downstream hard-codes it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from blip_server.errors import ExportError
from blip_server.shared.generation_options import OPTIONS

_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _three(value, name: str) -> list[float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ExportError(f"{name} must have 3 values (RGB); the checkpoint has {values}")
    return values


def image_settings(image_processor, vision_image_size: int) -> dict:
    """A transformers BLIP image processor, resolved into the fields of the `preprocess` model's
    ImageProcessorConfig (its `image_processor.json`); refuses what BLIP captioning does not do."""
    for flag in ("do_center_crop", "do_pad"):
        if getattr(image_processor, flag, None):
            raise ExportError(f"the image processor sets {flag}, which BLIP captioning does not use")
    if not image_processor.do_resize:
        raise ExportError("the image processor does not resize; the vision encoder needs a fixed input size")
    size = image_processor.size
    height, width = getattr(size, "height", None), getattr(size, "width", None)
    if not height or not width:
        raise ExportError(f"the image processor's size must give height and width; it is {size}")
    if (height, width) != (vision_image_size, vision_image_size):
        raise ExportError(
            f"the image processor resizes to {height}x{width} but the vision model expects "
            f"{vision_image_size}x{vision_image_size}"
        )
    return {
        "height": int(height),
        "width": int(width),
        "resample": int(image_processor.resample),
        "do_convert_rgb": bool(getattr(image_processor, "do_convert_rgb", False)),
        "do_resize": True,
        "do_rescale": bool(image_processor.do_rescale),
        "rescale_factor": float(image_processor.rescale_factor),
        "do_normalize": bool(image_processor.do_normalize),
        "image_mean": _three(image_processor.image_mean, "image_mean"),
        "image_std": _three(image_processor.image_std, "image_std"),
    }


def decoder_config(text_config) -> dict:
    """What the serving decoder needs from the checkpoint's text config (BLIP generate stops at SEP)."""
    return {
        "vocab_size": text_config.vocab_size,
        "hidden_size": text_config.hidden_size,
        "num_hidden_layers": text_config.num_hidden_layers,
        "num_attention_heads": text_config.num_attention_heads,
        "intermediate_size": text_config.intermediate_size,
        "max_position_embeddings": text_config.max_position_embeddings,
        "layer_norm_eps": text_config.layer_norm_eps,
        "hidden_act": text_config.hidden_act,
        "encoder_hidden_size": text_config.encoder_hidden_size,
        "bos_token_id": text_config.bos_token_id,
        "eos_token_id": text_config.sep_token_id,
        "pad_token_id": text_config.pad_token_id,
    }


# generation_config.json keys the service honours: the options of the same names that a checkpoint may set (all
# but the seed, transformers' stopping rule included), and lengths counted in total tokens (prompt included), which
# preprocess turns into new tokens.
GENERATION_OPTIONS = tuple(o.name for o in OPTIONS if o.from_checkpoint)
GENERATION_LENGTHS = ("max_length", "min_length")
# Keys that say nothing about how to generate (token ids come from the model's config; BLIP's generate passes its
# own), or only about what generate() returns.
_GENERATION_IGNORED = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id",
                       "transformers_version", "_from_model_config", "use_cache", "return_dict_in_generate",
                       "output_scores", "output_logits", "output_attentions", "output_hidden_states")


def generation_settings(directory: Path) -> dict:
    """The generation settings a checkpoint's generation_config.json holds ({} without one).

    Refuses a file that sets what the service does not implement (typical_p, diversity penalties, forced or
    suppressed tokens, ...): captions would silently differ from transformers'."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return {}
    from transformers import GenerationConfig

    settings = json.loads(path.read_text())
    defaults = GenerationConfig().to_dict()
    unsupported = sorted(key for key, value in settings.items()
                         if key not in GENERATION_OPTIONS + GENERATION_LENGTHS + _GENERATION_IGNORED
                         and value != defaults.get(key))
    if unsupported:
        raise ExportError(f"{path} sets {', '.join(f'{k}={settings[k]!r}' for k in unsupported)}, which the service "
                          "does not implement")
    return {key: settings[key] for key in GENERATION_OPTIONS + GENERATION_LENGTHS
            if key in settings and settings[key] is not None}


def check_layout(directory: Path) -> None:
    """Clear errors for a directory that is not a BLIP captioning checkpoint."""
    if not directory.is_dir():
        raise ExportError(f"{directory} is not a directory")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{directory} has no config.json: not a HuggingFace checkpoint")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "blip":
        raise ExportError(f"{directory} holds a {config.get('model_type')!r} model, not a BLIP one")
    architectures = config.get("architectures") or ["BlipForConditionalGeneration"]
    if "BlipForConditionalGeneration" not in architectures:
        raise ExportError(f"{directory} is a {architectures[0]}, not a BLIP captioning model")
    if not any((directory / name).is_file() for name in _PROCESSOR_FILES):
        raise ExportError(f"{directory} has no image processor config ({' or '.join(_PROCESSOR_FILES)})")
    if not any((directory / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json",
                                                         "pytorch_model.bin")):
        raise ExportError(f"{directory} has no weights (model.safetensors or pytorch_model.bin)")


def content_digest(directory: Path) -> str:
    """sha256 over every file of the checkpoint (relative path and bytes), hidden folders excluded."""
    digest = hashlib.sha256()
    files = sorted(
        p for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    for path in files:
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        with path.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()
