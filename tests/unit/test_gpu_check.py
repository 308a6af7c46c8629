"""bench/gpu_check.py, the prepared script for a lent GPU machine, run here on the CPU with a tiny model: the same
code path (ONNX encoder, our decoder, transformers beside it), so it is known to work before a GPU is spent on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_and_agrees_with_transformers_in_fp32(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--preset", "tiny",
         "--precisions", "fp32", "--batches", "1,3", "--repeats", "2", "--tokens", "6", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["precision"], r["batch"], r["captions"]) for r in results["rows"]] == [("float32", 1, 2), ("float32", 3, 6)]
    for row in results["rows"]:
        assert row["captions_differing"] == 0
        assert row["encoder"].startswith("onnxruntime")
        assert row["ours"]["captions_per_second"] > 0 and row["transformers"]["captions_per_second"] > 0
    assert (tmp_path / "results.md").read_text().count("| float32 |") == 2
