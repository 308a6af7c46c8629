"""Batched caption generation: beam search, greedy decoding and sampling over `BlipTextDecoder`.

Every request of a batch is decoded in one loop even when their options differ. Requests with the same
strategy and the same number of rows form a group whose selection step is vectorised; the decoder forward is
shared by all groups. A request leaves the batch as soon as it is finished.

The selection logic mirrors `transformers.GenerationMixin._beam_search` and `_sample` (transformers 5.23)
step for step, including the order of logits processors (repetition penalty, no-repeat n-gram, min new
tokens, then temperature, top-k, top-p when sampling), the length normalisation of finished hypotheses and
the early-stopping heuristic, so that the same checkpoint, options and image give the same captions.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Callable

import torch

from blip_text_decoder import BlipTextDecoder, Segment, SelfAttentionCache
from generation_options import GenerationOptions
from logits_processors import ban_repeated_ngrams, penalise_repetitions, top_k_filter, top_p_filter

_NEG = -1.0e9  # what transformers adds to scores that must lose


@dataclass
class Hypothesis:
    """A generated sequence: the prompt's tokens (BOS first) followed by the new ones, and its score."""

    tokens: list[int]
    score: float


class _Group:
    """Requests that share a strategy and a row count, each owning `n` consecutive rows of the batch."""

    def __init__(self, requests: list[int], options: list[GenerationOptions], prompts: list[list[int]],
                 rows_per_request: int, eos: int, device):
        self.requests = requests
        self.options = options
        self.prompts = prompts
        self.n = rows_per_request
        self.eos = eos
        self.device = device
        self.sampling = options[0].do_sample
        self.generators = []
        if self.sampling:
            for o in options:
                g = torch.Generator(device=device)
                g.manual_seed(o.seed if o.seed is not None else int.from_bytes(os.urandom(7), "little"))
                self.generators.append(g)
        self._derive()

    def _derive(self) -> None:
        """Tensors of the requests' options, rebuilt whenever requests leave."""
        self.max_new = torch.tensor([o.max_new_tokens for o in self.options], device=self.device)
        self.repetition_penalty = self._per_row([float(o.repetition_penalty) for o in self.options], torch.float32)
        self.temperature = self._per_row([float(o.temperature) for o in self.options], torch.float32)

    @property
    def rows(self) -> int:
        return len(self.requests) * self.n

    def keep(self, keep: list[bool]) -> None:
        """Drop the requests whose entry is False."""
        idx = [i for i, k in enumerate(keep) if k]
        rows = torch.tensor([i * self.n + j for i in idx for j in range(self.n)], dtype=torch.long, device=self.device)
        req = torch.tensor(idx, dtype=torch.long, device=self.device)
        self.requests = [self.requests[i] for i in idx]
        self.options = [self.options[i] for i in idx]
        self.prompts = [self.prompts[i] for i in idx]
        self.generators = [self.generators[i] for i in idx] if self.generators else []
        self._derive()
        self._keep_state(req, rows)

    def _keep_state(self, req: torch.Tensor, rows: torch.Tensor) -> None:
        raise NotImplementedError

    # -- logits processors, in transformers' order -----------------------------------------------------------

    def process(self, scores: torch.Tensor, history: torch.Tensor, step: int, min_tokens_to_keep: int):
        """scores [rows, V]; history [rows, T] = left-padded prompt + generated tokens, pads = V."""
        if bool((self.repetition_penalty != 1.0).any()):
            scores = penalise_repetitions(scores, history, self.repetition_penalty)
        for n in sorted({o.no_repeat_ngram_size for o in self.options} - {0}):
            rows = self._rows_where(lambda i: self.options[i].no_repeat_ngram_size == n and len(self.prompts[i]) + step >= n)
            if rows is not None:
                scores[rows] = ban_repeated_ngrams(scores[rows], history[rows], n)
        rows = self._rows_where(lambda i: step < self.options[i].min_new_tokens)
        if rows is not None:
            scores[rows, self.eos] = -float("inf")
        if self.sampling:
            scores = scores / self.temperature[:, None]
            top_k = [o.top_k for o in self.options]
            scores = top_k_filter(scores, self._per_row([max(k, min_tokens_to_keep) if k else 0 for k in top_k]))
            rows = self._rows_where(lambda i: self.options[i].top_p < 1.0)
            if rows is not None:
                threshold = self._per_row([1.0 - float(o.top_p) for o in self.options], torch.float32)[rows]
                scores[rows] = top_p_filter(scores[rows], threshold, min_tokens_to_keep)
        return scores

    def _per_row(self, values: list, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device).repeat_interleave(self.n)

    def _rows_where(self, predicate) -> torch.Tensor | None:
        rows = [i * self.n + j for i in range(len(self.requests)) if predicate(i) for j in range(self.n)]
        if not rows:
            return None
        return torch.tensor(rows, dtype=torch.long, device=self.device)


class _SampleGroup(_Group):
    """Greedy decoding (one row) or multinomial sampling (num_return_sequences independent rows)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rows = self.rows
        self.unfinished = torch.ones(rows, dtype=torch.bool, device=self.device)
        self.sum_logprobs = torch.zeros(rows, dtype=torch.float32, device=self.device)
        self.generated = torch.zeros((rows, int(self.max_new.max())), dtype=torch.long, device=self.device)
        self.length = torch.zeros(rows, dtype=torch.long, device=self.device)

    def _keep_state(self, req, rows):
        self.unfinished = self.unfinished[rows]
        self.sum_logprobs = self.sum_logprobs[rows]
        self.generated = self.generated[rows]
        self.length = self.length[rows]

    def step(self, logits: torch.Tensor, history: torch.Tensor, step: int):
        scores = self.process(logits, history, step, min_tokens_to_keep=1)
        if self.sampling:
            probs = torch.softmax(scores, dim=-1).view(len(self.requests), self.n, -1)
            tokens = torch.cat([
                torch.multinomial(probs[i], num_samples=1, generator=g).squeeze(1)
                for i, g in enumerate(self.generators)
            ])
        else:
            tokens = torch.argmax(scores, dim=-1)
        logprob = scores.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(scores, dim=-1)
        live = self.unfinished
        self.generated[live, step] = tokens[live]
        self.length += live.long()
        self.sum_logprobs += torch.where(live, logprob, torch.zeros_like(logprob))
        at_max = (step + 1 >= self.max_new).repeat_interleave(self.n)
        self.unfinished = live & ~(tokens == self.eos) & ~at_max
        done = ~self.unfinished.view(len(self.requests), self.n).any(dim=1)
        return tokens, None, done.tolist()

    def results(self, i: int) -> list[Hypothesis]:
        out = []
        for j in range(i * self.n, (i + 1) * self.n):
            length = int(self.length[j])
            score = float(self.sum_logprobs[j]) / (length ** float(self.options[i].length_penalty))
            out.append(Hypothesis(self.prompts[i] + self.generated[j, :length].tolist(), score))
        return sorted(out, key=lambda h: -h.score)


class _BeamGroup(_Group):
    """Beam search (and beam sampling) as in transformers' vectorised `_beam_search`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        r, n, m = len(self.requests), self.n, int(self.max_new.max())
        dev = self.device
        self.running_scores = torch.zeros((r, n), dtype=torch.float32, device=dev)
        self.running_scores[:, 1:] = _NEG
        self.running = torch.zeros((r, n, m), dtype=torch.long, device=dev)
        self.finished_scores = torch.full((r, n), _NEG, dtype=torch.float32, device=dev)
        self.finished = torch.zeros((r, n, m), dtype=torch.long, device=dev)
        self.finished_length = torch.zeros((r, n), dtype=torch.long, device=dev)
        self.is_finished = torch.zeros((r, n), dtype=torch.bool, device=dev)
        self.improvable = torch.ones((r, 1), dtype=torch.bool, device=dev)
        self.top_n_mask = torch.arange(2 * n, device=dev) < n

    def _keep_state(self, req, rows):
        self.running_scores = self.running_scores[req]
        self.running = self.running[req]
        self.finished_scores = self.finished_scores[req]
        self.finished = self.finished[req]
        self.finished_length = self.finished_length[req]
        self.is_finished = self.is_finished[req]
        self.improvable = self.improvable[req]

    def step(self, logits: torch.Tensor, history: torch.Tensor, step: int):
        r, n = len(self.requests), self.n
        vocab = logits.shape[-1]
        log_probs = torch.log_softmax(logits, dim=-1)
        log_probs = self.process(log_probs, history, step, min_tokens_to_keep=2)
        accumulated = (log_probs.view(r, n, vocab) + self.running_scores[:, :, None]).view(r, n * vocab)

        k = 2 * n
        if self.sampling:
            probs = torch.softmax(accumulated, dim=-1)
            top_idx = torch.stack([
                torch.multinomial(probs[i], num_samples=k, generator=g) for i, g in enumerate(self.generators)
            ])
            top_lp = accumulated.gather(1, top_idx)
        else:
            top_lp, top_idx = torch.topk(accumulated, k=k)
        top_beam = top_idx // vocab
        top_token = top_idx % vocab
        candidates = self.running.gather(1, top_beam[:, :, None].expand(-1, -1, self.running.shape[2])).clone()
        candidates[:, :, step] = top_token
        hits = (top_token == self.eos) | (step + 1 >= self.max_new)[:, None]

        # e. the best num_beams candidates that did not finish continue
        running_lp = top_lp + hits.to(torch.float32) * _NEG
        keep = torch.topk(running_lp, k=n)[1]
        self.running = candidates.gather(1, keep[:, :, None].expand(-1, -1, candidates.shape[2]))
        self.running_scores = running_lp.gather(1, keep)
        source_beam = top_beam.gather(1, keep)

        # f. finished candidates among the top num_beams enter the finished set if they beat it
        just_finished = hits & self.top_n_mask[None, :]
        divisor = torch.tensor([float(step + 1) ** float(o.length_penalty) for o in self.options], device=self.device)
        finished_lp = top_lp / divisor[:, None]
        finished_lp = finished_lp + (~self.improvable).to(torch.float32) * _NEG
        finished_lp = finished_lp + (~just_finished) * _NEG
        merged_scores = torch.cat((self.finished_scores, finished_lp), dim=1)
        merged = torch.cat((self.finished, candidates), dim=1)
        merged_length = torch.cat((self.finished_length, torch.full_like(top_beam, step + 1)), dim=1)
        merged_is_finished = torch.cat((self.is_finished, just_finished), dim=1)
        best = torch.topk(merged_scores, k=n)[1]
        self.finished = merged.gather(1, best[:, :, None].expand(-1, -1, merged.shape[2]))
        self.finished_scores = merged_scores.gather(1, best)
        self.finished_length = merged_length.gather(1, best)
        self.is_finished = merged_is_finished.gather(1, best)

        # g. can a running beam still beat the worst finished one?
        best_running = self.running_scores[:, :1] / divisor[:, None]
        worst_finished = torch.where(
            self.is_finished, torch.min(self.finished_scores, dim=1, keepdim=True)[0], _NEG
        )
        self.improvable = self.improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        done = ~self.improvable.squeeze(1) | hits.all(dim=1)

        tokens = self.running[:, :, step].reshape(-1)
        source_rows = (source_beam + torch.arange(r, device=self.device)[:, None] * n).reshape(-1)
        return tokens, source_rows, done.tolist()

    def results(self, i: int) -> list[Hypothesis]:
        return [
            Hypothesis(
                self.prompts[i] + self.finished[i, j, : int(self.finished_length[i, j])].tolist(),
                float(self.finished_scores[i, j]),
            )
            for j in range(self.options[i].num_return_sequences)
        ]


def generate(
    decoder: BlipTextDecoder,
    image_embeds: torch.Tensor,
    prompts: list[list[int]],
    options: list[GenerationOptions],
    is_cancelled: Callable[[int], bool] | None = None,
    cancel_check_interval: int = 4,
) -> list[list[Hypothesis] | None]:
    """Caption R images at once: image_embeds [R, L, E]; prompts[i] starts with BOS; options validated.

    Every `cancel_check_interval` steps, `is_cancelled(i)` is asked for each unfinished item i; a cancelled
    item leaves the batch at once and its result is None.
    """
    config = decoder.config
    device = decoder.device
    count = len(prompts)
    if count == 0:
        return []

    # Requests with the same strategy and row count form one group; groups are contiguous in the batch.
    def key(i: int):
        o = options[i]
        return (o.num_beams > 1, o.do_sample, o.rows)

    order = sorted(range(count), key=key)
    groups: list[_Group] = []
    for (beam, _, rows), members in itertools.groupby(order, key=key):
        members = list(members)
        group = _BeamGroup if beam else _SampleGroup
        groups.append(group(members, [options[i] for i in members], [prompts[i] for i in members], rows,
                            config.eos_token_id, device))

    with torch.inference_mode():
        order_t = torch.tensor(order, dtype=torch.long)
        images = decoder.image_context(image_embeds.index_select(0, order_t.to(image_embeds.device)))

        # Prefill: each request's prompt once, left-padded to the longest.
        prompt_len = torch.tensor([len(prompts[i]) for i in order], dtype=torch.long, device=device)
        width = int(prompt_len.max())
        pad = width - prompt_len
        tokens = torch.full((count, width), config.pad_token_id, dtype=torch.long, device=device)
        history = torch.full((count, width), config.vocab_size, dtype=torch.long, device=device)
        for row, i in enumerate(order):
            p = torch.tensor(prompts[i], dtype=torch.long, device=device)
            tokens[row, width - len(p):] = p
            history[row, width - len(p):] = p
        positions = (torch.arange(width, device=device)[None, :] - pad[:, None]).clamp(min=0)
        capacity = width + max(o.max_new_tokens for o in options)
        cache = SelfAttentionCache(config, count, capacity, pad, device, decoder.dtype)
        prefill_segments = [Segment(0, 0, count, 1)]
        logits = decoder.forward(tokens, positions, cache, images, prefill_segments)

        # Every request's rows start from its prompt's state.
        rows_of_request = torch.tensor([g.n for g in groups for _ in g.requests], dtype=torch.long, device=device)
        expand = torch.repeat_interleave(torch.arange(count, device=device), rows_of_request)
        cache.select(expand)
        logits = logits.index_select(0, expand)
        history = history.index_select(0, expand)
        next_position = prompt_len.index_select(0, expand)

        results: dict[int, list[Hypothesis] | None] = {}
        step = 0
        while True:
            first_row, all_tokens, all_sources, keep_rows, keep_requests = 0, [], [], [], []
            any_done = False
            check_cancel = is_cancelled is not None and step % cancel_check_interval == cancel_check_interval - 1
            for g in groups:
                rows = slice(first_row, first_row + g.rows)
                tokens, sources, done = g.step(logits[rows], history[rows], step)
                all_tokens.append(tokens)
                all_sources.append(
                    sources + first_row if sources is not None
                    else torch.arange(first_row, first_row + g.rows, device=device)
                )
                for i, d in enumerate(done):
                    if d:
                        results[g.requests[i]] = g.results(i)
                        any_done = True
                    elif check_cancel and is_cancelled(g.requests[i]):
                        results[g.requests[i]] = None
                        any_done = d = True
                    keep_requests.append(not d)
                    keep_rows.extend([not d] * g.n)
                first_row += g.rows
            tokens = torch.cat(all_tokens)
            sources = torch.cat(all_sources)
            if not bool((sources == torch.arange(len(sources), device=device)).all()):
                cache.reorder(sources)
                history = history.index_select(0, sources)
            history = torch.cat([history, tokens[:, None]], dim=1)

            if any_done:
                if not any(keep_requests):
                    break
                rows_t = torch.tensor([i for i, k in enumerate(keep_rows) if k], dtype=torch.long, device=device)
                req_t = torch.tensor([i for i, k in enumerate(keep_requests) if k], dtype=torch.long, device=device)
                cache.select(rows_t)
                images = images.select(req_t)
                history = history.index_select(0, rows_t)
                tokens = tokens.index_select(0, rows_t)
                next_position = next_position.index_select(0, rows_t)
                flags = iter(keep_requests)
                for g in groups:
                    g.keep([next(flags) for _ in g.requests])
                groups = [g for g in groups if g.requests]

            segments, first_row, first_request = [], 0, 0
            for g in groups:
                if segments and segments[-1].rows_per_request == g.n:
                    segments[-1].requests += len(g.requests)
                else:
                    segments.append(Segment(first_row, first_request, len(g.requests), g.n))
                first_row += g.rows
                first_request += len(g.requests)
            logits = decoder.forward(tokens[:, None], next_position[:, None], cache, images, segments)
            next_position = next_position + 1
            step += 1
    return [results[i] for i in range(count)]
