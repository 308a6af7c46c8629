"""NVIDIA's Triton image runs Python 3.10, for which the last Pillow is 12.3.0; parity is measured here on 13.0.0
(pyproject.toml). Preprocessing decodes, orients, converts and resizes with Pillow, so the two must give the same
pixels: this runs `preprocess` on the same files under Pillow 12.3.0 (the version docker/triton/requirements.txt
pins, in an environment of its own) and under this environment's Pillow, and requires identical pixel values and
identical refusals."""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import PIL
import pytest
from image_header import ImageLimits
from image_preprocessing import ImageProcessorConfig, preprocess

from blip_bench.corpus import corpus
from blip_demo.scenes import encode, render
from support import images, side_environment

ROOT = Path(__file__).resolve().parents[2]
_NUMPY = "numpy==1.26.4"

# Run in the other environment: argv = image processor config, images directory, output .npz.
_SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np
import PIL
from image_header import ImageLimits
from image_preprocessing import ImageProcessorConfig, preprocess

config, directory, output = sys.argv[1:]
config = ImageProcessorConfig.from_json(Path(config))
arrays = {"version": np.array([PIL.__version__])}
for name in json.loads((Path(directory) / "names.json").read_text()):
    try:
        arrays["pixels/" + name] = preprocess((Path(directory) / name).read_bytes(), config, ImageLimits())
    except Exception as exc:
        arrays["error/" + name] = np.array([type(exc).__name__ + ": " + str(exc)])
np.savez(output, **arrays)
"""


def _container_pillow() -> str:
    text = (ROOT / "docker" / "triton" / "requirements.txt").read_text()
    return re.search(r"^(Pillow==[\d.]+)$", text, re.M).group(1)


def _files() -> dict[str, bytes]:
    files = {f"kind_{name}": data for name, data in images.kinds(seed=71).items()}
    files.update({f"corpus_{name}": sample.data for name, sample in corpus(seed=3, phone_photo=False).items()})
    rng = random.Random(29)
    files.update({f"scene_{i}": encode(render(rng), rng) for i in range(24)})
    files.update({f"example_{p.name}": p.read_bytes() for p in sorted((ROOT / "examples").glob("*.jpg"))})
    # Sizes on both sides of Pillow 13's choice of which pass runs first (height shrinking by more than twice the
    # width, or not), for a 224 and a 384 target.
    for i, (width, height) in enumerate([(90, 700), (300, 700), (500, 1500), (400, 900), (700, 800), (1000, 1100),
                                         (150, 260), (260, 150), (384, 1000), (1200, 390)]):
        files[f"size_{width}x{height}"] = images.encode(images.rgb(width, height, seed=i), "PNG")
    return files


def _here(config: ImageProcessorConfig, files: dict[str, bytes]) -> dict[str, object]:
    outcomes = {}
    for name, data in files.items():
        try:
            outcomes[name] = preprocess(data, config, ImageLimits())
        except Exception as exc:  # noqa: BLE001 - a refusal is an outcome to compare
            outcomes[name] = f"{type(exc).__name__}: {exc}"
    return outcomes


@pytest.mark.parametrize("name", ["standard", "unusual"])
def test_the_containers_pillow_gives_the_same_pixels(repositories, tmp_path, name):
    pillow = _container_pillow()
    python = side_environment.environment([pillow, _NUMPY])
    config_path = repositories[name] / "preprocess" / "1" / "image_processor.json"
    files = _files()
    for file, data in files.items():
        (tmp_path / file).write_bytes(data)
    (tmp_path / "names.json").write_text(json.dumps(sorted(files)))
    path = [str(ROOT / "model_repository" / "preprocess" / "1"), str(ROOT / "server" / "blip_server" / "shared")]
    run = subprocess.run([str(python), "-c", f"import sys; sys.path[:0] = {path!r}\n" + _SCRIPT, str(config_path),
                          str(tmp_path), str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    ours = _here(ImageProcessorConfig.from_json(config_path), files)
    with np.load(tmp_path / "out.npz") as theirs:
        assert str(theirs["version"][0]) == pillow.split("==")[1] != PIL.__version__  # two different releases
        decoded = 0
        for file in sorted(files):
            if isinstance(ours[file], str):
                assert f"error/{file}" in theirs.files, f"{file}: refused here ({ours[file]}) but decoded by {pillow}"
                assert str(theirs[f"error/{file}"][0]) == ours[file], file
            else:
                assert f"pixels/{file}" in theirs.files, f"{file}: decoded here but refused by {pillow}"
                np.testing.assert_array_equal(theirs[f"pixels/{file}"], ours[file], err_msg=file)
                decoded += 1
    assert decoded >= 60  # most of the files are images, of every format and mode preprocessing takes
