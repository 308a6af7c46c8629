"""Each vectorised processor equals transformers' own, row by row, with each row's own setting."""

from __future__ import annotations

import pytest
import torch
from logits_processors import ban_repeated_ngrams, penalise_repetitions, top_k_filter, top_p_filter
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

VOCAB = 23


def _rows(seed=0, count=6, lengths=(1, 3, 5, 8, 8, 12)):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(count, VOCAB, generator=g) * 3
    histories = [torch.randint(0, 3, (n,), generator=g) for n in lengths]  # few ids: many repeats
    width = max(lengths) + 2
    padded = torch.full((count, width), VOCAB, dtype=torch.long)  # from column 0, then the out-of-vocab id
    for row, h in enumerate(histories):
        padded[row, : len(h)] = h
    return scores, histories, padded


def test_repetition_penalty():
    scores, histories, padded = _rows()
    penalties = [1.0, 1.3, 0.7, 2.0, 1.0, 5.5]
    ours = penalise_repetitions(scores.clone(), padded, torch.tensor(penalties))
    for row, (h, p) in enumerate(zip(histories, penalties, strict=True)):
        expected = (RepetitionPenaltyLogitsProcessor(p)(h[None], scores[row : row + 1].clone()) if p != 1.0
                    else scores[row : row + 1])
        assert torch.equal(ours[row : row + 1], expected)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram(n):
    scores, histories, padded = _rows(seed=n)
    rows = [i for i, h in enumerate(histories) if len(h) >= n]  # the caller only asks for rows long enough
    lengths = torch.tensor([len(histories[i]) for i in rows])
    ours = ban_repeated_ngrams(scores[rows].clone(), padded[rows], lengths, n)
    for out, row in zip(ours, rows, strict=True):
        expected = NoRepeatNGramLogitsProcessor(n)(histories[row][None], scores[row : row + 1].clone())
        assert torch.equal(out[None], expected)
    assert torch.isinf(ours).any()


@pytest.mark.parametrize("min_keep", [1, 2])
def test_top_k(min_keep):
    scores, _, _ = _rows(seed=4)
    ks = [0, 1, 3, 50, 1, 7]
    ours = top_k_filter(scores.clone(), torch.tensor([max(k, min_keep) if k else 0 for k in ks]))
    for row, k in enumerate(ks):
        expected = (TopKLogitsWarper(k, min_tokens_to_keep=min_keep)(None, scores[row : row + 1].clone()) if k
                    else scores[row : row + 1])
        assert torch.equal(ours[row : row + 1], expected)


@pytest.mark.parametrize("min_keep", [1, 2])
def test_top_p(min_keep):
    scores, _, _ = _rows(seed=5)
    ps = [0.9, 0.5, 0.05, 0.99, 0.3, 0.75]
    ours = top_p_filter(scores.clone(), torch.tensor([1.0 - p for p in ps], dtype=torch.float32), min_keep)
    for row, p in enumerate(ps):
        expected = TopPLogitsWarper(p, min_tokens_to_keep=min_keep)(None, scores[row : row + 1].clone())
        assert torch.equal(ours[row : row + 1], expected)
