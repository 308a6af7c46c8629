"""Regenerate the Python code of the typed API: `python protos/generate_python.py`.

Writes `client/blip_client/protos/blip/caption/v1/caption_pb2{,_grpc}.py` and `.pyi` with grpc_tools.protoc.
The generated code lives inside the `blip_client` package, so its one cross-module import is rewritten to
that path; the protos keep their own file names (`blip/caption/v1/caption.proto`) for reflection and other
languages. Never edit the output by hand; a unit test checks it is current.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
PACKAGE = "blip_client.protos"
OUTPUT = ROOT / "client" / "blip_client" / "protos"
FILES = ["blip/caption/v1/caption.proto"]


def generate(output: Path) -> list[Path]:
    from grpc_tools import protoc

    output.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTOS}", f"--python_out={output}", f"--pyi_out={output}", f"--grpc_python_out={output}"]
    if protoc.main(args + [str(PROTOS / f) for f in FILES]) != 0:
        raise SystemExit("protoc failed")
    written = sorted(p for p in output.rglob("*.py*") if p.is_file())
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
