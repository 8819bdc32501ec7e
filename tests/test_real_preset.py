"""configs/real-vitb32.yaml end to end through ZenML, shrunk to seconds.

Only what must shrink is overridden (sizes, steps, batches, fp32 on this CPU); the URL list
becomes a parquet of loopback URLs to shapes64 PNGs, and ViT-B-32 a tiny open_clip model in
a local folder, loaded by the same `local-dir:` path a real local copy would take. The
structure stays: a pretrained CLIP, text tokens in the prior (trained on 2 processes through
the torchrun launcher), a base unet and a random-crop upsampler, JPEG shards.
"""

from __future__ import annotations

import copy
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pandas as pd
import pytest
import yaml
from conftest import register_stack
from safetensors.torch import save_file
from test_pipeline_e2e import BIN, PIPELINE, REPO, run

from dalle2.config import parse_config
from dalle2.data import shapes64
from dalle2.data.download import serve_directory

PRESET = REPO / "configs" / "real-vitb32.yaml"
NUM_IMAGES = 48
EMBED, TOKEN_WIDTH = 32, 48  # unequal, so a swapped embed/token width cannot pass unseen
TINY_CLIP = {
    "embed_dim": EMBED,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": TOKEN_WIDTH,
        "heads": 2,
        "layers": 1,
    },
}
TRAIN = {"steps": 4, "warmup_steps": 1, "log_every": 2, "precision": "fp32"}  # bf16: emulated


def merge(base: dict[str, Any], over: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`base` with `over` merged in; every overridden key must exist in the preset."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in base:
            raise KeyError(f"{where}{key} is not in the preset: the test would drift from it")
        if isinstance(value, dict) and isinstance(base[key], dict):
            out[key] = merge(base[key], value, f"{where}{key}.")
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            assert len(value) == len(base[key]), f"{where}{key}: keep the preset's stages"
            out[key] = [
                merge(b, o, f"{where}{key}.{i}.")
                for i, (b, o) in enumerate(zip(base[key], value, strict=True))
            ]
        else:
            out[key] = value
    return out


def shrunk(url_list: Path, clip_dir: Path) -> dict[str, Any]:
    """The preset's ZenML run config with only the sizes, the data and the CLIP replaced."""
    preset = yaml.safe_load(PRESET.read_text())
    unet = {"dim": 8, "dim_mults": [1, 2], "num_res_blocks": 1, "image_embed_dim": EMBED}
    over = {
        "progress": False,
        "data": {
            "url_list": str(url_list),
            "image_size": 32,
            "shard_size": 16,  # 3 shards: each of the prior's 2 processes gets its own
            "processes": 1,
            "threads": 4,
            "holdout_fraction": 0.15,
            "loader_workers": 0,
            "shuffle_buffer": 16,
        },
        "clip": {
            "pretrained_model": f"local-dir:{clip_dir}",
            "pretrained_weights": None,
            "embed_batch_size": 16,
        },
        "prior": {
            "net": {
                "dim": 32,
                "depth": 1,
                "heads": 2,
                "dim_head": 16,
                "embed_dim": EMBED,
                "text_token_dim": TOKEN_WIDTH,
            },
            "train": {**TRAIN, "batch_size": 8, "num_processes": 2},
            "sample": {"steps": 4},
        },
        "decoder": [
            {
                "image_size": 16,  # the preset's 64 px base
                "unet": {
                    **unet,
                    "attn_levels": [1],
                    "heads": 2,
                    "dim_head": 8,
                    "cond_dim": 16,
                    "text_token_dim": TOKEN_WIDTH,
                },
                "train": {**TRAIN, "batch_size": 4, "num_processes": 1},
                "sample": {"steps": 4},
            },
            {
                "image_size": 32,  # its 64 -> 256 upsampler, trained on crops half the side
                "lowres_size": 16,
                "random_crop": 16,
                "unet": unet,
                "train": {**TRAIN, "batch_size": 4, "num_processes": 1},
                "sample": {"steps": 3},
            },
        ],
        "eval": {"num_prompts": 4, "batch_size": 4, "grid_size": 4},
    }
    out = copy.deepcopy(preset)
    out["parameters"]["config"] = merge(preset["parameters"]["config"], over)
    return out


def write_tiny_clip(clip_dir: Path) -> None:
    """An open_clip folder as `local-dir:` reads it: open_clip_config.json + weights."""
    clip_dir.mkdir()
    model = open_clip.CLIP(**TINY_CLIP)
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, clip_dir / "open_clip_model.safetensors")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh project (git, DVC, ZenML + MLflow) that ran the shrunk preset once."""
    assets = tmp_path_factory.mktemp("assets")
    root = tmp_path_factory.mktemp("real-project")
    with pytest.MonkeyPatch.context() as mp:
        # its own ZenML store: the e2e test's store already holds a tracker of this name
        mp.setenv("ZENML_CONFIG_PATH", str(assets / "zenml-config"))
        _run_preset(root, assets)
    return root


def _run_preset(root: Path, assets: Path) -> None:
    run(["git", "init", "-q"], root)
    run([str(BIN / "dvc"), "init", "-q"], root)
    run([str(BIN / "dvc"), "remote", "add", "-d", "local", str(assets / "dvc-remote")], root)
    register_stack(root, "real_stack", f"sqlite:///{root / 'mlruns.db'}")

    write_tiny_clip(assets / "clip")
    www = assets / "www"
    frame = shapes64.generate(www, NUM_IMAGES, seed=3)
    url_list = assets / "urls.parquet"
    with serve_directory(www) as base:
        rel = [Path(p).relative_to(www.resolve()).as_posix() for p in frame["path"]]
        urls = pd.DataFrame({"url": [f"{base}/{r}" for r in rel], "caption": frame["caption"]})
        urls.to_parquet(url_list, index=False)
        run_yaml = shrunk(url_list, assets / "clip")
        parse_config(run_yaml["parameters"]["config"])  # a bad override fails here, not in ZenML
        (root / "real.yaml").write_text(yaml.safe_dump(run_yaml, sort_keys=False))
        run([str(BIN / "zenml"), "pipeline", "run", PIPELINE, "-c", "real.yaml"], root)


def test_preset_runs_end_to_end_with_pretrained_clip_and_text_tokens(real_run: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{real_run / 'mlruns.db'}")
    experiment = yaml.safe_load(PRESET.read_text())["settings"]["experiment_tracker.mlflow"]
    exp = client.get_experiment_by_name(experiment["experiment_name"])
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "one MLflow run per pipeline run"
    r = runs[0]
    assert r.info.status == "FINISHED"
    metrics, params = r.data.metrics, r.data.params
    for key in (
        "prior/loss",
        "decoder_unet_0/loss",
        "decoder_unet_1/loss",
        "unseen_captions/clip_frechet_distance",
        "unseen_captions/clip_score",
        "seen_captions/prior_cos_true",
        "seen_captions/text_image_cos",
        "data/successes",
    ):
        assert key in metrics, f"{key} missing from the MLflow run"
    assert not any(k.endswith("/fid") for k in metrics), "without Inception weights: no fid"
    assert "clip/loss" not in metrics, "a pretrained CLIP is loaded, not trained"
    assert metrics["data/successes"] == NUM_IMAGES
    assert params["clip.pretrained_model"].startswith("local-dir:")
    assert params["prior.use_text_tokens"] == "True"
    assert params["prior.train.num_processes"] == "2"
    assert params["data.encode_format"] == "jpg"
    assert (params["decoder.1.lowres_size"], params["decoder.1.random_crop"]) == ("16", "16")

    models = {a.path for a in client.list_artifacts(r.info.run_id, "models")}
    assert {f"models/{n}" for n in ("clip", "prior", "decoder_unet_0", "decoder_unet_1")} <= models
    clip_files = {Path(a.path).name for a in client.list_artifacts(r.info.run_id, "models/clip")}
    assert "clip.json" in clip_files
    assert not [f for f in clip_files if f.endswith(".safetensors")], "a reference, not weights"
    ref = json.loads(
        Path(client.download_artifacts(r.info.run_id, "models/clip/clip.json")).read_text()
    )
    assert ref["kind"] == "pretrained" and ref["model"] == params["clip.pretrained_model"]

    shards = sorted((real_run / ".cache" / "embeddings").glob("*/*.npz"))
    assert len(shards) == 3
    with np.load(shards[0]) as z:
        assert z["image_embed"].shape[1] == EMBED
        assert z["text_tokens"].shape[2] == TOKEN_WIDTH  # the pretrained CLIP's token width
    with tarfile.open(next((real_run / "data").glob("*/*.tar"))) as tar:
        assert any(name.endswith(".jpg") for name in tar.getnames()), "the preset's JPEG shards"
