"""Several models side by side in one Triton: `blip-serve --model NAME=PATH` repeated.

Each model is exported (and cached) on its own, as for one; what Triton serves is one model repository that holds
them all, built here from the exported ones:

- the first model, the default, keeps the Triton names of an export (`blip_caption`, `blip_caption_cached`,
  `preprocess`, `vision_encoder`, `text_decoder`), so Triton-native clients and single-model deployments see what
  they always saw; every other model NAME is served as `NAME.blip_caption`, `NAME.preprocess`, ... (a name has no
  `/`, and the part after its last dot names the model, so no two models' names can meet);
- each model's directory holds its configs, rewritten with its Triton names (`name`, and the ensemble's steps),
  and links to (or copies of) the export's other files: version directories, which hold the weights;
- the default ensemble's config lists every model served (`ensemble.CATALOG_PARAMETER`, JSON, the default first),
  which is how any gateway in front of the server finds them, `blip-gateway` over remote replicas included.

    python -m blip_server.served_models --model demo=/exports/demo --model large=/exports/large \\
        --output /models/repository [--copy]

writes such a repository for a Triton of its own (Compose, Kubernetes): with `--copy` the files are copied
rather than linked (relative links otherwise, which hold when the exports and the output move together).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from blip_server.ensemble import CATALOG_PARAMETER
from blip_server.repository import CACHED_ENSEMBLE, ENSEMBLE, MODELS, is_model_repository, parse_config, read_manifest

# A model's name: what callers send in CaptionRequest.model, and the prefix of its Triton models.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class ModelArgument:
    """One `--model` of blip-serve: a name and the checkpoint or exported repository it serves (None: the demo)."""

    name: str
    path: Path | None


def check_name(name: str, what: str) -> str:
    if not NAME.fullmatch(name):
        raise ValueError(f"{what}: a model's name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
                         f"or digit; {name!r} is not")
    return name


def parse_model_argument(text: str) -> ModelArgument:
    """`NAME=PATH`, or `PATH` alone (named after its folder)."""
    name, sep, path = text.partition("=")
    if sep and NAME.fullmatch(name):
        if not path:
            raise ValueError(f"--model {text}: give the checkpoint or repository after {name}=")
        return ModelArgument(name, Path(path))
    folder = Path(text).resolve().name
    return ModelArgument(check_name(folder, f"--model {text} (named after its folder; give NAME=PATH)"), Path(text))


def parse_model_arguments(texts: Sequence[str], default_name: str = "blip-demo") -> list[ModelArgument]:
    """Every `--model`, in order (the first is the default); none: the demo checkpoint. Names must differ."""
    models = [parse_model_argument(t) for t in texts] or [ModelArgument(default_name, None)]
    seen: set[str] = set()
    for model in models:
        if model.name in seen:
            raise ValueError(f"two --model arguments are named {model.name!r}: name them apart with NAME=PATH")
        seen.add(model.name)
    return models


def triton_name(name: str, model: str, default: bool) -> str:
    """The Triton name of `model` (`blip_caption`, `preprocess`, ...) of the served model `name`."""
    return model if default else f"{name}.{model}"


def catalog_entry(name: str, default: bool) -> dict[str, str]:
    return {"name": name, "ensemble": triton_name(name, ENSEMBLE, default),
            "cached_ensemble": triton_name(name, CACHED_ENSEMBLE, default),
            "preprocess": triton_name(name, "preprocess", default)}


def _rewrite_config(source: Path, target: Path, names: dict[str, str], catalog: list[dict[str, str]] | None) -> None:
    config = parse_config(source)
    config.name = names.get(config.name, config.name)
    for step in config.ensemble_scheduling.step:
        step.model_name = names.get(step.model_name, step.model_name)
    if catalog is not None:
        config.parameters[CATALOG_PARAMETER].string_value = json.dumps(catalog)
    target.write_text(f"# {source} with the names it is served under (blip_server.served_models).\n"
                      + text_format.MessageToString(config))


def _place(source: Path, target: Path, copy: bool) -> None:
    if copy:
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    else:
        target.symlink_to(os.path.relpath(source.resolve(), target.parent.resolve()))


def combine(models: Sequence[tuple[str, Path]], output: Path, copy: bool = False) -> list[dict[str, str]]:
    """One model repository at `output` (created; it must not exist or be empty) serving each (name, exported
    repository) of `models`, the first as the default. Returns the catalog written into it."""
    if not models:
        raise ValueError("no model to serve")
    catalog = [catalog_entry(name, i == 0) for i, (name, _) in enumerate(models)]
    output.mkdir(parents=True, exist_ok=True)
    if any(output.iterdir()):
        raise ValueError(f"{output} is not empty")
    for i, (name, repository) in enumerate(models):
        check_name(name, str(repository))
        if not is_model_repository(repository):
            raise ValueError(f"{repository} is not an exported model repository")
        missing = [model for model in MODELS if not (repository / model / "config.pbtxt").is_file()]
        if missing:
            raise ValueError(f"{repository} lacks {', '.join(missing)}: it was exported by an older blip-export; "
                             "export it again")
        names = {model: triton_name(name, model, i == 0) for model in MODELS}
        for model, served in names.items():
            source, target = repository / model, output / served
            target.mkdir()
            for entry in sorted(source.iterdir()):
                if entry.name == "config.pbtxt":
                    _rewrite_config(entry, target / entry.name, names,
                                    catalog if i == 0 and model == ENSEMBLE else None)
                elif entry.name == "configs" and entry.is_dir():  # per-device configs (configs/gpu.pbtxt)
                    (target / "configs").mkdir()
                    for config in sorted(entry.glob("*.pbtxt")):
                        _rewrite_config(config, target / "configs" / config.name, names, None)
                elif entry.name != "__pycache__":
                    _place(entry, target / entry.name, copy)
    (output / "blip_served_models.json").write_text(json.dumps(
        [{**entry, "repository": str(repository.resolve()), "manifest": read_manifest(repository)}
         for entry, (_, repository) in zip(catalog, models, strict=True)], indent=2) + "\n")
    return catalog


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip_server.served_models",
                                     description="One Triton model repository serving several exported ones.")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=REPOSITORY",
                        help="an exported repository (blip-export's output) and its name; repeat; the first is "
                             "the default")
    parser.add_argument("--output", type=Path, required=True, help="the repository to write (new or empty)")
    parser.add_argument("--copy", action="store_true", help="copy the exports' files instead of linking them")
    args = parser.parse_args(argv)
    try:
        models = parse_model_arguments(args.model)
        combine([(m.name, m.path) for m in models if m.path is not None], args.output, copy=args.copy)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(args.output.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
