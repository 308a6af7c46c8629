"""`blip-caption DIR --output FILE` against the real stack (blip-serve: gateway and Triton): a folder tree captioned
into JSON Lines and CSV, the run interrupted by SIGINT and by SIGKILL and run again, every image captioned exactly
once, with transformers' captions. (The walk, the record files and the memory bound: tests/unit/
test_caption_folders.py.)"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import images, reference

CLI = str(Path(sys.executable).parent / "blip-caption")
KINDS = images.kinds(seed=61)
FORMATS = {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "bmp": ".bmp", "gif_animated": ".gif", "tiff": ".tiff"}


def _tree(root: Path) -> dict[str, bytes]:
    """Nested folders of images (each kind once, then small distinct ones), other files and a corrupt image."""
    files = {}
    for i, (kind, extension) in enumerate(FORMATS.items()):
        files[f"kinds/{'nested/' * i}{kind}{extension}"] = KINDS[kind]
    for i in range(60):
        files[f"scenes/{i % 3}/{i}.png"] = images.encode(images.rgb(48, 40, seed=100 + i), "PNG")
    files["scenes/corrupt.jpg"] = b"\xff\xd8\xff not really a JPEG"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "scenes" / "README.txt").write_text("not an image")
    (root / "kinds" / "captions.json").write_text("{}")
    return {str(root / name): data for name, data in files.items()}


def _records(path: Path) -> list[dict]:
    """The records, read with the standard library alone: JSON Lines as they are, CSV rows as such objects."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [{"image": r["image"], "error": {"code": r["error_code"], "message": r["error_message"]}}
                if r["error_code"] else {"image": r["image"], "captions": [{"text": r["caption"],
                                                                             "score": float(r["score"])}]}
                for r in rows]
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("interruption, name", [(signal.SIGKILL, "captions.jsonl"), (signal.SIGINT, "captions.csv")],
                         ids=["sigkill-jsonl", "sigint-csv"])
def test_a_folder_tree_interrupted_and_run_again_has_every_image_captioned_once(service, tmp_path, interruption,
                                                                                 name):
    files = _tree(tmp_path / "photos")
    corrupt = str(tmp_path / "photos" / "scenes" / "corrupt.jpg")
    output = tmp_path / name
    command = [CLI, "--server", service.address, str(tmp_path / "photos"), "--output", str(output),
               "--concurrency", "2", "--num-beams", "2"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (output.exists() and output.read_bytes().count(b"\n") >= 6):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1]
            time.sleep(0.01)
        first.send_signal(interruption)
        _, stderr = first.communicate(timeout=60)
    finally:
        first.kill()
    before = _records(output)
    assert first.returncode == (130 if interruption == signal.SIGINT else -signal.SIGKILL), stderr
    assert 5 <= len(before) < len(files)  # it was stopped half-way
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1, again.stderr  # the corrupt image failed
    records = _records(output)
    kept = [r for r in before if "captions" in r]
    assert records[: len(kept)] == kept  # what the first run captioned stays as it was (a failure is tried again)
    assert sorted(r["image"] for r in records) == sorted(files)  # each image once, nothing else
    failed = [r for r in records if "error" in r]
    assert [(r["image"], r["error"]["code"]) for r in failed] == [(corrupt, "INVALID_ARGUMENT")]
    captions = {r["image"]: r["captions"] for r in records if "captions" in r}
    for path in [str(tmp_path / "photos" / "kinds" / "jpeg.jpg"), str(tmp_path / "photos" / "scenes" / "1" / "4.png")]:
        texts, scores = reference.caption(service.checkpoint, files[path], None, num_beams=2)
        assert captions[path][0]["text"] == texts[0]
        assert captions[path][0]["score"] == pytest.approx(scores[0], abs=1e-4)
    assert f"{len(files) - 1 - len(kept)} captioned, 1 failed, {len(kept)} already captioned" in again.stderr
