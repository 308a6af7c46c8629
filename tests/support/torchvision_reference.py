"""transformers' torchvision BlipImageProcessor, which this machine's test environment cannot import.

With torchvision installed, `AutoProcessor` picks the torchvision backend of `BlipImageProcessor`. torchvision
cannot be installed beside the CPU build of torch this package pins: the package index has only CUDA builds of
torchvision, each compiled against its own CUDA build of torch. So the reference runs in a virtual environment
of its own, built from the index with CUDA torch (which runs on a CPU), torchvision and this package's pins of
transformers, tokenizers, safetensors and Pillow, and hands back the pixels it computes. (A CPU build would be
lighter, but the index has none of torchvision, and no torchvision for this package's torch 2.13.0: each
torchvision requires its own torch release exactly.)

The environment (about 5.7 GB unpacked, a couple of minutes to build) is kept between runs by
`support.side_environment`, keyed by `PACKAGES` and this Python's version: only a first run, or a change of the
pins, builds it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from support import side_environment

PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "transformers==5.23.0", "tokenizers==0.23.3",
            "safetensors==0.8.0", "Pillow==13.0.0", "numpy<2"]

# Run inside that environment: argv = checkpoint, images directory, output .npz.
_SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np
from transformers import AutoProcessor
from transformers.image_utils import load_image
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

checkpoint, directory, output = sys.argv[1:]
processor = AutoProcessor.from_pretrained(checkpoint).image_processor
pil = BlipImageProcessorPil.from_pretrained(checkpoint)
names = json.loads((Path(directory) / "names.json").read_text())
arrays = {"picked": np.array([f"{type(processor).__name__}/{processor.backend}"])}
for name in names:
    image = load_image(str(Path(directory) / name))  # the pipeline's loading: EXIF orientation, RGB
    arrays["torchvision/" + name] = processor(images=image, return_tensors="np").pixel_values[0]
    arrays["pil/" + name] = pil(images=image, return_tensors="np").pixel_values[0]
np.savez(output, **arrays)
"""


class TorchvisionReference:
    """The cached environment with torchvision (built if missing); `pixels()` runs the checkpoint's processors
    there. `directory`: this run's scratch (the inputs and outputs of each `pixels()`)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.python: Path | None = None
        self._build: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._log = directory / "pip.log"

    def start_building(self) -> None:
        """Find the environment, or build it in the background (a couple of minutes of unpacking)."""
        def build():
            try:
                self.python = side_environment.environment(PACKAGES, timeout=900, log=self._log)
            except BaseException as exc:  # noqa: BLE001 - raised by ready()
                self._failure = exc

        self._build = threading.Thread(target=build, name="torchvision-environment", daemon=True)
        self._build.start()

    def ready(self, timeout: float = 900) -> None:
        self._build.join(timeout)
        if self._build.is_alive():
            raise RuntimeError(f"the torchvision environment was not built within {timeout} s ({self._log})")
        if self._failure is not None:
            raise RuntimeError(f"could not build the torchvision environment: {self._failure}")

    def pixels(self, checkpoint: Path,
               files: dict[str, bytes]) -> tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(the processor AutoProcessor picked, name -> torchvision pixels, name -> PIL pixels) of encoded files."""
        self.ready()
        work = self.directory / f"job-{len(list(self.directory.glob('job-*')))}"
        work.mkdir()
        for name, data in files.items():
            (work / name).write_bytes(data)
        (work / "names.json").write_text(json.dumps(sorted(files)))
        result = subprocess.run([str(self.python), "-c", _SCRIPT, str(checkpoint), str(work), str(work / "out.npz")],
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"the torchvision reference failed:\n{result.stderr[-4000:]}")
        with np.load(work / "out.npz") as arrays:
            picked = str(arrays["picked"][0])
            split = lambda kind: {n[len(kind) + 1:]: arrays[n] for n in arrays.files if n.startswith(kind + "/")}  # noqa: E731
            return picked, split("torchvision"), split("pil")


if __name__ == "__main__":  # cd tests && python -m support.torchvision_reference DIR: find or build it by hand
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    reference = TorchvisionReference(Path(sys.argv[1]))
    reference.start_building()
    reference.ready()
    print(reference.python)
