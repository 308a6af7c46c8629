"""Regenerate the Python code of the typed API: `python protos/generate_python.py`.

Writes `client/blip_client/protos/blip/caption/v1/caption_pb2{,_grpc}.py` with grpc_tools.protoc, and their
typed stubs `caption_pb2{,_grpc}.pyi` with mypy-protobuf's protoc plugins (protoc-gen-mypy, protoc-gen-mypy_grpc:
looked up next to this Python, then on PATH). The generated code lives inside the `blip_client` package, so its
cross-module import is rewritten to that path; the protos keep their own file names
(`blip/caption/v1/caption.proto`) for reflection and other languages. Never edit the output by hand; a unit test
checks it is current.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
PACKAGE = "blip_client.protos"
OUTPUT = ROOT / "client" / "blip_client" / "protos"
FILES = ["blip/caption/v1/caption.proto"]
PLUGINS = ["protoc-gen-mypy", "protoc-gen-mypy_grpc"]


def plugin(name: str) -> Path:
    """A protoc plugin installed with this Python (its virtual environment's bin/), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: pip install mypy-protobuf")
    return Path(found)


def generate(output: Path) -> list[Path]:
    from grpc_tools import protoc  # type: ignore[import-untyped]  # grpcio-tools ships no types

    output.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTOS}", f"--python_out={output}", f"--grpc_python_out={output}",
            f"--mypy_out=quiet:{output}", f"--mypy_grpc_out=quiet:{output}"]
    args += [f"--plugin={name}={plugin(name)}" for name in PLUGINS]
    if protoc.main(args + [str(PROTOS / f) for f in FILES]) != 0:
        raise SystemExit("protoc failed")
    written = sorted(p for p in output.rglob("*.py*") if p.is_file() and p.suffix in (".py", ".pyi"))
    for path in written:
        text = path.read_text()
        text = text.replace("from blip.caption.v1 import", f"from {PACKAGE}.blip.caption.v1 import")
        path.write_text(text)
    for directory in {p.parent for p in written} | {output, output / "blip", output / "blip" / "caption"}:
        (directory / "__init__.py").touch()
    return written


def main() -> int:
    for path in generate(OUTPUT):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
