"""The random checkpoints the tests build (once per session): one with BLIP's usual layout, one unusual."""

from __future__ import annotations

from blip_demo.random_checkpoint import CheckpointSpec

SPECS = {
    # BLIP's usual token layout and files, 384x384 input: the normal preprocessing path.
    "standard": CheckpointSpec(preset="tiny", seed=11, image_size=384),
    # Non-default special token ids and vocabulary size, another input size and normalisation, and the
    # legacy file layout of older hub snapshots (preprocessor_config.json, vocab.txt only).
    "unusual": CheckpointSpec(
        preset="tiny", seed=12, image_size=224, vocab_size=97,
        special_positions={"[PAD]": 5, "[DEC]": 96, "[SEP]": 40, "[CLS]": 17},
        image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3), legacy_files=True,
        vision=dict(hidden_size=48, num_attention_heads=3, intermediate_size=96),  # wider than the text model
    ),
}

# The real BLIP architectures (widths, heads, vocabulary, 384x384 input) with one layer each, to check that
# export and decoding handle their dimensions without paying for their depth.
SHALLOW = {
    name: CheckpointSpec(preset=name, seed=13, vision=dict(num_hidden_layers=1), text=dict(num_hidden_layers=1))
    for name in ("base", "large")
}
