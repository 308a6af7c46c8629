"""`blip-bench chaos`: load while the server's processes are killed in turn; every call must end with its caption.

    blip-bench chaos --minutes 10 --concurrency 8 --kill-every 40 --output chaos/

`--concurrency` clients (the SDK with its default settings: 60 s deadline, default retry policy) caption demo
scenes in a loop against a blip-serve of its own (the demo model, no response cache), while every `--kill-every`
seconds one of its processes is killed with SIGKILL, in turn: tritonserver, then the Python-backend stub of
preprocess, vision_encoder and text_decoder, then tritonserver again, and so on. Each outage is timed from outside,
by the gateway's health (polled every 50 ms): from the kill to NOT_SERVING (detection) and to SERVING again
(recovery); blip-serve's log gives its own breakdown of each restart (stopping the old Triton, backoff, starting
until ready, the gateway reaching it). The report gives calls by final status, lost calls (any that did not end
with its caption, or never ended), inconsistent captions and every outage; the command fails if any call was lost.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

FAULTS = ("tritonserver", "preprocess", "vision_encoder", "text_decoder")
_RECOVERY = re.compile(r"Triton is ready again: ([\d.]+) s after the fault was noticed \(stopping the old one "
                       r"([\d.]+) s, backoff ([\d.]+) s, starting until ready ([\d.]+) s, the gateway reaching it "
                       r"([\d.]+) s\)")


@dataclass
class Outage:
    fault: str
    killed_at: float  # seconds since the start
    detected: float | None = None  # seconds from the kill to health NOT_SERVING
    recovered: float | None = None  # seconds from the kill to health SERVING again
    restart: dict[str, float] = field(default_factory=dict)  # blip-serve's own timings of the restart


@dataclass
class ChaosReport:
    minutes: float
    concurrency: int
    kill_every: float
    started_calls: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    captions: dict[str, set[str]] = field(default_factory=dict)  # scene -> the captions it got
    latencies: list[float] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)  # the first failures' messages

    def summary(self) -> dict:
        calls = sum(self.codes.values())
        recovered = [o.recovered for o in self.outages if o.recovered is not None]
        by_fault = {}
        for fault in FAULTS:
            mine = [o for o in self.outages if o.fault == fault and o.recovered is not None]
            if mine:
                by_fault[fault] = {
                    "outages": len(mine),
                    "detected_s": statistics.median(o.detected or 0.0 for o in mine),
                    "recovered_s": statistics.median(o.recovered or 0.0 for o in mine),
                    **{f"restart_{k}_s": statistics.median(o.restart.get(k, 0.0) for o in mine)
                       for k in ("stop", "backoff", "start", "reach", "total")},
                }
        return {
            "minutes": self.minutes, "concurrency": self.concurrency, "kill_every_s": self.kill_every,
            "calls": calls, "by_code": dict(sorted(self.codes.items())),
            "lost": self.started_calls - self.codes["OK"],
            "never_answered": self.started_calls - calls,
            "inconsistent_captions": sum(len(texts) > 1 for texts in self.captions.values()),
            "latency_p50_ms": 1000 * statistics.median(self.latencies) if self.latencies else None,
            "latency_max_ms": 1000 * max(self.latencies) if self.latencies else None,
            "outages": len(self.outages),
            "outage_max_s": max(recovered) if recovered else None,
            "by_fault": by_fault,
            "failure_examples": self.examples[:10],
            "each_outage": [o.__dict__ for o in self.outages],
        }


def _health(address: str):
    """A function that answers the gateway's health (SERVING: True, NOT_SERVING: False, unreachable: None)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)

    def serving() -> bool | None:
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service="blip.caption.v1.CaptionService"), timeout=2)
        except grpc.RpcError:
            return None
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    return serving


def _victim(serve, fault: str) -> int:
    from blip_server import procfs

    (triton,) = serve.children()
    if fault == "tritonserver":
        return triton
    return next(pid for pid, command in procfs.children(triton).items() if f"/{fault}/1/model.py" in command)


def chaos(serve, minutes: float, concurrency: int, kill_every: float, seed: int = 0) -> ChaosReport:
    """Load `serve` (a started blip_bench.processes.ServeProcess) and kill its processes in turn (see the module)."""
    from blip_client import CaptionClient, CaptionError
    from blip_demo.scenes import encode, render

    rng = random.Random(seed)
    scenes = {f"scene_{i}": encode(render(rng), rng) for i in range(32)}
    report = ChaosReport(minutes, concurrency, kill_every)
    lock = threading.Lock()
    started = time.monotonic()
    end = started + minutes * 60

    def client_loop(worker: int) -> None:
        pick = random.Random(seed * 1000 + worker)
        with CaptionClient(serve.address) as client:  # the SDK's defaults
            while time.monotonic() < end:
                name = pick.choice(sorted(scenes))
                with lock:
                    report.started_calls += 1
                t = time.perf_counter()
                try:
                    text, code = client.caption(scenes[name]).text, "OK"
                except CaptionError as error:
                    text, code = None, error.code.name
                    with lock:
                        report.examples.append(f"{code}: {error.message}")
                with lock:
                    report.codes[code] += 1
                    if text is not None:
                        report.captions.setdefault(name, set()).add(text)
                        report.latencies.append(time.perf_counter() - t)

    serving = _health(serve.address)
    workers = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(concurrency)]
    for worker in workers:
        worker.start()
    turn = 0
    while time.monotonic() + kill_every < end:
        time.sleep(max(0.0, started + (turn + 1) * kill_every - time.monotonic()))
        fault = FAULTS[turn % len(FAULTS)]
        turn += 1
        log_before = len(serve.log())
        os.kill(_victim(serve, fault), signal.SIGKILL)
        killed = time.monotonic()
        outage = Outage(fault, round(killed - started, 2))
        report.outages.append(outage)
        while time.monotonic() - killed < 300:
            state = serving()
            now = time.monotonic() - killed
            if outage.detected is None and state is not True:
                outage.detected = round(now, 3)
            if outage.detected is not None and state is True:
                outage.recovered = round(now, 3)
                break
            time.sleep(0.05)
        match = _RECOVERY.search(serve.log()[log_before:])
        if match:
            outage.restart = dict(zip(("total", "stop", "backoff", "start", "reach"),
                                      (float(g) for g in match.groups()), strict=True))
    for worker in workers:
        worker.join(timeout=180)
    return report


def write(report: ChaosReport, output: Path) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    summary = report.summary()
    (output / "chaos.json").write_text(json.dumps(summary, indent=2))
    return summary


def markdown(summary: dict) -> str:
    lines = [
        f"{summary['minutes']:g} minutes at concurrency {summary['concurrency']}, a process killed every "
        f"{summary['kill_every_s']:g} s in turn: {summary['calls']} calls, lost {summary['lost']} "
        f"(never answered {summary['never_answered']}), inconsistent captions {summary['inconsistent_captions']}; "
        f"{summary['outages']} outages, the longest {summary['outage_max_s'] or 0:.1f} s",
        "",
        "| code | calls |", "| --- | ---: |",
        *[f"| {code} | {count} |" for code, count in summary["by_code"].items()],
        "",
        "Medians per fault, seconds: from the kill to health NOT_SERVING (detected) and SERVING again (recovered); "
        "blip-serve's restart, from noticing the fault: stopping the old Triton, backoff, starting until ready, the "
        "gateway reaching it, in all.",
        "",
        "| killed | outages | detected | recovered | stop | backoff | start | reach | restart in all |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {fault} | {f['outages']} | {f['detected_s']:.2f} | {f['recovered_s']:.2f} | {f['restart_stop_s']:.2f} "
          f"| {f['restart_backoff_s']:.2f} | {f['restart_start_s']:.2f} | {f['restart_reach_s']:.2f} "
          f"| {f['restart_total_s']:.2f} |" for fault, f in summary["by_fault"].items()],
    ]
    return "\n".join(lines)
