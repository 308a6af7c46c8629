"""Randomly initialised BLIP captioning checkpoints in HuggingFace format, for tests and benchmarks.

No machine here can download real weights, and inference cost does not depend on weight values when the
caption length is fixed, so tests and benchmarks build their own checkpoints:

- `tiny`: small dimensions, fast enough for unit and integration tests;
- `base` / `large`: the exact architectures of `Salesforce/blip-image-captioning-base` / `-large`.

Decoder weights are drawn wider than transformers' default initialisation so that next-token distributions
are peaked (captions do not hinge on near-ties), and the end-of-caption token gets a bias so that captions
end at varied lengths. Vision weights are drawn with a ViT's usual spread (BLIP's vision config initialises
them with a standard deviation of 1e-10, which makes every image encode to nearly the same embeddings): the
image must matter to the caption, and numerical checks of the encoder (fp16, int8) must see real signal.

    python -m blip_demo.random_checkpoint --preset large --output /tmp/blip-large-random
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

_WORDS = [
    "a", "an", "the", "of", "and", "with", "on", "in", "at", "near", "to", "from", "by", "two", "three", "small",
    "large", "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "circle", "square", "triangle",
    "picture", "photo", "image", "dog", "cat", "man", "woman", "person", "table", "street", "car", "tree", "sky",
    "water", "grass", "field", "road", "house", "building", "sitting", "standing", "holding", "next", "top",
    "front", "back", "left", "right", "s", "t",
] + [".", ",", "'", "!", "?"]
_SUFFIXES = ["##s", "##ed", "##ing", "##er", "##ly"]
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]

PRESETS = {
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=64, patch_size=16),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=64),
    ),
    "base": dict(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=384, patch_size=16),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=512),
    ),
    "large": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=384, patch_size=16),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=512),
    ),
}


@dataclass
class CheckpointSpec:
    """What to build. `special_positions` places the special tokens at chosen vocabulary ids."""

    preset: str = "tiny"
    seed: int = 0
    vocab_size: int | None = None  # None: the BERT vocabulary size 30524 for base/large, the word list for tiny
    special_positions: dict[str, int] = field(default_factory=dict)
    image_size: int | None = None
    decoder_init_std: float = 0.5
    vision_init_std: float = 0.02
    eos_bias: float = 2.0
    legacy_files: bool = False  # preprocessor_config.json + vocab.txt only, like the Salesforce hub snapshots
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    vision: dict = field(default_factory=dict)  # overrides of the preset's vision config (e.g. num_hidden_layers)
    text: dict = field(default_factory=dict)  # overrides of the preset's text config


def _vocabulary(spec: CheckpointSpec) -> list[str]:
    rng = random.Random(spec.seed)
    words = _WORDS + _SUFFIXES
    size = spec.vocab_size or (30524 if spec.preset != "tiny" else len(words) + len(_SPECIALS))
    fillers = [f"tok{i}" for i in range(max(0, size - len(words) - len(_SPECIALS)))]
    regular = (words + fillers)[: size - len(_SPECIALS)]
    vocab: list[str | None] = [None] * size
    for token, position in spec.special_positions.items():
        vocab[position] = token
    free = [i for i, t in enumerate(vocab) if t is None]
    unplaced = [t for t in _SPECIALS if t not in spec.special_positions]
    for token in unplaced:
        vocab[free.pop(0)] = token
    rng.shuffle(regular)
    for i, token in zip(free, regular, strict=True):
        vocab[i] = token
    return vocab


def build(spec: CheckpointSpec, output: str | Path) -> Path:
    """Writes the checkpoint to `output` and returns that path."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    vocab = _vocabulary(spec)
    ids = {t: i for i, t in enumerate(vocab)}
    tokenizer = BertTokenizer(vocab=ids, bos_token="[DEC]")
    vision, text = model_configs(spec, len(vocab))
    image_processor = BlipImageProcessorPil(
        size={"height": vision["image_size"], "width": vision["image_size"]},
        **({"image_mean": list(spec.image_mean)} if spec.image_mean else {}),
        **({"image_std": list(spec.image_std)} if spec.image_std else {}),
    )
    text.update(bos_token_id=ids["[DEC]"], sep_token_id=ids["[SEP]"], eos_token_id=ids["[SEP]"],
                pad_token_id=ids["[PAD]"])
    config = BlipConfig(text_config=text, vision_config=vision)

    torch.manual_seed(spec.seed)
    model = BlipForConditionalGeneration(config).eval()
    randomise(model, spec, eos_token_id=ids["[SEP]"])
    model.save_pretrained(output)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(output)
    if spec.legacy_files:
        _to_legacy_layout(output, vocab)
    return output


def model_configs(spec: CheckpointSpec, vocab_size: int) -> tuple[dict, dict]:
    """(vision, text) config dicts of the spec's architecture (token ids are the caller's)."""
    preset = PRESETS[spec.preset]
    vision = dict(preset["vision"], **spec.vision)
    if spec.image_size:
        vision["image_size"] = spec.image_size
    text = dict(preset["text"], **spec.text, vocab_size=vocab_size, encoder_hidden_size=vision["hidden_size"])
    return vision, text


def randomise(model, spec: CheckpointSpec, eos_token_id: int) -> None:
    """Draw the weights of a BlipForConditionalGeneration as the module docstring says (seeded by the spec)."""
    import torch

    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in model.vision_model.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                continue
            if name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * spec.vision_init_std)
        for name, param in model.text_decoder.named_parameters():
            if "LayerNorm" in name:
                continue
            if name.endswith("weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * spec.decoder_init_std
                            / param.shape[-1] ** 0.25)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        model.text_decoder.cls.predictions.decoder.bias[eos_token_id] += spec.eos_bias


def _to_legacy_layout(output: Path, vocab: list[str]) -> None:
    """Rewrite processor files the way older hub snapshots have them."""
    processor = json.loads((output / "processor_config.json").read_text())
    image = dict(processor["image_processor"], processor_class="BlipProcessor")
    (output / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (output / "processor_config.json").unlink()
    (output / "tokenizer.json").unlink()
    tokenizer_config = json.loads((output / "tokenizer_config.json").read_text())
    tokenizer_config.pop("backend", None)
    (output / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (output / "vocab.txt").write_text("\n".join(vocab) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(CheckpointSpec(preset=args.preset, seed=args.seed), args.output))


if __name__ == "__main__":
    main()
