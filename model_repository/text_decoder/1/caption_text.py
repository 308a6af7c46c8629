"""Token ids -> caption text, as `BlipProcessor.decode(ids, skip_special_tokens=True)` produces it.

transformers decodes with the backend tokenizer and then, if the tokenizer is configured to, applies its
`clean_up_tokenization` string replacements; the export records which.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

# transformers.PreTrainedTokenizerBase.clean_up_tokenization, in its order.
_CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


class CaptionDecoder:
    def __init__(self, tokenizer_file: str | Path, clean_up_tokenization_spaces: bool):
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._clean_up = clean_up_tokenization_spaces

    def __call__(self, sequences: list[list[int]]) -> list[str]:
        texts = self._tokenizer.decode_batch(sequences, skip_special_tokens=True)
        if self._clean_up:
            for old, new in _CLEAN_UP:
                texts = [t.replace(old, new) for t in texts]
        return texts
