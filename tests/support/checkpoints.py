"""The random checkpoints the tests build (once per session): one with BLIP's usual layout, one unusual."""

from __future__ import annotations

from blip_server.random_checkpoint import CheckpointSpec

SPECS = {
    # BLIP's usual token layout and files, 384x384 input: the normal preprocessing path.
    "standard": CheckpointSpec(preset="tiny", seed=11, image_size=384),
    # Non-default special token ids and vocabulary size, another input size and normalisation, and the
    # legacy file layout of older hub snapshots (preprocessor_config.json, vocab.txt only).
    "unusual": CheckpointSpec(
        preset="tiny", seed=12, image_size=224, vocab_size=97,
        special_positions={"[PAD]": 5, "[DEC]": 96, "[SEP]": 40, "[CLS]": 17},
        image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3), legacy_files=True,
    ),
}
