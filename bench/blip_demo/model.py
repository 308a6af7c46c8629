"""The demo checkpoint's vocabulary, tokenizer, image processor and BLIP configuration.

The vocabulary is a WordPiece vocabulary for the scene captions. Shape names are two pieces each
(`circ ##le`, `squ ##are`, `tri ##angle`), so that every caption is at least five tokens long: the service's
default `min_new_tokens=5` (the BLIP paper's setting) would otherwise force a one-object caption such as
`a small red circle` to go on past its end.
"""

from __future__ import annotations

from dataclasses import dataclass

from blip_demo.scenes import COLOURS, PROMPT, SIZES

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
SHAPE_PIECES = ["circ", "##le", "squ", "##are", "tri", "##angle"]
WORDS = ["a", "and", *PROMPT.split()[1:], *SIZES, *COLOURS]


def vocabulary() -> list[str]:
    words = list(dict.fromkeys(WORDS))  # "a" appears in both the captions and the prompt
    return SPECIAL_TOKENS + words + SHAPE_PIECES


@dataclass(frozen=True, kw_only=True)
class DemoArchitecture:
    """Small dimensions, the standard BlipForConditionalGeneration architecture, a 384x384 input."""

    image_size: int = 384
    patch_size: int = 32
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 6
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    max_positions: int = 40


def build_processor():
    from transformers import BertTokenizer, BlipImageProcessorPil, BlipProcessor

    vocab = vocabulary()
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, bos_token="[DEC]")
    image_processor = BlipImageProcessorPil(size={"height": 384, "width": 384})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_config(architecture: DemoArchitecture):
    from transformers import BlipConfig

    vocab = vocabulary()
    ids = {t: i for i, t in enumerate(vocab)}
    a = architecture
    return BlipConfig(
        vision_config=dict(
            image_size=a.image_size, patch_size=a.patch_size, hidden_size=a.vision_hidden,
            num_hidden_layers=a.vision_layers, num_attention_heads=a.vision_heads,
            intermediate_size=4 * a.vision_hidden, dropout=0.0, attention_dropout=0.0,
        ),
        text_config=dict(
            vocab_size=len(vocab), hidden_size=a.text_hidden, num_hidden_layers=a.text_layers,
            num_attention_heads=a.text_heads, intermediate_size=4 * a.text_hidden,
            max_position_embeddings=a.max_positions, encoder_hidden_size=a.vision_hidden,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            bos_token_id=ids["[DEC]"], sep_token_id=ids["[SEP]"], eos_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"],
        ),
    )
