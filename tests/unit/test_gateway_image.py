"""What the gateway image installs: the product alone. docker/gateway/Dockerfile copies some paths of the source
tree and runs `pip install --no-deps .` on them; this test copies the same paths (read from the Dockerfile's COPY
lines), builds the wheel pip would install from them, and reads its file list: the packages blip_server and
blip_client, no module of the benchmark, the soak, the demo model or the test helpers (blip_bench, blip_demo), and
the product's commands only."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "gateway" / "Dockerfile"
PACKAGES = {"blip_server", "blip_client"}
COMMANDS = {"blip-serve", "blip-export", "blip-gateway", "blip-caption"}
# Lab code, by package or module name: none of it belongs in the image.
LAB = {"blip_bench", "blip_demo", "bench", "demo", "soak", "random_checkpoint", "processes", "train"}


def _copies(dockerfile: Path) -> tuple[PurePosixPath, list[tuple[list[str], str]]]:
    """(WORKDIR, [(sources, destination)]) of the Dockerfile's COPY lines from the build context (not --from)."""
    workdir, copies = PurePosixPath("/"), []
    for line in dockerfile.read_text().replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0].upper() == "WORKDIR":
            workdir = workdir / words[1]
        elif words[0].upper() == "COPY":
            args = words[1:]
            if any(a.startswith("--from") for a in args):
                continue
            args = [a for a in args if not a.startswith("--")]
            copies.append((args[:-1], args[-1]))
    return workdir, copies


def _stage(dockerfile: Path, into: Path) -> Path:
    """The image's WORKDIR as the COPY lines leave it, under `into`; returns that directory."""
    workdir, copies = _copies(dockerfile)
    assert copies, f"no COPY line in {dockerfile}"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")  # as .dockerignore leaves them out
    for sources, destination in copies:
        target = PurePosixPath(destination)
        target = target if target.is_absolute() else workdir / target
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"{dockerfile.name} copies {source}, which is not in the source tree"
            into_dir = destination.endswith("/") or len(sources) > 1
            local = into / target.relative_to("/")
            if into_dir:
                local = local / path.name
            local.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, local, ignore=ignore, dirs_exist_ok=True)
            else:
                shutil.copy2(path, local)
    return into / workdir.relative_to("/")


def _wheel(source: Path, out: Path) -> zipfile.ZipFile:
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel)


def _entry_points(wheel: zipfile.ZipFile) -> dict[str, str]:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(name).decode())
    return dict(parser["console_scripts"]) if parser.has_section("console_scripts") else {}


def test_the_gateway_image_installs_the_product_and_no_lab_code(tmp_path):
    workdir = _stage(DOCKERFILE, tmp_path / "image")
    wheel = _wheel(workdir, tmp_path / "wheel")
    names = [PurePosixPath(n) for n in wheel.namelist()]
    code = [n for n in names if not n.parts[0].endswith((".dist-info", ".data"))]
    assert {n.parts[0] for n in code} == PACKAGES, sorted({n.parts[0] for n in code})
    assert not (lab := [str(n) for n in code if LAB & {*n.parts[:-1], n.stem}]), f"lab code in the image: {lab}"
    assert not [n for n in names if n.parts[0].endswith(".data")], "scripts or data outside the packages"
    commands = _entry_points(wheel)
    assert set(commands) == COMMANDS, commands
    for command, target in commands.items():  # each command runs code of the wheel itself
        module = target.split(":")[0].replace(".", "/")
        assert {f"{module}.py", f"{module}/__init__.py"} & {str(n) for n in code}, f"{command} = {target}"
