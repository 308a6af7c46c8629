"""Prompt text -> decoder input ids, as BlipProcessor and BlipForConditionalGeneration.generate prepare them.

BlipProcessor tokenises the prompt with the checkpoint's tokenizer, special tokens included
(`[CLS] a picture of [SEP]`); `generate` then puts the BOS token in place of the first id and drops the last
one. No prompt at all is what `generate` does without input ids: just BOS.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


class PromptError(ValueError):
    """The prompt cannot be used; the message says why."""


class PromptTokenizer:
    def __init__(self, tokenizer_file: str | Path, bos_token_id: int, max_tokens: int):
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        # transformers calls the backend without truncation or padding unless asked to.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.bos_token_id = bos_token_id
        self.max_tokens = max_tokens

    def __call__(self, prompt: str | None) -> list[int]:
        if prompt is None:
            return [self.bos_token_id]
        ids = self._tokenizer.encode(prompt).ids
        ids = [self.bos_token_id] + ids[1:-1]
        if len(ids) > self.max_tokens:
            raise PromptError(f"the prompt is {len(ids)} tokens long; the limit is {self.max_tokens}")
        return ids
