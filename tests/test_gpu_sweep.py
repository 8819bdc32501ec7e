"""benchmarks/gpu_sweep.py: its CPU smoke packs two tiny datasets, unpacks them and trains and
judges both configurations end to end as a GPU sweep would; the budget stops a sweep between
stages and keeps the finished rows; without a GPU the real mode refuses in one sentence."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_sweep
import sweep_data

from dalle2.config import DataConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_sweep.py"
STAGES = {"clip", "embeddings", "prior", "decoder.0", "decoder.1"}


def _sweep(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SCRIPT), "--no-progress", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smoke")
    done = _sweep("--smoke", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_smoke_trains_and_judges_two_configurations_end_to_end(smoke: Path) -> None:
    runs = json.loads((smoke / "sweep.json").read_text())["runs"]
    assert [(r["name"], r["kind"], r["status"]) for r in runs] == [
        ("00-tiny", "shapes64", "done"),
        ("01-tiny-emoji", "emoji", "done"),
    ]
    for run in runs:
        assert set(run["stages"]) == STAGES
        for name, stage in run["stages"].items():
            assert stage["minutes"] > 0, name
            if name != "embeddings":  # trained to their steps: the budget cut nothing
                assert stage["steps"] == stage["target_steps"] and not stage["cut_by_clock"]
                assert stage["samples_per_s"] > 0 and stage["samples_per_s_steady"] > 0
        assert run["stages"]["embeddings"]["images"] > 0
        grid = Image.open(smoke / run["grid"])
        assert grid.width > 200 and grid.height > 100
    shapes, emoji = runs
    assert shapes["stages"]["decoder.0"]["steps"] == 6  # the smoke's own override
    sets = {"unseen_captions", "unseen_colour_shape", "seen_captions"}
    assert {(r["set"], r["path"]) for r in shapes["fidelity"]} == {
        (s, p) for s in sets for p in ("prior + cascade (text)", "cascade, true embedding")
    }
    for r in shapes["fidelity"]:  # all four right implies each one right
        assert r["prompts"] == 8 and 0 <= r["all"] <= min(r["color"], r["shape"], r["size"])
        assert 0 <= r["empty_canvas"] <= r["prompts"]
    paths = {r["path"].split(" (")[0].split(",")[0] for r in emoji["judge"]}
    assert paths == {"CLIP retrieval", "real images", "base stage", "cascade", "prior + cascade"}
    assert {r["set"] for r in emoji["judge"]} == {
        "unseen_captions",
        "unseen_dark_tone",
        "seen_captions",
    }
    for r in emoji["judge"]:  # a top-1 hit is a top-5 hit
        assert 0 <= r["top1"] <= r["top5"] <= 1 and r["prompts"] > 0


def test_the_budget_stops_between_stages_and_keeps_finished_rows(
    smoke: Path, tmp_path: Path
) -> None:
    """The second run's CLIP may take 30 minutes, more than the budget has left: the sweep
    stops before it starts, with the first run's row whole."""
    pack = smoke / "smoke-pack"
    done = _sweep(
        "--smoke",
        "--data",
        str(pack),
        "--budget-min",
        "3",
        "--set",
        "1:clip.train.max_minutes=30",
        "--out",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    assert first["status"] == "done" and set(first["stages"]) == STAGES and first["fidelity"]
    assert (tmp_path / first["grid"]).is_file()
    assert second["status"].startswith("stopped: clip not started") and not second["stages"]
    assert "its cap is 30 min" in second["status"] and "judge" not in second


def test_a_stage_in_flight_is_capped_at_the_minutes_left() -> None:
    budget = gpu_sweep.Budget(minutes=2.0, reserve=0.5, start=time.monotonic() - 60)
    free = budget.capped("prior", TrainConfig())  # no cap of its own: what is left
    assert 0.45 < free.max_minutes <= 0.5
    assert budget.capped("prior", TrainConfig(max_minutes=0.25)).max_minutes == 0.25
    with pytest.raises(gpu_sweep.OutOfBudgetError, match=r"its cap is 0\.6 min"):
        budget.capped("decoder.0", TrainConfig(max_minutes=0.6))
    spent = gpu_sweep.Budget(minutes=1.0, reserve=0.5, start=time.monotonic() - 40)
    with pytest.raises(gpu_sweep.OutOfBudgetError, match="embeddings not started"):
        spent.admit("embeddings")


def test_a_pack_round_trip_keeps_every_pixel_caption_key_and_shard(tmp_path: Path) -> None:
    drawn = sweep_data.draw_shapes64(DataConfig(num_synthetic=30, shard_size=12))
    manifest = sweep_data.write_pack(tmp_path / "pack", {"toy": drawn}, {})
    assert manifest["datasets"]["toy"]["images"] == 30
    pack = sweep_data.Pack(tmp_path / "pack")
    back = sweep_data.read_shards(pack.shards("toy", tmp_path / "work"))
    assert np.array_equal(back.images, drawn.images) and back.images.dtype == np.uint8
    assert back.captions == drawn.captions and back.keys == drawn.keys
    assert back.shard_sizes == [12, 12, 6]
    with pytest.raises(sweep_data.PackError, match="holds no dataset other"):
        pack.shards("other", tmp_path / "work")
    with pytest.raises(sweep_data.PackError, match="holds no judge"):
        pack.judge("toy")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_it_refuses_in_one_sentence(tmp_path: Path) -> None:
    done = _sweep("--config", "configs/emoji64-gpu.yaml", "--out", str(tmp_path))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "no CUDA GPU" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "sweep.json").exists()
