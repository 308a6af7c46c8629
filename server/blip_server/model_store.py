"""Which model repository to serve: an exported one as given, or a checkpoint exported once and cached.

A checkpoint is exported on first use into `<cache>/repositories/<key>`, where the key hashes the checkpoint's
content together with everything the export depends on (the model repository template, the export code, the
precision): the same checkpoint is never exported twice, and a changed one never served stale.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import subprocess
import sys
from pathlib import Path

from blip_server.checkpoint import check_layout, content_digest
from blip_server.errors import ExportError, ModelNotFoundError
from blip_server.export import ExportOptions, export_checkpoint, export_fingerprint
from blip_server.repository import MANIFEST, is_model_repository

log = logging.getLogger(__name__)

DEFAULT_EXPORT_OPTIONS = ExportOptions()  # frozen: one instance serves as every call's default


def demo_checkpoint() -> Path:
    """The demo checkpoint shipped in the source tree (`models/blip-demo`)."""
    return Path(__file__).resolve().parents[2] / "models" / "blip-demo"


def export_in_child(checkpoint: Path, output: Path, options: ExportOptions) -> None:
    """`blip-export` in a short-lived process of its own: torch and transformers, which only the export needs,
    never load into the long-running server (their memory would stay with it). An interrupt stops the child; a
    half-written export is never renamed into place and is cleared by the next one."""
    command = [sys.executable, "-m", "blip_server.export", "--model", str(checkpoint), "--output", str(output),
               "--precision", options.precision, "--target", options.target,
               "--image-processor", options.image_processor]
    result = subprocess.run(command, stdout=subprocess.DEVNULL)  # its log and errors go to our stderr
    if result.returncode != 0:
        raise ExportError(f"exporting {checkpoint} failed (blip-export exited with status {result.returncode}; "
                          "its message is above)")


def resolve_repository(model: Path | None, cache_dir: Path, options: ExportOptions = DEFAULT_EXPORT_OPTIONS,
                       export=export_checkpoint) -> Path:
    """The model repository to serve for `model` (None: the demo checkpoint); `export` makes it when needed."""
    model = Path(model) if model is not None else demo_checkpoint()
    if not model.exists():
        raise ModelNotFoundError(f"--model {model} does not exist")
    if is_model_repository(model):
        return model
    try:
        check_layout(model)
    except ExportError as exc:
        raise ModelNotFoundError(
            f"{exc}; --model takes a checkpoint directory or an exported model repository") from None
    key = hashlib.sha256((content_digest(model) + export_fingerprint(options)).encode()).hexdigest()[:24]
    repositories = cache_dir / "repositories"
    repositories.mkdir(parents=True, exist_ok=True)
    target = repositories / key
    with open(repositories / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another blip-serve may be exporting the same checkpoint
        if (target / MANIFEST).is_file():
            log.info("using %s, exported earlier from %s", target, model)
            return target
        log.info("exporting %s to %s (once; later starts reuse it)", model, target)
        export(model, target, options)
    return target
