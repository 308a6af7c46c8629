"""`blip-bench`: the service measured as users run it.

    blip-bench soak --minutes 10 --concurrency 32 --hostile 0.1 --output soak/
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def _soak(args: argparse.Namespace) -> int:
    from blip_server.bench.soak import markdown, soak, write
    from blip_server.processes import ServeProcess

    serve = None
    address, memory = args.server, (lambda: {})
    with tempfile.TemporaryDirectory() as cache:
        if address is None:
            model = ["--model", str(args.model)] if args.model else []
            serve = ServeProcess(*model, *args.serve_arg, cache=Path(cache))
            serve.wait_ready(timeout=900)
            address, memory = serve.address, serve.memory
        try:
            report = soak(address, memory, args.minutes, args.concurrency, args.hostile, seed=args.seed,
                          warmup=args.warmup)
        finally:
            code = serve.stop()[0] if serve else 0
    summary = write(report, args.output)
    text = markdown(summary)
    (args.output / "soak.md").write_text(text + "\n")
    print(text)
    growth = summary["rss"].get("growth", 0.0)
    failed = summary["lost"] or summary["unexpected"] or summary["inconsistent_captions"] or code != 0
    if growth > args.max_rss_growth:
        print(f"RSS grew {growth:.1%} after the warm-up: more than {args.max_rss_growth:.0%}", file=sys.stderr)
        failed = True
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip-bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    soak = commands.add_parser("soak", help="minutes of load with hostile files; calls and memory accounted for")
    soak.add_argument("--model", type=Path, help="checkpoint or repository for blip-serve (default: the demo model)")
    soak.add_argument("--server", help="soak a running gateway HOST:PORT instead (no memory readings)")
    soak.add_argument("--serve-arg", action="append", default=[], help="extra blip-serve argument (repeat)")
    soak.add_argument("--minutes", type=float, default=10.0)
    soak.add_argument("--concurrency", type=int, default=32)
    soak.add_argument("--hostile", type=float, default=0.1, help="share of calls with hostile files")
    soak.add_argument("--warmup", type=float, default=60.0, help="seconds before RSS growth is counted")
    soak.add_argument("--max-rss-growth", type=float, default=0.05)
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--output", type=Path, default=Path("soak"))
    args = parser.parse_args(argv)
    return _soak(args)


if __name__ == "__main__":
    sys.exit(main())
