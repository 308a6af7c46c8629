"""`blip-bench`: the service measured as users run it.

    blip-bench run --preset large --output bench-large/   # against transformers, side by side (see benchmark)
    blip-bench run --quick --output bench-quick/          # the demo model in a minute or two
    blip-bench soak --minutes 10 --concurrency 32 --hostile 0.1 --output soak/
    blip-bench chaos --minutes 10 --concurrency 8 --kill-every 40 --output chaos/
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def _soak(args: argparse.Namespace) -> int:
    from blip_bench.processes import ServeProcess
    from blip_bench.soak import markdown, soak, write

    serve = None
    address, memory, kinds = args.server, (lambda: {}), (lambda: {})
    with tempfile.TemporaryDirectory() as cache:
        if address is None:
            model = ["--model", str(args.model)] if args.model else []
            serve = ServeProcess(*model, *args.serve_arg, cache=Path(cache))
            serve.wait_ready(timeout=900)
            address, memory, kinds = serve.address, serve.memory, serve.memory_kinds
        try:
            report = soak(address, memory, args.minutes, args.concurrency, args.hostile, seed=args.seed,
                          warmup=args.warmup, exclude=tuple(args.exclude), memory_kinds=kinds,
                          settle=args.settle)
        finally:
            code = serve.stop()[0] if serve else 0
    summary = write(report, args.output)
    text = markdown(summary)
    (args.output / "soak.md").write_text(text + "\n")
    print(text)
    growth = summary["at_rest"].get("growth", 0.0)
    failed = summary["lost"] or summary["unexpected"] or summary["inconsistent_captions"] or code != 0
    if growth > args.max_pss_growth:
        print(f"The memory retained at rest grew {growth:.1%} after the warm-up: more than {args.max_pss_growth:.0%}",
              file=sys.stderr)
        failed = True
    return 1 if failed else 0


def _chaos(args: argparse.Namespace) -> int:
    from blip_bench.chaos import chaos, markdown, write
    from blip_bench.processes import ServeProcess

    with tempfile.TemporaryDirectory() as cache:
        model = ["--model", str(args.model)] if args.model else []
        serve = ServeProcess(*model, "--response-cache-mb", "0", *args.serve_arg, cache=Path(cache))
        try:
            serve.wait_ready(timeout=900)
            report = chaos(serve, args.minutes, args.concurrency, args.kill_every, seed=args.seed)
        finally:
            code, log = serve.stop()
    summary = write(report, args.output)
    (args.output / "blip-serve.log").write_text(log)
    text = markdown(summary)
    (args.output / "chaos.md").write_text(text + "\n")
    print(text)
    if code != 0:
        print(f"blip-serve exited {code}: see {args.output / 'blip-serve.log'}", file=sys.stderr)
    return 1 if summary["lost"] or summary["inconsistent_captions"] or code != 0 else 0


def _run(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # found now, not after minutes of measuring
        print("blip-bench run plots with matplotlib, a dependency of blip-caption-bench: pip install -e ./bench",
              file=sys.stderr)
        return 2

    from blip_bench.benchmark import Settings, run
    from blip_bench.report import write
    from blip_demo.random_checkpoint import CheckpointSpec, build
    from blip_server.model_store import demo_checkpoint
    from blip_server.shared.cpu_turns import available_cores

    ints = lambda text: tuple(int(v) for v in text.split(","))  # noqa: E731
    with tempfile.TemporaryDirectory() as work:
        checkpoint = args.model
        if checkpoint is None and args.preset:
            checkpoint = build(CheckpointSpec(preset=args.preset, seed=0), Path(work) / f"blip-{args.preset}-random")
        checkpoint = checkpoint or demo_checkpoint()
        quick = args.quick
        settings = Settings(
            checkpoint=Path(checkpoint), images=args.images or (12 if quick else 32),
            concurrency=ints(args.concurrency or ("1,4" if quick else "1,4,8,16")),
            precisions=tuple((args.precision or ("fp32" if quick else "fp32,int8")).split(",")),
            beams=args.beams, tokens=args.tokens, batch_sizes=ints(args.batch_sizes or ("1,4" if quick else "1,4,8")),
            # transformers gets the threads the service's models start: the cores, capped by a container's CPU limit
            threads=available_cores(), overtaking=not quick,
            repeat_shares=tuple(float(v) for v in args.repeat_share.split(",")) if args.repeat_share else (),
        )
        results = run(settings)
    print(write(results, args.output))
    fp32 = [r for r in results["service"].get("fp32", {}).get("rows", []) if "identical_share" in r]
    return 1 if any(r["identical_share"] < 1.0 for r in fp32) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip-bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("run", help="the service against transformers, side by side")
    bench.add_argument("--model", type=Path, help="checkpoint directory (default: --preset, else the demo model)")
    bench.add_argument("--preset", choices=("tiny", "base", "large"), help="build a random checkpoint of this "
                       "architecture (not committed; exactly --tokens new tokens make its cost real)")
    bench.add_argument("--quick", action="store_true", help="a short run (the CI smoke test)")
    bench.add_argument("--images", type=int)
    bench.add_argument("--concurrency", help="comma-separated (default 1,4,8,16; quick: 1,4)")
    bench.add_argument("--precision", help="comma-separated (default fp32,int8; quick: fp32)")
    bench.add_argument("--batch-sizes", help="transformers' batches to try (default 1,4,8)")
    bench.add_argument("--beams", type=int, default=3)
    bench.add_argument("--tokens", type=int, default=20, help="new tokens per caption, exactly")
    bench.add_argument("--repeat-share", help="comma-separated shares of requests repeating an image sent before, "
                       "e.g. 0,0.5: throughput through the gateway with Triton's response cache for each (default: "
                       "none of these rows; the other rows run without the cache)")
    bench.add_argument("--output", type=Path, default=Path("bench-results"))
    soak = commands.add_parser("soak", help="minutes of load with hostile files; calls and memory accounted for")
    soak.add_argument("--model", type=Path, help="checkpoint or repository for blip-serve (default: the demo model)")
    soak.add_argument("--server", help="soak a running gateway HOST:PORT instead (no memory readings)")
    soak.add_argument("--serve-arg", action="append", default=[], help="extra blip-serve argument (repeat)")
    soak.add_argument("--minutes", type=float, default=10.0)
    soak.add_argument("--concurrency", type=int, default=32)
    soak.add_argument("--hostile", type=float, default=0.1, help="share of calls with hostile files")
    soak.add_argument("--warmup", type=float, default=60.0, help="seconds before PSS growth is counted")
    soak.add_argument("--max-pss-growth", type=float, default=0.05, help="of the memory retained at rest")
    soak.add_argument("--settle", type=float, default=5.0,
                      help="seconds at rest before the memory is read (after the warm-up and at the end)")
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--exclude", action="append", default=[], metavar="SAMPLE",
                      help="leave a sample of the corpus out (repeat)")
    soak.add_argument("--output", type=Path, default=Path("soak"))
    chaos = commands.add_parser("chaos", help="load while the server's processes are killed in turn; no call may "
                                "be lost")
    chaos.add_argument("--model", type=Path, help="checkpoint or repository for blip-serve (default: the demo model)")
    chaos.add_argument("--serve-arg", action="append", default=[], help="extra blip-serve argument (repeat)")
    chaos.add_argument("--minutes", type=float, default=10.0)
    chaos.add_argument("--concurrency", type=int, default=8)
    chaos.add_argument("--kill-every", type=float, default=40.0, help="seconds between kills (tritonserver, then "
                       "the preprocess, vision_encoder and text_decoder stubs, in turn)")
    chaos.add_argument("--seed", type=int, default=0)
    chaos.add_argument("--output", type=Path, default=Path("chaos"))
    args = parser.parse_args(argv)
    return {"run": _run, "soak": _soak, "chaos": _chaos}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
