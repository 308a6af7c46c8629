"""`blip-bench soak`: minutes of load at a fixed concurrency, a share of it hostile, against blip-serve.

    blip-bench soak --minutes 10 --concurrency 32 --hostile 0.1 --output soak/

Each of `--concurrency` clients captions in a loop: mostly demo scenes and unusual valid files, a `--hostile`
share of hostile files (bombs, forged headers, truncated, not images; see `corpus`). Every call is accounted
for: its status code must be the expected one (OK for valid files, the sample's code for hostile ones) and the
same valid file must always get the same caption. Meanwhile the memory of every server process (blip-serve,
tritonserver, each Python-backend stub) is sampled every two seconds, as PSS: resident memory with the pages of
Triton's shared-memory pool, which every process maps, counted once, and split by what backs it (anonymous
memory, the /dev/shm pool, mapped files) so that growth can be traced.

What the server retains is measured at rest, twice: once the warm-up is over, the clients hold their next calls
until every call in flight is answered, the memory is read after `--settle` seconds, and the load resumes (the
pause is not counted in `--minutes`); at the end, likewise after the last call. Under load a reading also holds
whatever is in flight (up to `--concurrency` large images being decoded), so the report gives those too: the
smallest total of the minute after the warm-up and of the last minute. The report gives calls by code, lost
calls, unexpected codes, inconsistent captions, throughput, latency and memory over time. The command fails if
anything was lost or unexpected, or the memory retained at rest grew more than `--max-pss-growth`.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from blip_bench.corpus import CAPTION, Sample, corpus


@dataclass
class Outcome:
    sample: str
    expected: str
    code: str
    seconds: float
    text: str | None = None


@dataclass
class SoakReport:
    minutes: float
    concurrency: int
    hostile_share: float
    outcomes: list[Outcome] = field(default_factory=list)
    started_calls: int = 0
    # Memory readings every two seconds, as PSS (procfs.pss_bytes: RSS only where the kernel gives no PSS):
    # {"t": seconds, "processes": {name: bytes}, "total": bytes, "kinds": {name: {"anon"|"shmem"|"file": bytes}}}
    pss: list[dict] = field(default_factory=list)
    warmup: float = 60.0
    # Readings at rest (no call in flight): [after the warm-up, at the end], each {"processes", "total", "kinds"}.
    at_rest: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        codes = Counter(o.code for o in self.outcomes)
        unexpected = [o for o in self.outcomes if o.code != ("OK" if o.expected == CAPTION else o.expected)]
        first: dict[str, str] = {}
        inconsistent = 0
        for o in self.outcomes:
            if o.text is not None:
                inconsistent += first.setdefault(o.sample, o.text) != o.text
        latencies = sorted(o.seconds for o in self.outcomes if o.code == "OK")
        return {
            "minutes": self.minutes,
            "concurrency": self.concurrency,
            "hostile_share": self.hostile_share,
            "calls": len(self.outcomes),
            "calls_per_second": len(self.outcomes) / (self.minutes * 60),
            "by_code": dict(sorted(codes.items())),
            "lost": self.started_calls - len(self.outcomes),
            "unexpected": len(unexpected),
            "unexpected_examples": [o.__dict__ for o in unexpected[:10]],
            "inconsistent_captions": inconsistent,
            "latency_p50_ms": 1000 * statistics.median(latencies) if latencies else None,
            "latency_p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
            "pss": self.pss_growth(),
            "at_rest": self.rest_growth(),
        }

    def rest_growth(self) -> dict:
        """Memory retained at rest after the warm-up and at the end, in all, per process and by what backs it."""
        if len(self.at_rest) != 2 or not self.at_rest[1]["processes"]:
            return {}
        start, end = self.at_rest
        mb = lambda value: value / 2**20  # noqa: E731
        kinds = {kind: {"after_warmup_mb": mb(sum(p.get(kind, 0) for p in start["kinds"].values())),
                        "end_mb": mb(sum(p.get(kind, 0) for p in end["kinds"].values()))}
                 for kind in ("anon", "shmem", "file")}
        return {"after_warmup_mb": mb(start["total"]), "end_mb": mb(end["total"]),
                "growth": end["total"] / start["total"] - 1,
                "processes": {name: {"after_warmup_mb": mb(start["processes"][name]), "end_mb": mb(value)}
                              for name, value in end["processes"].items() if name in start["processes"]},
                "kinds": kinds}

    def pss_growth(self, window: float = 60.0) -> dict:
        """Retained memory (the smallest total of a window) of the `window` s after the warm-up and of the last
        `window` s; per process likewise."""
        if not self.pss or not self.pss[-1]["processes"]:  # a server not ours: no readings
            return {}
        end_time = self.pss[-1]["t"]
        early = [s for s in self.pss if self.warmup <= s["t"] < self.warmup + window]
        late = [s for s in self.pss if s["t"] > end_time - window]
        if not early or not late:
            return {}
        start, end = min(s["total"] for s in early), min(s["total"] for s in late)
        per_process = {}
        for name in self.pss[-1]["processes"]:
            first = [s["processes"][name] for s in early if name in s["processes"]]
            final = [s["processes"][name] for s in late if name in s["processes"]]
            if first and final:
                per_process[name] = {"after_warmup_mb": min(first) / 2**20, "end_mb": min(final) / 2**20}
        kinds = {}
        for kind in ("anon", "shmem", "file"):
            totals = [[sum(p.get(kind, 0) for p in s.get("kinds", {}).values()) for s in window]
                      for window in (early, late)]
            if all(totals) and max(totals[0]):
                kinds[kind] = {"after_warmup_mb": min(totals[0]) / 2**20, "end_mb": min(totals[1]) / 2**20}
        return {"after_warmup_mb": start / 2**20, "end_mb": end / 2**20, "growth": end / start - 1,
                "max_mb": max(s["total"] for s in self.pss) / 2**20, "processes": per_process, "kinds": kinds}


def _samples(seed: int, exclude: tuple[str, ...] = ()) -> tuple[dict[str, Sample], dict[str, Sample]]:
    """(valid, hostile): demo scenes and unusual valid files; the hostile corpus; less the `exclude`d samples."""
    from blip_demo.scenes import encode, render

    rng = random.Random(seed)
    everything = {name: s for name, s in corpus(seed=seed).items() if name not in exclude}
    valid = {f"scene_{i}": Sample(encode(render(rng), rng), CAPTION) for i in range(48)}
    valid.update({name: s for name, s in everything.items() if not s.hostile})
    return valid, {name: s for name, s in everything.items() if s.hostile}


def soak(address: str, memory, minutes: float, concurrency: int, hostile_share: float, seed: int = 0,
         warmup: float = 60.0, sample_interval: float = 2.0, exclude: tuple[str, ...] = (),
         memory_kinds=lambda: {}, settle: float = 5.0) -> SoakReport:
    """Load `address` for `minutes`; `memory()` -> {process name: bytes} and `memory_kinds()` -> {process name:
    {kind: bytes}} are sampled every `sample_interval`, and at rest after the warm-up and at the end."""
    from blip_client import CaptionClient, CaptionError

    valid, hostile = _samples(seed, exclude)
    report = SoakReport(minutes, concurrency, hostile_share, warmup=warmup)
    lock = threading.Lock()
    resting = threading.Event()  # set: the clients hold their next call
    in_flight = [0]
    started = time.monotonic()
    deadline = [started + minutes * 60]

    def client_loop(worker: int) -> None:
        rng = random.Random(seed * 1000 + worker)
        with CaptionClient(address, timeout=300, retry=None) as client:
            while True:
                with lock:
                    if time.monotonic() >= deadline[0]:
                        return
                    go = not resting.is_set()
                    if go:
                        report.started_calls += 1
                        in_flight[0] += 1
                if not go:
                    time.sleep(0.05)
                    continue
                pool = hostile if rng.random() < hostile_share else valid
                name = rng.choice(sorted(pool))
                sample = pool[name]
                t = time.perf_counter()
                try:
                    text, code = client.caption(sample.data).captions[0].text, "OK"
                except CaptionError as error:
                    text, code = None, error.code.name
                outcome = Outcome(name, sample.expected, code, time.perf_counter() - t, text)
                with lock:
                    report.outcomes.append(outcome)
                    in_flight[0] -= 1

    def reading() -> dict:
        processes = memory()
        return {"t": round(time.monotonic() - started, 1), "processes": processes,
                "total": sum(processes.values()), "kinds": memory_kinds()}

    def at_rest() -> None:
        """Wait for the calls in flight, let the server settle, read its memory."""
        while in_flight[0]:
            time.sleep(0.05)
        time.sleep(settle)
        report.at_rest.append(reading())

    rest = bool(memory())  # a server not ours has no readings: no pause for them
    workers = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(concurrency)]
    for worker in workers:
        worker.start()
    while any(w.is_alive() for w in workers):
        if rest and not report.at_rest and time.monotonic() - started >= warmup:
            paused = time.monotonic()
            with lock:
                resting.set()
            at_rest()
            with lock:
                deadline[0] += time.monotonic() - paused
            resting.clear()
        report.pss.append(reading())
        time.sleep(sample_interval)
    for worker in workers:
        worker.join(timeout=300)
    if report.at_rest:
        at_rest()
    return report


def write(report: SoakReport, output: Path) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    summary = report.summary()
    (output / "soak.json").write_text(
        json.dumps({"summary": summary, "pss": report.pss, "at_rest": report.at_rest}, indent=2))
    return summary


def markdown(summary: dict) -> str:
    pss = summary["pss"]
    lines = [
        f"{summary['minutes']:g} minutes at concurrency {summary['concurrency']}, {summary['hostile_share']:.0%} "
        f"hostile files: {summary['calls']} calls ({summary['calls_per_second']:.1f}/s), "
        f"lost {summary['lost']}, unexpected codes {summary['unexpected']}, "
        f"inconsistent captions {summary['inconsistent_captions']}",
        "",
        "| code | calls |", "| --- | ---: |",
        *[f"| {code} | {count} |" for code, count in summary["by_code"].items()],
    ]
    rest = summary.get("at_rest")
    if rest:
        rest_rows = {**rest["processes"], **{f"backed by {k}": v for k, v in rest["kinds"].items()}}
        lines += ["", f"Memory retained at rest by all server processes (PSS): {rest['after_warmup_mb']:.0f} MB after "
                      f"the warm-up, {rest['end_mb']:.0f} MB at the end ({rest['growth']:+.1%})", "",
                  "| at rest | after warm-up MB | end MB |", "| --- | ---: | ---: |",
                  *[f"| {name} | {p['after_warmup_mb']:.0f} | {p['end_mb']:.0f} |"
                    for name, p in rest_rows.items()]]
    if pss:
        lines += ["", "Under load (smallest total of a minute, requests in flight included): "
                      f"{pss['after_warmup_mb']:.0f} MB in the minute after the warm-up, "
                      f"{pss['end_mb']:.0f} MB in the last minute ({pss['growth']:+.1%}); "
                      f"peak {pss['max_mb']:.0f} MB", "",
                  "| process | after warm-up MB | end MB |", "| --- | ---: | ---: |",
                  *[f"| {name} | {p['after_warmup_mb']:.0f} | {p['end_mb']:.0f} |"
                    for name, p in pss["processes"].items()]]
        if pss.get("kinds"):
            lines += ["", "| backed by | after warm-up MB | end MB |", "| --- | ---: | ---: |",
                      *[f"| {kind} | {k['after_warmup_mb']:.0f} | {k['end_mb']:.0f} |"
                        for kind, k in pss["kinds"].items()]]
    return "\n".join(lines)
