"""Each pipeline step called bare through its `.entrypoint()`: no ZenML run and no stack, the
way a step is debugged. On tiny data the steps chain as the pipeline chains them, each hands
on what the next one reads, and register_model registers only inside an MLflow run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from test_clip import tiny_pretrained
from test_serving import TINY

from dalle2.config import load_config, parse_config
from dalle2.models import ModelArtifact, unpack_clip
from dalle2.unclip import UnCLIP
from steps import (
    compute_clip_embeddings,
    download_images,
    evaluate,
    load_pretrained_clip,
    register_model,
    train_clip,
    train_decoder_unet,
    train_prior,
)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A DVC project with a local remote, as the working directory."""
    tmp = tmp_path_factory.mktemp("steps")
    root = tmp / "proj"
    root.mkdir()
    for args in (("init", "-q", "--no-scm"), ("remote", "add", "-q", "-d", "local", "../remote")):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True)
    before = Path.cwd()
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(before)


def tiny_config() -> dict:
    """tests/configs/tiny.yaml at fewer images, steps and prompts."""
    cfg = load_config(TINY)
    few = {"steps": 4, "warmup_steps": 1, "log_every": 2}
    data = cfg.data.model_copy(update={"num_synthetic": 80, "shard_size": 40})
    clip = cfg.clip.model_copy(update={"train": cfg.clip.train.model_copy(update=few)})
    prior = cfg.prior.model_copy(update={"train": cfg.prior.train.model_copy(update=few)})
    decoder = tuple(
        s.model_copy(update={"train": s.train.model_copy(update=few)}) for s in cfg.decoder
    )
    evals = cfg.eval.model_copy(update={"num_prompts": 4, "batch_size": 4})
    update = {"data": data, "clip": clip, "prior": prior, "decoder": decoder, "eval": evals}
    return json.loads(cfg.model_copy(update=update).model_dump_json())


def test_every_step_runs_bare_through_its_entrypoint(project: Path) -> None:
    config = tiny_config()
    cfg = parse_config(config)
    dataset = download_images.entrypoint(config)
    assert (dataset.num_samples, dataset.num_failed) == (80, 0)
    assert Path(dataset.path).is_dir() and (project / "data.dvc").is_file()

    clip = train_clip.entrypoint(cfg.clip, cfg.data, dataset, "cpu", False)
    assert clip.kind == "clip"
    embeddings = compute_clip_embeddings.entrypoint(dataset, clip, 16, True, "cpu", False)
    assert (embeddings.num_samples, embeddings.with_tokens) == (80, True)
    assert embeddings.clip_id == clip.content_id()[:16]

    prior = train_prior.entrypoint(cfg.prior, cfg.data, embeddings, "cpu", False)
    unets = [
        train_decoder_unet.entrypoint(s, i, cfg.data, dataset, embeddings, "cpu", False)
        for i, s in enumerate(cfg.decoder)
    ]
    assert [u.config["index"] for u in unets] == [0, 1]
    assert not list((project / "checkpoints").glob("*/step-*")), "kept models drop checkpoints"

    metrics = evaluate.entrypoint(config, dataset, embeddings, clip, prior, unets)
    assert {"unseen_captions/clip_score", "seen_captions/retrieval_top5"} <= set(metrics)
    assert metrics["seen_captions/sample_seconds_per_image"] > 0

    # without a tracker nothing is registered; inside an MLflow run a version is
    assert register_model.entrypoint(config, dataset, clip, prior, unets, metrics) == ""
    uri = f"sqlite:///{project / 'mlruns.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run():
            registered = register_model.entrypoint(config, dataset, clip, prior, unets, metrics)
        assert registered == f"models:/{cfg.registry.name}/1"
        served = mlflow.MlflowClient().get_model_version_by_alias(cfg.registry.name, "champion")
        assert str(served.version) == "1"
    finally:
        mlflow.set_tracking_uri(previous)

    # what the steps handed on is the system UnCLIP loads: same images as from the folder
    unclip = UnCLIP.from_artifacts(clip, prior, unets)
    again = UnCLIP.load(unclip.save(project / "models"))
    prompts = ["a large red circle on a white background"]
    assert torch.equal(unclip.generate(prompts).images, again.generate(prompts).images)


def test_load_pretrained_clip_step_holds_the_reference(tmp_path: Path) -> None:
    """A pretrained CLIP travels as its name and weight path, and loads back to its weights."""
    reference, weights = tiny_pretrained(tmp_path, "tiny-step-clip")
    section = load_config(TINY).clip.model_copy(
        update={"pretrained_model": "tiny-step-clip", "pretrained_weights": str(weights)}
    )
    artifact = load_pretrained_clip.entrypoint(section)
    assert isinstance(artifact, ModelArtifact) and artifact.kind == "clip"
    assert "clip.safetensors" not in artifact.files, "the reference, not a copy of the weights"
    loaded = unpack_clip(artifact)
    assert torch.equal(loaded.model.text_projection, reference.text_projection)
