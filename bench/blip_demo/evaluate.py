"""`blip-demo-evaluate`: exact-caption accuracy of the demo model through the full served stack.

    blip-demo-evaluate                      # starts blip-serve on free ports, 500 fresh scenes, then stops it
    blip-demo-evaluate --server HOST:PORT   # a caption server that is already running

It renders a held-out set (a seed the training never used) with the same variety as training (canvas sizes,
positions, colour jitter, JPEG quality, EXIF orientations), captions every scene twice through the typed
gRPC API (without a prompt, and with `a picture of`) using the service's default options, and counts exact
matches with the scene's caption.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from blip_bench.processes import ServeProcess
from blip_demo.scenes import PROMPT, encode, render

EVALUATION_SEED = 20_261_129


def scenes(count: int, seed: int = EVALUATION_SEED) -> list[tuple[bytes, str]]:
    rng = random.Random(seed)
    return [(encode(scene, rng), scene.caption) for scene in (render(rng) for _ in range(count))]


def measure(address: str, held_out: list[tuple[bytes, str]], concurrency: int = 8) -> dict:
    from blip_client import CaptionClient, CaptionError

    report = {"scenes": len(held_out)}
    with CaptionClient(address, timeout=120) as client:
        for name, prompt, prefix in (("unconditional", "", ""), ("prompted", PROMPT, PROMPT + " ")):
            results = client.caption_many([d for d, _ in held_out], prompt=prompt, concurrency=concurrency,
                                          return_exceptions=True)
            wrong = [
                {"expected": prefix + caption, "got": str(r) if isinstance(r, CaptionError) else r.text}
                for (_, caption), r in zip(held_out, results, strict=True)
                if isinstance(r, CaptionError) or r.text != prefix + caption
            ]
            report[name] = {"accuracy": 1 - len(wrong) / len(held_out), "wrong": wrong}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip-demo-evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", help="a running caption server HOST:PORT (default: start blip-serve)")
    parser.add_argument("--model", type=Path, help="checkpoint for the started server (default: the demo)")
    parser.add_argument("--precision", default="fp32", help="precision of the started server (fp32 or int8)")
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=EVALUATION_SEED)
    parser.add_argument("--output", type=Path, help="write the full report (with every wrong caption) here")
    args = parser.parse_args(argv)

    held_out = scenes(args.scenes, args.seed)
    server, address = None, args.server
    if address is None:
        server = ServeProcess(*(["--model", str(args.model)] if args.model else []), "--precision", args.precision,
                              show_log=True)
        server.wait_ready(timeout=600)
        address = server.address
    try:
        started = time.monotonic()
        report = measure(address, held_out)
        report["seconds"] = round(time.monotonic() - started, 1)
    finally:
        if server is not None:
            server.stop()
    report["seed"] = args.seed
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    for name in ("unconditional", "prompted"):
        part = report[name]
        print(f"{name}: {part['accuracy']:.1%} exact ({args.scenes - len(part['wrong'])}/{args.scenes})")
        for miss in part["wrong"][:5]:
            print(f"    expected {miss['expected']!r}, got {miss['got']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
