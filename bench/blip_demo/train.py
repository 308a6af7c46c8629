"""`blip-demo-train`: train the demo BLIP on generated scenes and write it in HuggingFace format.

    blip-demo-train --output models/blip-demo        # about an hour on 2 CPU cores; seeded

Scenes are drawn on the fly (a data-loader process renders, encodes and preprocesses them exactly as the
service will), so the model never sees the same picture twice. A share of the samples is prompted with
`a picture of`; the unconditional ones are trained to caption without it. Every `eval_every` steps the model
captions a held-out set (another seed) with the service's defaults (3 beams, 5 to 20 new tokens); the learning
curve goes to `training.json` beside the checkpoint.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from blip_demo.evaluate import scenes as held_out
from blip_demo.model import DemoArchitecture, build_config, build_processor
from blip_demo.scenes import PROMPT, SceneStyle, encode, render
from blip_server.shared.generation_options import GenerationOptions

# Checked with the service's own defaults, from the options' declaration.
_DEFAULTS = GenerationOptions()
SERVICE_DEFAULTS = {name: getattr(_DEFAULTS, name) for name in ("num_beams", "max_new_tokens", "min_new_tokens")}


@dataclass(kw_only=True)
class TrainConfig:
    """Training settings; every field is a command-line flag (--learning-rate etc.)."""

    output: Path = Path("models/blip-demo")
    seed: int = 0
    steps: int = 6000
    batch_size: int = 48
    # Peak learning rates of 1e-3 and above never learn the left-to-right order (the model settles for
    # describing the objects in an order of its own and stays blind to where they are); 5e-4 does.
    learning_rate: float = 5e-4
    min_learning_rate: float = 2e-5
    warmup_steps: int = 300
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    prompted_fraction: float = 0.3
    native_canvas: float = 0.5  # share of training scenes drawn at 384x384 (the rest at 160-800 px)
    two_objects: float = 0.7  # share of two-object scenes (their order is the hard part)
    sincos_positions: bool = True  # start the vision position embeddings from a 2-D sine-cosine grid
    pixelated_patches: bool = True  # start the patch embedding as average pooling (a low-resolution view)
    threads: int = 2
    # bfloat16 autocast for the forward pass (weights stay float32): ~3x faster on CPUs with AVX512-BF16
    bf16: bool = True
    loader_workers: int = 1
    eval_every: int = 1000
    eval_scenes: int = 120
    eval_seed: int = 1_000_003
    stop_at: float = 0.99  # stop early once both held-out accuracies reach this (0: train all steps)
    architecture: DemoArchitecture = field(default_factory=DemoArchitecture)


def _load(data: bytes):
    from PIL import Image, ImageOps

    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


def pixel_values(processor, datas: list[bytes]):
    """The service's loading (EXIF orientation, RGB) and the checkpoint's image processor."""
    return processor.image_processor(images=[_load(d) for d in datas], return_tensors="pt")["pixel_values"]


def _resized(data: bytes, size: int):
    """Loading and resizing, the costly half of preprocessing, done in the data-loader process."""
    import numpy as np
    from PIL import Image

    return np.asarray(_load(data).resize((size, size), resample=Image.Resampling.BICUBIC, reducing_gap=None))


def _normalised(resized, processor):
    """The cheap half, batched in the training process: rescale (in float64, as transformers does) and
    normalise with the processor's mean and std; [B, H, W, 3] uint8 -> [B, 3, H, W] float32."""
    import torch

    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean, dtype=torch.float32)
    std = torch.tensor(ip.image_std, dtype=torch.float32)
    pixels = (resized.double() * ip.rescale_factor).float()
    return ((pixels - mean) / std).permute(0, 3, 1, 2).contiguous()


class SceneStream:
    """An endless, seeded stream of (encoded scene, target text, prompted?) for one loader worker."""

    def __init__(self, seed: int, prompted_fraction: float, style: SceneStyle):
        self.seed = seed
        self.prompted_fraction = prompted_fraction
        self.style = style

    def __iter__(self):
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1000 + (info.id if info else 0))
        while True:
            # Each scene comes with its mirror image, described in the opposite order: side by side in a batch,
            # they show the model that where the objects are decides the order of the caption.
            scene = render(rng, self.style)
            for view in (scene, scene.mirrored()):
                prompted = rng.random() < self.prompted_fraction
                yield encode(view, rng), view.prompted_caption() if prompted else view.caption, prompted


def _batches(config: TrainConfig, processor):
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    class Dataset(SceneStream, IterableDataset):
        pass

    bos = processor.tokenizer.convert_tokens_to_ids("[DEC]")
    prompt_length = len(processor.tokenizer(PROMPT)["input_ids"]) - 1  # [CLS]/BOS + prompt words

    size = processor.image_processor.size.height

    def collate(samples):
        datas, texts, prompted = zip(*samples, strict=True)
        resized = torch.from_numpy(np.stack([_resized(d, size) for d in datas]))
        tokens = processor.tokenizer(list(texts), padding=True, return_tensors="pt")
        input_ids = tokens["input_ids"].clone()
        input_ids[:, 0] = bos  # what generate() starts from
        labels = input_ids.masked_fill(tokens["attention_mask"] == 0, -100)
        for row, is_prompted in enumerate(prompted):
            if is_prompted:
                labels[row, :prompt_length] = -100  # the prompt is given, not predicted
        return resized, input_ids, tokens["attention_mask"], labels

    style = SceneStyle(native_canvas=config.native_canvas, two_objects=config.two_objects)
    loader = DataLoader(Dataset(config.seed, config.prompted_fraction, style), batch_size=config.batch_size,
                        collate_fn=collate, num_workers=config.loader_workers,
                        prefetch_factor=4 if config.loader_workers else None,
                        persistent_workers=bool(config.loader_workers))
    return iter(loader)


def evaluate(model, processor, scenes: list[tuple[bytes, str]], batch_size: int = 40) -> dict[str, float]:
    """Exact-caption accuracy with the service's default options, unconditional and prompted."""
    import torch

    correct = {"unconditional": 0, "prompted": 0}
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(scenes), batch_size):
            chunk = scenes[start : start + batch_size]
            pixels = pixel_values(processor, [d for d, _ in chunk])
            plain = processor.batch_decode(model.generate(pixel_values=pixels, **SERVICE_DEFAULTS),
                                           skip_special_tokens=True)
            prompt = processor(text=[PROMPT] * len(chunk), return_tensors="pt")
            prompted = processor.batch_decode(
                model.generate(pixel_values=pixels, input_ids=prompt["input_ids"],
                               attention_mask=prompt["attention_mask"], **SERVICE_DEFAULTS),
                skip_special_tokens=True,
            )
            for (_, caption), a, b in zip(chunk, plain, prompted, strict=True):
                correct["unconditional"] += a == caption
                correct["prompted"] += b == f"{PROMPT} {caption}"
    model.train()
    return {k: v / len(scenes) for k, v in correct.items()}


def train(config: TrainConfig, log=print) -> dict:
    import torch
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    processor = build_processor()
    model_config = build_config(config.architecture)
    model_config.text_config.label_smoothing = config.label_smoothing
    model = BlipForConditionalGeneration(model_config)
    if config.sincos_positions:
        _sincos_positions(model.vision_model.embeddings.position_embedding, config.architecture)
    if config.pixelated_patches:
        _pixelated_patches(model.vision_model.embeddings.patch_embedding, config.architecture)
    model.train()
    parameters = sum(p.numel() for p in model.parameters())
    log(f"{parameters / 1e6:.2f}M parameters")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.learning_rate, betas=(0.9, 0.98))

    def learning_rate(step: int) -> float:
        if step < config.warmup_steps:
            return config.learning_rate * (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return (config.min_learning_rate
                + 0.5 * (config.learning_rate - config.min_learning_rate) * (1 + math.cos(math.pi * progress)))

    scenes = held_out(config.eval_scenes, config.eval_seed)
    batches = _batches(config, processor)
    curve, started, losses = [], time.monotonic(), []
    for step in range(1, config.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1)
        resized, input_ids, attention_mask, labels = next(batches)
        pixels = _normalised(resized, processor)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            loss = model(pixel_values=pixels, input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % config.eval_every == 0 or step == config.steps:
            accuracy = evaluate(model, processor, scenes)
            point = {"step": step, "minutes": round((time.monotonic() - started) / 60, 2),
                     "loss": round(sum(losses) / len(losses), 4), **accuracy}
            curve.append(point)
            losses = []
            log(json.dumps(point))
            _save(model, processor, config, parameters, curve)  # a usable checkpoint at every evaluation
            if config.stop_at and min(accuracy.values()) >= config.stop_at:
                log(f"held-out accuracy reached {config.stop_at}: stopping at step {step}")
                break

    return _save(model, processor, config, parameters, curve)


def _save(model, processor, config: TrainConfig, parameters: int, curve: list[dict]) -> dict:
    config.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(config.output)
    processor.save_pretrained(config.output)
    report = {"config": _jsonable(asdict(config)), "parameters": parameters, "curve": curve,
              "held_out": {"seed": config.eval_seed, "scenes": config.eval_scenes, **curve[-1]}}
    (config.output / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _sincos_positions(embedding, architecture: DemoArchitecture) -> None:
    """2-D sine-cosine position embeddings (as in MAE) and x/y ramps for the patch grid, zero for the class token.

    BLIP initialises vision position embeddings with std 1e-10, so a model trained from scratch first has to
    discover where things are; where objects are is half of a caption here (left to right order, sizes).
    """
    import torch

    side = architecture.image_size // architecture.patch_size
    dim = embedding.shape[-1]
    quarter = (dim - 2) // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    parts = []
    for grid in (xs.flatten(), ys.flatten()):
        angles = grid[:, None] * frequencies[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    # Plus plain ramps in x and y (-1 to 1): "further left" is then one direction of the embedding.
    parts += [(xs.flatten() / (side - 1) * 2 - 1)[:, None], (ys.flatten() / (side - 1) * 2 - 1)[:, None]]
    table = torch.cat(parts, dim=1)
    table = torch.nn.functional.pad(table, (0, dim - table.shape[1]))
    with torch.no_grad():
        embedding.zero_()
        embedding[0, 1:, :] = table


def _pixelated_patches(conv, architecture: DemoArchitecture) -> None:
    """Initialise the patch embedding so that each output channel is the mean of one colour channel over one
    cell of a grid inside the patch: the transformer starts from a low-resolution picture of the image instead
    of random projections (the remaining channels, if any, keep their random initialisation)."""
    import torch

    patch, hidden = architecture.patch_size, conv.weight.shape[0]
    cells = int((hidden // 3) ** 0.5)
    while patch % cells:
        cells -= 1
    cell = patch // cells
    with torch.no_grad():
        channel = 0
        for c in range(3):
            for i in range(cells):
                for j in range(cells):
                    conv.weight[channel].zero_()
                    conv.weight[channel, c, i * cell : (i + 1) * cell, j * cell : (j + 1) * cell] = 1.0 / cell**2
                    channel += 1
        conv.bias[:channel].zero_()


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return str(value) if isinstance(value, Path) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip-demo-train", description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name != "architecture":
            kind = type(getattr(defaults, f.name))
            parse = (lambda v: v.lower() in ("1", "true", "yes")) if kind is bool else kind
            parser.add_argument("--" + f.name.replace("_", "-"), type=parse, default=getattr(defaults, f.name))
    for f in fields(DemoArchitecture):
        parser.add_argument("--" + f.name.replace("_", "-"), type=int, default=getattr(defaults.architecture, f.name))
    args = vars(parser.parse_args(argv))
    architecture = DemoArchitecture(**{f.name: args.pop(f.name) for f in fields(DemoArchitecture)})
    config = TrainConfig(**args, architecture=architecture)
    train(config, log=lambda line: print(line, flush=True))
    print(f"wrote {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
