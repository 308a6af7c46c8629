"""transformers' logits processors, vectorised over rows that may each have their own setting.

Each function computes what the processor of the same purpose in `transformers.generation.logits_process`
computes, in the same precision; `history` is every row's sequence so far (prompt first) from column 0, the
columns past its length holding the out-of-vocabulary id `vocab_size`, which never matches a real token.
"""

from __future__ import annotations

import torch


def penalise_repetitions(scores: torch.Tensor, history: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor with a penalty per row (1.0: none)."""
    vocab = scores.shape[-1]
    padded = torch.nn.functional.pad(scores, (0, 1))
    picked = padded.gather(1, history)
    penalty = penalty[:, None]
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return padded.scatter(1, history, picked)[:, :vocab]


def ban_repeated_ngrams(scores: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
    """NoRepeatNGramLogitsProcessor: each row's last n - 1 tokens (it holds lengths[row] of them) may not be
    followed by a token that followed them before."""
    if history.shape[1] < n:
        return scores
    offsets = (lengths[:, None] - (n - 1) + torch.arange(n - 1, device=history.device)[None, :]).clamp(min=0)
    prefix = history.gather(1, offsets)
    windows = history.unfold(dimension=1, size=n, step=1)
    whole = torch.arange(windows.shape[1], device=history.device)[None, :] + n <= lengths[:, None]
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1) & whole
    vocab = scores.shape[-1]
    banned = scores.new_zeros((scores.shape[0], vocab + 1), dtype=torch.bool)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill(banned[:, :vocab], -float("inf"))


def top_k_filter(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """TopKLogitsWarper with a k per row (0: off)."""
    if not bool((k > 0).any()):
        return scores
    k = k.clamp(max=scores.shape[-1])
    top = torch.topk(scores, int(k.max()))[0]
    threshold = top.gather(1, (k.clamp(min=1) - 1)[:, None])
    threshold = torch.where(k[:, None] > 0, threshold, torch.full_like(threshold, -float("inf")))
    return scores.masked_fill(scores < threshold, -float("inf"))


def top_p_filter(scores: torch.Tensor, tail_mass: torch.Tensor, min_tokens_to_keep: int) -> torch.Tensor:
    """TopPLogitsWarper with a top_p per row, given as each row's `tail_mass`, 1 - top_p, computed in float32 as
    transformers does: the least likely tokens whose probabilities add up to at most that are removed."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= tail_mass[:, None]
    remove[..., -min_tokens_to_keep:] = False
    remove = remove.scatter(1, sorted_indices, remove)
    return scores.masked_fill(remove, -float("inf"))
