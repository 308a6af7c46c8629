"""`blip-caption`: caption image files with a running caption server.

    blip-caption photo.jpg
    blip-caption --json --num-beams 5 --concurrency 16 images/*.jpg > captions.jsonl
    blip-caption photos/ --glob '2024/*' --output captions.jsonl     # or .csv; a rerun goes on where it stopped

With --json, one JSON object per image on stdout, in the order given:
{"image": PATH, "captions": [{"text": ..., "score": ...}]} or {"image": PATH, "error": {"code": ..., "message": ...}}.
A folder is walked recursively for image files. With --output FILE, each image's record (those objects, or a CSV
row) is appended to FILE as its result arrives, and a rerun skips the images FILE has captions for (failed ones are
tried again; blip_client.RecordFile says more). A progress bar goes to stderr when there are several images. The
exit status is 1 when any image failed, 130 when interrupted (Ctrl-C: what has arrived is written, the rest
cancelled), 2 for a usage error or an output file that is not a record file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import typing
from collections.abc import Iterator
from types import FrameType
from typing import Any

from blip_client._client import CaptionClient
from blip_client._errors import CaptionError
from blip_client._folders import RecordFile, RecordsError, caption_files, find_images
from blip_client._requests import DEFAULT_TARGET, RetryPolicy
from blip_client._types import CaptionResult, GenerationOptions


def _option_flags() -> dict[str, tuple[str, type, bool]]:
    """flag -> (GenerationOptions field, type of its values, repeated): one flag per field of the SDK's options,
    named after it (`--num-beams`), typed by its annotation (`int | None`; `tuple[int, ...] | None` takes values)."""
    hints = typing.get_type_hints(GenerationOptions)
    flags = {}
    for field in dataclasses.fields(GenerationOptions):
        (kind,) = [a for a in typing.get_args(hints[field.name]) if a is not type(None)]
        repeated = typing.get_origin(kind) is tuple
        flags["--" + field.name.replace("_", "-")] = (field.name, typing.get_args(kind)[0] if repeated else kind,
                                                      repeated)
    return flags


OPTION_FLAGS = _option_flags()
_HELP = {"do_sample": "sample instead of searching"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="blip-caption", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders (walked recursively)")
    parser.add_argument("--server", default=os.environ.get("BLIP_SERVER", DEFAULT_TARGET),
                        help="caption server HOST:PORT (default: %(default)s; env BLIP_SERVER)")
    parser.add_argument("--prompt", default="", help="caption prefix, e.g. 'a picture of'")
    parser.add_argument("--model", default=os.environ.get("BLIP_CAPTION_MODEL", ""), metavar="NAME",
                        help="the served model to caption with (the server lists them: ListModels); default: the "
                             "server's default (env BLIP_CAPTION_MODEL)")
    for flag, (field, kind, repeated) in OPTION_FLAGS.items():
        if kind is bool:
            parser.add_argument(flag, dest=field, action="store_true", default=None, help=_HELP.get(field))
        else:
            parser.add_argument(flag, dest=field, type=kind, default=None, metavar=kind.__name__.upper(),
                                nargs="+" if repeated else None, help=_HELP.get(field))
    parser.add_argument("--concurrency", type=int, default=8, help="images in flight at once (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per image (default: %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("BLIP_API_KEY"), help="API key (env BLIP_API_KEY)")
    parser.add_argument("--tls-ca", metavar="PEM", help="CA certificate of a server that uses TLS")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate, for mutual TLS (with --tls-key)")
    parser.add_argument("--tls-key", metavar="PEM", help="client key, for mutual TLS (with --tls-cert)")
    parser.add_argument("--retries", type=int, default=3, metavar="N",
                        help="retries of an image answered UNAVAILABLE, 0 to 4 (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--glob", action="append", default=[], metavar="PATTERN",
                        help="in folders, only images whose path inside the folder matches (fnmatch, '*' crosses '/'; "
                             "repeatable)")
    parser.add_argument("--output", metavar="FILE",
                        help="append a record per image to FILE as results arrive (JSON Lines, or CSV if FILE ends in "
                             ".csv), skipping images FILE has captions for")
    parser.add_argument("--overwrite", action="store_true", help="with --output: start FILE anew")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("give both --tls-cert and --tls-key, or neither")
    if not 0 <= args.retries <= 4:
        parser.error("--retries must be 0 to 4")
    if args.overwrite and not args.output:
        parser.error("--overwrite needs --output")
    if args.json and args.output:
        parser.error("--json prints records on stdout, --output writes them to FILE: give one")
    if args.output and args.output.lower().endswith(".csv") and (args.num_return_sequences or 1) > 1:
        parser.error("a CSV record holds one caption: use a .jsonl --output for --num-return-sequences above 1")
    return args


def _options(args: argparse.Namespace) -> GenerationOptions:
    # Each value has its own field's type (argparse checked it), which one dict's value type cannot say per key.
    values: dict[str, Any] = {}
    for field, _, _ in OPTION_FLAGS.values():
        value = getattr(args, field)
        values[field] = tuple(value) if isinstance(value, list) else value
    return GenerationOptions(**values)


def _report(path: str, outcome: CaptionResult | CaptionError, as_json: bool) -> None:
    if as_json:
        line: dict[str, object]
        if isinstance(outcome, CaptionError):
            line = {"image": path, "error": {"code": outcome.code.name, "message": outcome.message}}
        else:
            line = {"image": path, "captions": [{"text": c.text, "score": c.score} for c in outcome.captions]}
        print(json.dumps(line, ensure_ascii=False), flush=True)
    elif isinstance(outcome, CaptionError):
        print(f"{path}: error: {outcome.code.name}: {outcome.message}", file=sys.stderr, flush=True)
    else:
        best, *others = outcome.captions
        print(f"{path}: {best.text}  (score {best.score:.4f})", flush=True)
        for caption in others:
            print(f"    {caption.text}  (score {caption.score:.4f})", flush=True)


def _interrupt_on_sigint(cancel: threading.Event) -> Any:
    """Ctrl-C sets `cancel` (results that arrived are still written, lines never torn); a second one stops at once.
    Returns the previous handler (None off the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupted(signum: int, frame: FrameType | None) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    return signal.signal(signal.SIGINT, interrupted)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = _options(args)
    try:
        records = RecordFile(args.output, overwrite=args.overwrite) if args.output else None
    except (RecordsError, OSError) as exc:
        print(f"blip-caption: {exc}", file=sys.stderr)
        return 2
    done = records.done if records is not None else set()
    failures = skipped = unreadable_folders = 0

    def unreadable(error: OSError) -> None:
        nonlocal unreadable_folders
        unreadable_folders += 1
        print(f"blip-caption: cannot read {error.filename}: {error.strerror}", file=sys.stderr, flush=True)

    def todo() -> Iterator[str]:
        nonlocal skipped
        for path in find_images(args.paths, glob=args.glob, on_error=unreadable):
            if path in done:
                skipped += 1
            else:
                yield path

    progress = None
    folders = any(os.path.isdir(path) for path in args.paths)
    total: list[int] = []
    if (len(args.paths) > 1 or folders) and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=None if folders or done else len(args.paths), unit="image", file=sys.stderr,
                        dynamic_ncols=True)
        if progress.total is None:  # the images left are counted by a walk of their names, beside the captioning
            walk = find_images(args.paths, glob=args.glob)
            threading.Thread(target=lambda: total.append(sum(p not in done for p in walk)), daemon=True).start()
    cancel = threading.Event()
    previous = _interrupt_on_sigint(cancel)
    client = CaptionClient(args.server, api_key=args.api_key, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                           tls_key=args.tls_key, retry=RetryPolicy(max_attempts=args.retries + 1), model=args.model)
    written = 0
    try:
        for path, outcome in caption_files(client, todo(), prompt=args.prompt, options=options, timeout=args.timeout,
                                           concurrency=args.concurrency, ordered=records is None, cancel=cancel):
            failures += isinstance(outcome, CaptionError)
            if records is not None:
                records.write(path, outcome)
            else:
                if progress is not None:
                    progress.clear()
                _report(path, outcome, args.json)
            written += 1
            if progress is not None:
                if total and progress.total is None:
                    progress.total = total[0]
                if failures:
                    progress.set_postfix(failed=failures, refresh=False)
                progress.update(1)
    except KeyboardInterrupt:  # a second Ctrl-C
        cancel.set()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        client.close()  # cancels the calls still in flight
        if records is not None:
            records.close()
        if progress is not None:
            if total and progress.total is None:
                progress.total = total[0]
            progress.close()
    if records is not None:
        print(f"blip-caption: {written - failures} captioned, {failures} failed, {skipped} already captioned: "
              f"{records.path}", file=sys.stderr)
    if cancel.is_set():
        print("blip-caption: interrupted" + (" (the same command goes on where it stopped)" if records else ""),
              file=sys.stderr)
        return 130
    return 1 if failures or unreadable_folders else 0


if __name__ == "__main__":
    sys.exit(main())
