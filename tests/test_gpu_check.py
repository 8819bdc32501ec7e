"""benchmarks/gpu_check.py: its CPU smoke mode runs every part, and without a GPU the real
mode stops in one sentence instead of hanging."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def test_smoke_mode_measures_every_part(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["peak_gflops"] > 0
    assert [r["model"] for r in figures["training"]] == ["decoder.0", "decoder.1", "prior"]
    for row in figures["training"]:
        assert row["samples_per_s"] > 0 and 0 < row["of_peak"] < 1.5, row
    assert figures["embedding"]["images_per_s"] > 0
    assert figures["sampling"]["images_per_s"] > 0
    assert figures["torchrun"]["ok"] and figures["torchrun"]["steps"] == 20
    assert "| decoder.0 |" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_it_says_so_in_one_sentence(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(tmp_path / "x.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout.strip().count("\n") == 0 and "no CUDA GPU" in done.stdout
    assert not (tmp_path / "x.json").exists()
