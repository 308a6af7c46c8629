"""The service's throughput against another commit's, side by side in one run, on the same machine.

    .venv/bin/python bench/throughput_against.py 311317a --concurrency 16 --seconds 40 --rounds 2

Checks the commit out into a temporary git worktree and serves the same checkpoint (the demo model by default)
with `blip-serve` from it and from this working tree in turn (A, B, A, B, ...: the machine's drift during the run
shows as the spread between rounds of one side). Each round starts a fresh server, warms it up, then keeps
`--concurrency` clients of this tree's SDK busy for `--seconds` with the same generated scenes, and counts the
captions answered. Both sides use this tree's virtual environment (its packages): only the service's code
differs.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def scenes(count: int, seed: int = 7) -> list[bytes]:
    from blip_demo.scenes import encode, render

    rng = random.Random(seed)
    return [encode(render(rng), rng, fmt="JPEG", quality=90, orientation=1) for _ in range(count)]


def serve(tree: Path, checkpoint: str, cache: Path):
    """`blip-serve` with `tree`'s code, on free ports, with the flags every commit since the gateway has."""
    from blip_bench.processes import CommandProcess
    from blip_server.ports import free_ports

    gateway, grpc, http, metrics = free_ports(4)
    source = os.pathsep.join(str(tree / part) for part in ("server", "client"))
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = source  # read by the subprocess started below, and by nothing else here
    try:
        process = CommandProcess("blip-serve", [
            "--model", checkpoint, "--cache-dir", str(cache), "--port", str(gateway), "--triton-grpc-port", str(grpc),
            "--triton-http-port", str(http), "--triton-metrics-port", str(metrics)])
        process.address = f"127.0.0.1:{gateway}"
        return process
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous


def measure(address: str, images: list[bytes], concurrency: int, seconds: float) -> float:
    """Captions per second answered to `concurrency` clients that each send the next image as soon as answered."""
    from blip_client import CaptionClient

    with CaptionClient(address, timeout=600) as client:
        for image in images[:concurrency]:  # warm-up: every model has run
            client.caption(image)
        done, errors = [0], []
        stop = time.monotonic() + seconds

        def work(worker: int) -> None:
            i = worker
            while time.monotonic() < stop:
                try:
                    client.caption(images[i % len(images)])
                    done[0] += 1
                except Exception as exc:  # noqa: BLE001 - reported, and the run fails
                    errors.append(repr(exc))
                i += concurrency

        started = time.monotonic()
        threads = [threading.Thread(target=work, args=(w,)) for w in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
    if errors:
        raise RuntimeError(f"{len(errors)} calls failed, e.g. {errors[0]}")
    return done[0] / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("commit", help="the git commit to compare this working tree with")
    parser.add_argument("--model", default=str(ROOT / "models" / "blip-demo"), help="checkpoint (default: demo)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=40)
    args = parser.parse_args()
    images = scenes(args.images)
    results: dict[str, list[float]] = {args.commit: [], "this tree": []}
    with tempfile.TemporaryDirectory() as work:
        other = Path(work) / "other"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), args.commit], check=True,
                       capture_output=True)
        try:
            for _ in range(args.rounds):
                for name, tree in ((args.commit, other), ("this tree", ROOT)):
                    process = serve(tree, args.model, Path(work) / f"cache-{tree.name}")
                    try:
                        process.wait_ready(timeout=900)
                        rate = measure(process.address, images, args.concurrency, args.seconds)
                    finally:
                        code, log = process.stop()
                    if code != 0:
                        raise RuntimeError(f"blip-serve ({name}) exited {code}:\n{log[-3000:]}")
                    results[name].append(rate)
                    print(f"{name}: {rate:.3g} captions/s", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False)
    base = sum(results[args.commit]) / len(results[args.commit])
    ours = sum(results["this tree"]) / len(results["this tree"])
    print(f"{Path(args.model).name}, {args.concurrency} clients, {args.seconds:.0f} s a round, {args.rounds} rounds")
    for name, rates in results.items():
        print(f"  {name}: " + ", ".join(f"{r:.3g}" for r in rates) + " captions/s")
    print(f"  this tree / {args.commit}: {ours / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
