"""A few steps of the demo training (the real run takes about 90 minutes and is not repeated in CI)."""

from __future__ import annotations

import json

from transformers import AutoProcessor, BlipForConditionalGeneration

from blip_demo.model import vocabulary
from blip_demo.train import TrainConfig, train


def test_a_few_training_steps_write_a_standard_checkpoint(tmp_path):
    config = TrainConfig(output=tmp_path / "demo", steps=3, batch_size=4, warmup_steps=1, eval_every=3,
                         eval_scenes=2, loader_workers=0, threads=1)
    report = train(config, log=lambda line: None)
    model = BlipForConditionalGeneration.from_pretrained(config.output)
    processor = AutoProcessor.from_pretrained(config.output)
    assert model.config.vision_config.image_size == 384 and processor.image_processor.size.height == 384
    assert processor.tokenizer.convert_ids_to_tokens(list(range(len(vocabulary())))) == vocabulary()
    assert model.config.text_config.bos_token_id == processor.tokenizer.convert_tokens_to_ids("[DEC]")
    saved = json.loads((config.output / "training.json").read_text())
    assert saved["curve"] == report["curve"] and saved["curve"][-1]["step"] == 3
    assert 0.0 <= saved["held_out"]["unconditional"] <= 1.0
