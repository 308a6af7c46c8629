"""`blip-caption`: caption image files with a running caption server.

    blip-caption photo.jpg
    blip-caption --json --num-beams 5 --concurrency 16 images/*.jpg > captions.jsonl

With --json, one JSON object per image on stdout, in the order given:
{"image": PATH, "captions": [{"text": ..., "score": ...}]} or {"image": PATH, "error": {"code": ..., "message": ...}}.
A progress bar goes to stderr when there are several images. The exit status is 1 when any image failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from blip_client._client import CaptionClient
from blip_client._errors import CaptionError
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
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files")
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
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("give both --tls-cert and --tls-key, or neither")
    if not 0 <= args.retries <= 4:
        parser.error("--retries must be 0 to 4")
    return args


def _options(args: argparse.Namespace) -> GenerationOptions:
    # Each value has its own field's type (argparse checked it), which one dict's value type cannot say per key.
    values: dict[str, Any] = {}
    for field, _, _ in OPTION_FLAGS.values():
        value = getattr(args, field)
        values[field] = tuple(value) if isinstance(value, list) else value
    return GenerationOptions(**values)


def _caption_file(client: CaptionClient, path: str, args: argparse.Namespace,
                  options: GenerationOptions) -> CaptionResult | CaptionError:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return CaptionError(f"cannot read {path}: {exc.strerror}", grpc.StatusCode.NOT_FOUND)
    try:
        return client.caption(data, prompt=args.prompt, options=options, timeout=args.timeout)
    except CaptionError as error:
        return error


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = _options(args)
    failures = 0
    progress = None
    if len(args.paths) > 1 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(args.paths), unit="image", file=sys.stderr, dynamic_ncols=True)
    client = CaptionClient(args.server, api_key=args.api_key, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                           tls_key=args.tls_key, retry=RetryPolicy(max_attempts=args.retries + 1), model=args.model)
    with client, ThreadPoolExecutor(args.concurrency) as pool:
        futures = [pool.submit(_caption_file, client, path, args, options) for path in args.paths]
        for path, future in zip(args.paths, futures, strict=True):
            outcome = future.result()
            failures += isinstance(outcome, CaptionError)
            if progress is not None:
                progress.clear()
            _report(path, outcome, args.json)
            if progress is not None:
                progress.update(1)
    if progress is not None:
        progress.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
