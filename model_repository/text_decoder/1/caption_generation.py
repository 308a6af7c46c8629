"""In-flight caption generation: beam search, greedy decoding and sampling over `BlipTextDecoder`.

A `DecodeLoop` holds every request being decoded. Each `step()` admits the requests added since the last step
(their prompts are fed in one prefill), runs one decoder forward for every row in flight, selects each
request's next tokens, and hands back the requests that finished: a request joins at the next step and leaves
as soon as it is done, so a short caption never waits behind a long one.

Requests with the same strategy and number of rows form a group whose selection is vectorised over its
requests (each at its own step); the decoder forward is shared by all groups. The selection mirrors
`transformers.GenerationMixin._beam_search` and `_sample` (transformers 5.23) step for step, including the
order of logits processors (repetition penalty, no-repeat n-gram, min new tokens, then temperature, top-k, top-p
when sampling), the length normalisation of finished hypotheses and the early-stopping heuristic, so that the
same checkpoint, options and image give the same captions, whatever else is in flight.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from dataclasses import dataclass

import torch
from blip_text_decoder import BlipTextDecoder
from generation_options import GenerationOptions
from logits_processors import ban_repeated_ngrams, penalise_repetitions, top_k_filter, top_p_filter

_NEG = -1.0e9  # what transformers adds to scores that must lose


@dataclass
class Hypothesis:
    """A generated sequence: the prompt's tokens (BOS first) followed by the new ones, and its score."""

    tokens: list[int]
    score: float


@dataclass
class _Request:
    key: Hashable
    options: GenerationOptions
    prompt: list[int]
    slot: int = -1
    generator: torch.Generator | None = None

    @property
    def n(self) -> int:
        return self.options.rows


def _append(state, new: dict[str, torch.Tensor], padded: tuple[str, ...]) -> None:
    """Append the state of joining requests to `state`'s tensors; those in `padded` widen to the new width."""
    for name, tensor in new.items():
        old = getattr(state, name, None)
        if old is not None and name in padded and old.shape[-1] < tensor.shape[-1]:
            old = torch.nn.functional.pad(old, (0, tensor.shape[-1] - old.shape[-1]))
        setattr(state, name, tensor if old is None else torch.cat([old, tensor]))


class _Group:
    """Requests that share a strategy and a row count n; each request owns n rows of the cache."""

    def __init__(self, n: int, sampling: bool, eos: int, device):
        self.n, self.sampling, self.eos, self.device = n, sampling, eos, device
        self.requests: list[_Request] = []
        self.steps = torch.zeros(0, dtype=torch.long, device=device)  # tokens selected so far, per request
        self.slots = torch.zeros(0, dtype=torch.long, device=device)
        self.width = 1  # columns of the per-request token buffers: the largest max_new_tokens

    def __len__(self) -> int:
        return len(self.requests)

    # -- membership: tensors of the requests' options and state, changed only when requests join or leave ----

    def add(self, requests: list[_Request]) -> None:
        self.requests += requests
        self.width = max([self.width] + [r.options.max_new_tokens for r in requests])
        self.steps = torch.cat([self.steps, torch.zeros(len(requests), dtype=torch.long, device=self.device)])
        self.slots = torch.cat([self.slots, torch.tensor([r.slot for r in requests], device=self.device)])
        self._derive()
        self._add_state(len(requests))

    def keep(self, keep: torch.Tensor) -> None:
        """Drop the requests whose entry of the bool tensor `keep` is False."""
        idx = keep.nonzero().squeeze(1)
        self.requests = [self.requests[i] for i in idx.tolist()]
        self.steps = self.steps[idx]
        self.slots = self.slots[idx]
        self._derive()
        self._keep_state(idx)

    def rows(self, width: int) -> torch.Tensor:
        """The cache rows of the group's requests, request by request."""
        return (self.slots[:, None] * width + torch.arange(self.n, device=self.device)[None, :]).reshape(-1)

    def _derive(self) -> None:
        options = [r.options for r in self.requests]

        def per_request(values, dtype=torch.long):
            return torch.tensor(values, dtype=dtype, device=self.device)

        self.max_new = per_request([o.max_new_tokens for o in options])
        self.min_new = per_request([o.min_new_tokens for o in options])
        self.prompt_len = per_request([len(r.prompt) for r in self.requests])
        self.ngram = per_request([o.no_repeat_ngram_size for o in options])
        self.ngram_sizes = sorted({o.no_repeat_ngram_size for o in options} - {0})
        self.length_penalty = per_request([float(o.length_penalty) for o in options], torch.float64)
        self.stop_when_full = per_request([o.early_stopping is True for o in options], torch.bool)
        # early_stopping "never" with a positive length penalty: the best a running beam could reach is judged at
        # the longest length it could reach, as transformers does.
        self.judge_at_max = per_request([o.early_stopping == "never" and o.length_penalty > 0 for o in options],
                                        torch.bool)
        self.repetition_penalty = self._rows(per_request([float(o.repetition_penalty) for o in options], torch.float32))
        self.penalised = bool((self.repetition_penalty != 1.0).any())
        self.temperature = self._rows(per_request([float(o.temperature) for o in options], torch.float32))
        self.top_k = self._rows(per_request([o.top_k for o in options]))
        # top_p as the probability mass of the least likely tokens that sampling removes (1 - top_p, per row).
        self.tail_mass = self._rows(per_request([1.0 - float(o.top_p) for o in options], torch.float32))
        self.nucleus = self._rows(per_request([o.top_p < 1.0 for o in options], torch.bool))
        self.generators = [r.generator for r in self.requests]

    def _rows(self, values: torch.Tensor) -> torch.Tensor:
        return values.repeat_interleave(self.n)

    def _add_state(self, count: int) -> None:
        raise NotImplementedError

    def _keep_state(self, idx: torch.Tensor) -> None:
        raise NotImplementedError

    # -- logits processors, in transformers' order -----------------------------------------------------------

    def process(self, scores: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor, min_tokens_to_keep: int):
        """scores [rows, V]; history [rows, T] from column 0 (vocab_size past each row's length)."""
        if self.penalised:
            scores = penalise_repetitions(scores, history, self.repetition_penalty)
        for n in self.ngram_sizes:
            rows = self._rows((self.ngram == n) & (self.prompt_len + self.steps >= n)).nonzero().squeeze(1)
            if len(rows):
                scores[rows] = ban_repeated_ngrams(scores[rows], history[rows], lengths[rows], n)
        early = self._rows(self.steps < self.min_new)
        scores[:, self.eos] = torch.where(early, -float("inf"), scores[:, self.eos])
        if self.sampling:
            scores = scores / self.temperature[:, None]
            k = self.top_k
            scores = top_k_filter(scores, torch.where(k > 0, k.clamp(min=min_tokens_to_keep), k))
            rows = self.nucleus.nonzero().squeeze(1)
            if len(rows):
                scores[rows] = top_p_filter(scores[rows], self.tail_mass[rows], min_tokens_to_keep)
        return scores


class _SampleGroup(_Group):
    """Greedy decoding (one row) or multinomial sampling (num_return_sequences independent rows)."""

    def _add_state(self, count: int) -> None:
        rows, dev = count * self.n, self.device
        new = {
            "unfinished": torch.ones(rows, dtype=torch.bool, device=dev),
            "sum_logprobs": torch.zeros(rows, device=dev),
            "length": torch.zeros(rows, dtype=torch.long, device=dev),
            "generated": torch.zeros((rows, self.width), dtype=torch.long, device=dev),
        }
        _append(self, new, padded=("generated",))

    def _keep_state(self, idx: torch.Tensor) -> None:
        rows = (idx[:, None] * self.n + torch.arange(self.n, device=self.device)).reshape(-1)
        self.unfinished, self.sum_logprobs = self.unfinished[rows], self.sum_logprobs[rows]
        self.generated, self.length = self.generated[rows], self.length[rows]

    def step(self, logits: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor):
        """-> (next token per row, None: rows keep their order, done per request)."""
        scores = self.process(logits, history, lengths, min_tokens_to_keep=1)
        if self.sampling:
            probs = torch.softmax(scores, dim=-1).view(len(self.requests), self.n, -1)
            tokens = torch.cat([torch.multinomial(probs[i], num_samples=1, generator=g).squeeze(1)
                                for i, g in enumerate(self.generators)])
        else:
            tokens = torch.argmax(scores, dim=-1)
        logprob = scores.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(scores, dim=-1)
        live = self.unfinished
        column = self._rows(self.steps)
        self.generated.scatter_(1, column[:, None], torch.where(live, tokens, self.generated.gather(1, column[:, None])
                                                                 .squeeze(1))[:, None])
        self.length += live.long()
        self.sum_logprobs += torch.where(live, logprob, torch.zeros_like(logprob))
        at_max = self._rows(self.steps + 1 >= self.max_new)
        self.unfinished = live & ~(tokens == self.eos) & ~at_max
        self.steps += 1
        done = ~self.unfinished.view(len(self.requests), self.n).any(dim=1)
        return tokens, None, done

    def results(self, i: int) -> list[Hypothesis]:
        out = []
        request = self.requests[i]
        for j in range(i * self.n, (i + 1) * self.n):
            length = int(self.length[j])
            score = float(self.sum_logprobs[j]) / (length ** float(request.options.length_penalty))
            out.append(Hypothesis(request.prompt + self.generated[j, :length].tolist(), score))
        return sorted(out, key=lambda h: -h.score)


class _BeamGroup(_Group):
    """Beam search (and beam sampling) as in transformers' vectorised `_beam_search`."""

    def _add_state(self, count: int) -> None:
        r, n, m, dev = count, self.n, self.width, self.device
        new = {
            "running_scores": torch.cat([torch.zeros((r, 1), device=dev), torch.full((r, n - 1), _NEG, device=dev)], 1),
            "running": torch.zeros((r, n, m), dtype=torch.long, device=dev),
            "finished_scores": torch.full((r, n), _NEG, device=dev),
            "finished": torch.zeros((r, n, m), dtype=torch.long, device=dev),
            "finished_length": torch.zeros((r, n), dtype=torch.long, device=dev),
            "is_finished": torch.zeros((r, n), dtype=torch.bool, device=dev),
            "improvable": torch.ones((r, 1), dtype=torch.bool, device=dev),
        }
        _append(self, new, padded=("running", "finished"))
        self.top_n_mask = torch.arange(2 * n, device=dev) < n

    def _keep_state(self, idx: torch.Tensor) -> None:
        for name in ("running_scores", "running", "finished_scores", "finished", "finished_length", "is_finished",
                     "improvable"):
            setattr(self, name, getattr(self, name)[idx])

    def step(self, logits: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor):
        """-> (next token per row, source row of each row within the group, done per request)."""
        r, n = len(self.requests), self.n
        vocab = logits.shape[-1]
        log_probs = torch.log_softmax(logits, dim=-1)
        log_probs = self.process(log_probs, history, lengths, min_tokens_to_keep=2)
        accumulated = (log_probs.view(r, n, vocab) + self.running_scores[:, :, None]).view(r, n * vocab)

        k = 2 * n
        if self.sampling:
            probs = torch.softmax(accumulated, dim=-1)
            top_idx = torch.stack([torch.multinomial(probs[i], num_samples=k, generator=g)
                                   for i, g in enumerate(self.generators)])
            top_lp = accumulated.gather(1, top_idx)
        else:
            top_lp, top_idx = torch.topk(accumulated, k=k)
        top_beam = top_idx // vocab
        top_token = top_idx % vocab
        candidates = self.running.gather(1, top_beam[:, :, None].expand(-1, -1, self.running.shape[2])).clone()
        candidates.scatter_(2, self.steps[:, None, None].expand(-1, k, 1), top_token[:, :, None])
        hits = (top_token == self.eos) | (self.steps + 1 >= self.max_new)[:, None]

        # e. the best num_beams candidates that did not finish continue
        running_lp = top_lp + hits.to(torch.float32) * _NEG
        keep = torch.topk(running_lp, k=n)[1]
        self.running = candidates.gather(1, keep[:, :, None].expand(-1, -1, candidates.shape[2]))
        self.running_scores = running_lp.gather(1, keep)
        source_beam = top_beam.gather(1, keep)

        # f. finished candidates among the top num_beams enter the finished set if they beat it
        just_finished = hits & self.top_n_mask[None, :]
        divisor = ((self.steps + 1).double() ** self.length_penalty).float()
        finished_lp = top_lp / divisor[:, None]
        full = self.is_finished.all(dim=1, keepdim=True) & self.stop_when_full[:, None]
        finished_lp = finished_lp + full.to(torch.float32) * _NEG
        finished_lp = finished_lp + (~self.improvable).to(torch.float32) * _NEG
        finished_lp = finished_lp + (~just_finished) * _NEG
        merged_scores = torch.cat((self.finished_scores, finished_lp), dim=1)
        merged = torch.cat((self.finished, candidates), dim=1)
        merged_length = torch.cat((self.finished_length, (self.steps + 1)[:, None].expand(-1, k)), dim=1)
        merged_is_finished = torch.cat((self.is_finished, just_finished), dim=1)
        best = torch.topk(merged_scores, k=n)[1]
        self.finished = merged.gather(1, best[:, :, None].expand(-1, -1, merged.shape[2]))
        self.finished_scores = merged_scores.gather(1, best)
        self.finished_length = merged_length.gather(1, best)
        self.is_finished = merged_is_finished.gather(1, best)

        # g. can a running beam still beat the worst finished one?
        hypothetical = torch.where(self.judge_at_max, self.max_new, self.steps + 1)
        best_running = self.running_scores[:, :1] / (hypothetical.double() ** self.length_penalty).float()[:, None]
        worst_finished = torch.where(self.is_finished, torch.min(self.finished_scores, dim=1, keepdim=True)[0], _NEG)
        self.improvable = self.improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        done = ~self.improvable.squeeze(1) | hits.all(dim=1) | (self.is_finished.all(dim=1) & self.stop_when_full)

        tokens = self.running.gather(2, self.steps[:, None, None].expand(-1, n, 1)).reshape(-1)
        sources = (source_beam + torch.arange(r, device=self.device)[:, None] * n).reshape(-1)
        self.steps += 1
        return tokens, sources, done

    def results(self, i: int) -> list[Hypothesis]:
        request = self.requests[i]
        return [
            Hypothesis(request.prompt + self.finished[i, j, : int(self.finished_length[i, j])].tolist(),
                       float(self.finished_scores[i, j]))
            for j in range(request.options.num_return_sequences)
        ]


@dataclass
class StepStats:
    """What the last step did: rows decoded, requests in flight, requests admitted and finished."""

    rows: int = 0
    requests: int = 0
    admitted: int = 0
    finished: int = 0


class DecodeLoop:
    """Every request being captioned, decoded together one step at a time; requests join and leave any step."""

    def __init__(self, decoder: BlipTextDecoder, columns: int):
        """`columns`: the longest sequence a request may reach (prompt tokens + max_new_tokens)."""
        self.decoder = decoder
        self.device = decoder.device
        self.cache = decoder.new_cache(columns)
        self.columns = columns
        self.requests: dict[Hashable, _Request] = {}
        self.groups: dict[tuple, _Group] = {}
        self._queue: list[tuple[_Request, torch.Tensor]] = []
        self._free: list[int] = []
        self._used = 0  # slots [0, _used) are decoded
        self._live = torch.zeros(0, dtype=torch.long, device=self.device)  # 1 for rows of a request, per row
        self.stats = StepStats()

    def __len__(self) -> int:
        return len(self.requests) + len(self._queue)

    def add(self, key: Hashable, image_embeds: torch.Tensor, prompt: list[int], options: GenerationOptions) -> None:
        """Admit a request at the next step: image_embeds [L, E]; prompt starts with BOS; options validated."""
        if len(prompt) + options.max_new_tokens > self.columns:
            raise ValueError(f"a prompt of {len(prompt)} tokens and {options.max_new_tokens} new tokens do not fit "
                             f"{self.columns} columns")
        if key in self.requests or any(r.key == key for r, _ in self._queue):
            raise ValueError(f"request {key!r} is already being decoded")
        generator = None
        if options.do_sample:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(options.seed if options.seed is not None else int.from_bytes(os.urandom(7), "little"))
        self._queue.append((_Request(key, options, list(prompt), generator=generator), image_embeds))

    def cancel(self, key: Hashable) -> None:
        """Stop decoding a request (queued or in flight); its rows are free at the next step."""
        self._queue = [(r, e) for r, e in self._queue if r.key != key]
        request = self.requests.get(key)
        if request is not None:
            with torch.inference_mode():
                group = self._group_of(request)
                group.keep(torch.tensor([r is not request for r in group.requests], device=self.device))
                self._leave(request)

    # -- one step --------------------------------------------------------------------------------------------

    def step(self) -> dict[Hashable, list[Hypothesis]]:
        """Admit the queued requests, decode one token for every request in flight; returns those that finished.

        One forward serves both: the rows in flight feed their next tokens and the new requests their prompts,
        so a step reads the weights once however many requests join."""
        with torch.inference_mode():
            queued = self._place()
            rows = self._used * self.cache.width
            decoding = rows if self.requests else 0
            joining = [r for r, _ in queued]
            slots = torch.tensor([r.slot for r in joining], device=self.device, dtype=torch.long)
            if queued:
                self.decoder.store_images(self.cache, slots, torch.stack([e for _, e in queued]))
            out = self.decoder.step(self.cache, decoding, slots, [r.prompt for r in joining])
            logits = torch.zeros((rows, self.decoder.config.vocab_size), device=self.device)
            logits[:decoding] = out[:decoding]
            self.cache.lengths[:decoding] *= self._live[:decoding]  # rows without a request stay empty
            if queued:
                admitted_rows, counts = self._admit(joining, slots)
                logits[admitted_rows] = out[decoding:].repeat_interleave(counts, dim=0)
            self.stats = StepStats(rows=int(self._live.sum()), requests=len(self.requests), admitted=len(queued))
            finished = self._select(logits, rows)
        self.stats.finished = len(finished)
        if not len(self):
            self._release()
        return finished

    def _release(self) -> None:
        """Nothing left to decode: give the cache back, so that an idle server holds its weights and not the cache
        of its busiest moment (BLIP-large: 42 MB of image keys/values per request, plus its rows' keys/values
        and their spare). The next request allocates what it needs again (milliseconds)."""
        self.cache = self.decoder.new_cache(self.columns)
        self.groups.clear()
        self._free.clear()
        self._used = 0
        self._live = torch.zeros(0, dtype=torch.long, device=self.device)

    def _place(self) -> list[tuple[_Request, torch.Tensor]]:
        """Give each queued request a slot and make room for it (its rows stay empty until the prefill)."""
        queued, self._queue = self._queue, []
        for request, _ in queued:
            request.slot = self._free.pop(0) if self._free else self._used
            self._used = max(self._used, request.slot + 1)
        if queued:
            width = max([self.cache.width] + [r.n for r in self.requests.values()] + [r.n for r, _ in queued])
            columns = max(len(r.prompt) + r.options.max_new_tokens for r, _ in queued)
            self.cache.ensure(self._used, width, max(embeds.shape[0] for _, embeds in queued), columns)
            self._live = self._live_rows()
        return queued

    def _admit(self, requests: list[_Request], slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The new requests, whose prompts the step fed into the first row of their slots: every row of a
        request starts from that row's state; -> (their rows, rows per request)."""
        counts = torch.tensor([r.n for r in requests], device=self.device)
        lengths = torch.tensor([len(r.prompt) for r in requests], device=self.device)
        first = slots * self.cache.width
        self.cache.lengths[first] = lengths
        first = torch.repeat_interleave(first, counts)
        rows = first + torch.cat([torch.arange(r.n, device=self.device) for r in requests])
        columns = int(lengths.max())
        self.cache.kv[:columns, :, rows] = self.cache.kv[:columns, :, first]
        self.cache.tokens[rows] = self.cache.tokens[first]
        self.cache.lengths[rows] = self.cache.lengths[first]
        self._live[rows] = 1
        for request in requests:
            self.requests[request.key] = request
            key = (request.options.num_beams > 1, request.options.do_sample, request.n)
            if key not in self.groups:
                group_type = _BeamGroup if key[0] else _SampleGroup
                self.groups[key] = group_type(request.n, request.options.do_sample,
                                              self.decoder.config.eos_token_id, self.device)
            self.groups[key].add([request])
        return rows, counts

    def _select(self, logits: torch.Tensor, rows: int) -> dict[Hashable, list[Hypothesis]]:
        order = None
        finished: dict[Hashable, list[Hypothesis]] = {}
        columns = int(self.cache.lengths[:rows].max()) if rows else 0
        history = self.cache.tokens[:rows, : max(columns, 1)]
        lengths = self.cache.lengths[:rows]
        for group in [g for g in self.groups.values() if len(g)]:
            group_rows = group.rows(self.cache.width)
            tokens, sources, done = group.step(logits[group_rows], history[group_rows], lengths[group_rows])
            self.cache.next_tokens[group_rows] = tokens
            if sources is not None:
                order = torch.arange(rows, device=self.device) if order is None else order
                order[group_rows] = group_rows[sources]
            if bool(done.any()):
                ended = done.nonzero().squeeze(1).tolist()
                for i in ended:
                    finished[group.requests[i].key] = group.results(i)
                leaving = [group.requests[i] for i in ended]
                group.keep(~done)
                for request in leaving:
                    self._leave(request)
        if order is not None and columns:
            self.cache.reorder(order, columns)
        return finished

    # -- rows and slots --------------------------------------------------------------------------------------

    def _group_of(self, request: _Request) -> _Group:
        return self.groups[(request.options.num_beams > 1, request.options.do_sample, request.n)]

    def _rows_of(self, request: _Request) -> torch.Tensor:
        start = request.slot * self.cache.width
        return torch.arange(start, start + request.n, device=self.device)

    def _live_rows(self) -> torch.Tensor:
        """1 for every row of a request in flight, per row of the cache."""
        live = torch.zeros(self.cache.rows, dtype=torch.long, device=self.device)
        for group in self.groups.values():
            live[group.rows(self.cache.width)] = 1
        return live

    def _leave(self, request: _Request) -> None:
        del self.requests[request.key]
        rows = self._rows_of(request)
        self.cache.clear(rows)
        self._live[rows] = 0
        self._free.append(request.slot)
        self._free.sort()
        while self._used and self._used - 1 in self._free:  # shrink the decoded range past free slots at its end
            self._used -= 1
            self._free.remove(self._used)


def generate(
    decoder: BlipTextDecoder,
    image_embeds: torch.Tensor,
    prompts: list[list[int]],
    options: list[GenerationOptions],
) -> list[list[Hypothesis]]:
    """Caption R images at once in a loop of their own: image_embeds [R, L, E]; prompts[i] starts with BOS;
    options validated. (The served model runs one `DecodeLoop` for every request and cancels through it.)"""
    if not prompts:
        return []
    columns = max(len(p) for p in prompts) + max(o.max_new_tokens for o in options)
    loop = DecodeLoop(decoder, columns)
    for i, (prompt, item_options) in enumerate(zip(prompts, options, strict=True)):
        loop.add(i, image_embeds[i], prompt, item_options)
    results: dict[Hashable, list[Hypothesis]] = {}
    while len(loop):
        results.update(loop.step())
    return [results[i] for i in range(len(prompts))]
