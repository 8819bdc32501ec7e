"""Configs that cannot work and damaged model files stop in one sentence, before any work.

Broken configs go through both entry points a user has, `dalle2 check-config` and
`zenml pipeline run` (exit code 2, one line on stderr, no step started); damaged model
folders through `dalle2 generate --checkpoint` (exit code 2, one line, no image written).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from test_pipeline_e2e import BIN, PIPELINE, REPO

from dalle2.clip import build_scratch_clip
from dalle2.config import load_config
from dalle2.decoder import DecoderStage
from dalle2.edges.cli import main
from dalle2.models import MANIFEST, ModelArtifact, pack_clip, pack_prior, pack_stage
from dalle2.prior import DiffusionPrior

TINY = REPO / "tests" / "configs" / "tiny.yaml"
Patch = Callable[[dict[str, Any], Path], None]


def _set(path: str, value: Any) -> Patch:
    """A patch setting `parameters.config.<path>` (dots; list indices as numbers)."""

    def patch(run: dict[str, Any], _: Path) -> None:
        node: Any = run["parameters"]["config"]
        *parents, last = path.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[int(last) if isinstance(node, list) else last] = value

    return patch


def _pretrained(run: dict[str, Any], _: Path) -> None:
    """A pretrained CLIP is loaded by another step, which the tracker must reach too."""
    run["steps"]["load_pretrained_clip"] = {"experiment_tracker": "mlflow_tracker"}


def _local_clip(widths: tuple[int, int]) -> Patch:
    """A pretrained open_clip folder whose embedding and token widths are `widths`."""

    def patch(run: dict[str, Any], tmp: Path) -> None:
        folder = tmp / "clip"
        folder.mkdir()
        model_cfg = {"embed_dim": widths[0], "text_cfg": {"width": widths[1]}}
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
        _set("clip.pretrained_model", f"local-dir:{folder}")(run, tmp)

    return patch


BROKEN_CONFIGS: dict[str, tuple[list[Patch], str]] = {
    "typo": ([_set("data.num_synthtic", 5)], "'data.num_synthtic': unknown key"),
    "wrong type": ([_set("prior.train.steps", "many")], "prior.train.steps"),
    "negative steps": ([_set("prior.train.steps", -3)], "prior.train.steps"),
    "bad sampler": ([_set("decoder.0.sample.sampler", "euler")], "decoder.0.sample.sampler"),
    "prior embed dim": ([_set("prior.net.embed_dim", 16)], "set prior.net.embed_dim to 32"),
    "unet embed dim": (
        [_set("decoder.1.unet.image_embed_dim", 64)],
        "decoder.1.unet.image_embed_dim is 64",
    ),
    "token width": (
        [_set("prior.use_text_tokens", True), _set("prior.net.text_token_dim", 8)],
        "prior.net.text_token_dim is 8; set it to 32",
    ),
    "unet token width": (
        [_set("decoder.0.unet.text_token_dim", 8)],
        "decoder.0.unet.text_token_dim is 8 but CLIP's text tokens are 32 wide",
    ),
    "pretrained embed dim": (
        [_pretrained, _local_clip((48, 32))],
        "CLIP embeds in 48 dimensions",
    ),
    "stage sizes": ([_set("decoder.1.lowres_size", 8)], "expects lowres_size 16"),
    "processes": ([_set("prior.train.num_processes", 3)], "must divide by num_processes 3"),
    "missing url list": ([_set("data.url_list", "/nonexistent/urls.parquet")], "data.url_list"),
    "missing weights": (
        [
            _pretrained,
            _set("clip.pretrained_model", "ViT-B-32"),
            _set("clip.pretrained_weights", "./no.pt"),
        ],
        "clip.pretrained_weights ./no.pt does not exist",
    ),
    "missing inception": (
        [_set("eval.inception_weights", "/nonexistent/pt_inception.pth")],
        "eval.inception_weights",
    ),
}


def _write_broken(tmp_path: Path, patches: list[Patch]) -> Path:
    run = yaml.safe_load(TINY.read_text())
    for patch in patches:
        patch(run, tmp_path)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


@pytest.mark.parametrize("name", list(BROKEN_CONFIGS))
def test_check_config_refuses_in_one_line(name: str, tmp_path: Path, capsys) -> None:
    patches, message = BROKEN_CONFIGS[name]
    path = _write_broken(tmp_path, patches)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_check_config_checks_the_zenml_steps_block(tmp_path: Path, capsys) -> None:
    run = yaml.safe_load(TINY.read_text())
    run["steps"]["train_decoder_unet_2"] = {"experiment_tracker": "mlflow_tracker"}
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump(run))
    assert main(["check-config", str(tmp_path / "extra.yaml")]) == 2
    assert "train_decoder_unet_2" in capsys.readouterr().err
    del run["steps"]["train_decoder_unet_2"], run["steps"]["train_decoder_unet_1"]
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(run))
    assert main(["check-config", str(tmp_path / "missing.yaml")]) == 2
    assert "['train_decoder_unet_1']" in capsys.readouterr().err


def test_zenml_pipeline_run_refuses_before_any_step(tmp_path: Path, monkeypatch) -> None:
    """ZenML's own `pipeline run` command: every broken config ends at compile time (nothing
    downloaded, no step run) with exit code 2 and one line on stderr. The console script
    runs once as a process; the other configs go through the same click command in this
    process, which saves ZenML's start-up per config."""
    from click.testing import CliRunner
    from zenml.cli.cli import cli

    monkeypatch.setenv("ZENML_REPOSITORY_PATH", str(tmp_path))
    monkeypatch.chdir(REPO)  # the pipeline's source root
    subprocess.run([str(BIN / "zenml"), "init"], cwd=tmp_path, check=True, capture_output=True)
    for i, (name, (patches, message)) in enumerate(BROKEN_CONFIGS.items()):
        case = tmp_path / name.replace(" ", "_")
        case.mkdir()
        command = ["pipeline", "run", PIPELINE, "-c", str(_write_broken(case, patches))]
        if i == 0:
            proc = subprocess.run(
                [str(BIN / "zenml"), *command], capture_output=True, text=True, timeout=120
            )
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        else:
            result = CliRunner().invoke(cli, command)
            code, out, err = result.exit_code, result.stdout, result.stderr
        assert code == 2, (name, out[-1500:], err[-1500:])
        assert err.count("\n") == 1 and message in err, (name, err)
        assert "has started" not in out + err


# ----------------------------------------------------------------------------- model files


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A tiny trained-model folder laid out like a run's `models/` artifacts."""
    cfg = load_config(TINY)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    pack_clip(build_scratch_clip(cfg.clip.tower, ["a red circle"])).to_dir(root / "clip")
    pack_prior(DiffusionPrior(cfg.prior)).to_dir(root / "prior")
    for i, stage in enumerate(cfg.decoder):
        pack_stage(DecoderStage(stage), i).to_dir(root / f"decoder_unet_{i}")
    return root


def _rebuild(folder: Path, edit: Callable[[dict[str, bytes]], None]) -> None:
    """Edit a model's files and write a matching manifest: damage the checksum cannot see."""
    art = ModelArtifact.from_dir(folder)
    files = {k: v for k, v in art.files.items() if k != MANIFEST}
    edit(files)
    ModelArtifact.build(art.kind, files).to_dir(folder)


def _edit_config(change: Callable[[dict], None]) -> Callable[[dict[str, bytes]], None]:
    def edit(files: dict[str, bytes]) -> None:
        cfg = json.loads(files["config.json"])
        change(cfg)
        files["config.json"] = json.dumps(cfg).encode()

    return edit


def _poison(files: dict[str, bytes]) -> None:
    tensors = load_safetensors(files["model.safetensors"])
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    files["model.safetensors"] = save_safetensors(tensors)


def _truncate(folder: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _random_bytes(folder: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size))


def _forged_header(files: dict[str, bytes]) -> None:
    """A header that claims a tensor of 2**40 floats over 4 bytes of data."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4]}})
    files["model.safetensors"] = len(header).to_bytes(8, "little") + header.encode() + bytes(4)


DAMAGES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "truncated weights": ("prior", _truncate, "prior/model.safetensors is damaged"),
    "random bytes": ("decoder_unet_0", _random_bytes, "decoder_unet_0/model.safetensors is"),
    "forged header": (
        "prior",
        lambda d: _rebuild(d, _forged_header),
        "prior/model.safetensors is not a readable safetensors file",
    ),
    "garbled config": (
        "prior",
        lambda d: (d / "config.json").write_text("{not json"),
        "prior/config.json is damaged",
    ),
    "no manifest": ("decoder_unet_1", lambda d: (d / MANIFEST).unlink(), "has no manifest"),
    "changed layer size": (
        "decoder_unet_0",
        lambda d: _rebuild(d, _edit_config(lambda c: c["stage"]["unet"].update(dim=16))),
        "does not fit the model its config.json describes",
    ),
    "unknown config key": (
        "prior",
        lambda d: _rebuild(d, _edit_config(lambda c: c.update(extra_key=1))),
        "prior/config.json is not a valid prior config",
    ),
    "garbled config, re-manifested": (
        "prior",
        lambda d: _rebuild(d, lambda f: f.update({"config.json": b"[1, 2"})),
        "prior/config.json is missing or not JSON",
    ),
    "wrong kind": (
        "decoder_unet_0",
        lambda d: (d / "kind.txt").write_text("prior"),
        "is a saved prior, not a decoder_stage",
    ),
    "NaN weights": ("decoder_unet_1", lambda d: _rebuild(d, _poison), "NaN or infinite weights"),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_a_damaged_model_folder_is_one_line_and_no_image(name, models, tmp_path, capsys) -> None:
    folder_name, damage, message = DAMAGES[name]
    root = tmp_path / "models"
    subprocess.run(["cp", "-r", str(models), str(root)], check=True)
    damage(root / folder_name)
    out = tmp_path / "out"
    code = main(
        ["generate", "a red circle", "--checkpoint", str(root), "--out", str(out), "--quiet"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert folder_name in err and message in err, err
    assert not out.exists() or not any(out.iterdir())


def test_generation_refuses_to_write_non_finite_images(models, tmp_path, capsys) -> None:
    """Finite weights that overflow when sampled: the images would be noise, so none are
    written (through the console script, as a user runs it)."""
    root = tmp_path / "models"
    subprocess.run(["cp", "-r", str(models), str(root)], check=True)

    def overflow(files: dict[str, bytes]) -> None:
        tensors = load_safetensors(files["model.safetensors"])
        for k, v in tensors.items():
            if v.is_floating_point() and v.ndim == 4:  # every conv kernel
                tensors[k] = torch.full_like(v, 3e38)
        files["model.safetensors"] = save_safetensors(tensors)

    _rebuild(root / "decoder_unet_0", overflow)
    out = tmp_path / "out"
    args = ["generate", "a red circle", "--checkpoint", str(root), "--out", str(out), "--quiet"]
    proc = subprocess.run(
        [str(BIN / "dalle2"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "NaN or infinite values" in proc.stderr, proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_a_sound_model_folder_still_generates(models, tmp_path) -> None:
    out = tmp_path / "out"
    args = ["generate", "a red circle", "--checkpoint", str(models), "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    assert (out / "0000.png").is_file()
    assert copy.deepcopy(ModelArtifact.from_dir(models / "prior")).verify() is None


def test_a_models_folder_without_its_last_upsampler_is_refused(models, tmp_path) -> None:
    """No saved model says how many stages its cascade has: told the count, UnCLIP.load
    refuses a folder without the upsampler rather than draw the base stage's smaller images;
    a gap in the stages is refused without it."""
    from dalle2.models import ModelFileError
    from dalle2.unclip import UnCLIP

    root = tmp_path / "models"
    subprocess.run(["cp", "-r", str(models), str(root)], check=True)
    shutil.rmtree(root / "decoder_unet_1")
    message = "lacks the model folder(s) decoder_unet_{} of its 2-stage cascade"
    with pytest.raises(ModelFileError, match=re.escape(message.format(1))):
        UnCLIP.load(root, num_stages=2)
    (root / "decoder_unet_0").rename(root / "decoder_unet_1")
    with pytest.raises(ModelFileError, match=re.escape(message.format(0))):
        UnCLIP.load(root)


def test_a_run_whose_models_lack_a_stage_is_refused_until_logged(
    models, tmp_path, monkeypatch, capsys
) -> None:
    """A run logged before register_model completed models/: a cached upsampler step left
    no decoder_unet_1 there, so `generate --run` refuses in one line (the run's config has
    two stages) and downloads nothing; once log_missing_models adds what the run lacks, the
    same command draws through both stages."""
    import mlflow
    from PIL import Image

    from dalle2.models import ModelArtifact
    from steps._tracking import log_missing_models, log_model, log_params, run_models

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.chdir(tmp_path)
    arts = {d.name: ModelArtifact.from_dir(d) for d in models.iterdir()}
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as active:
            log_params(load_config(TINY))  # as download_images logs the config
            for name in ("clip", "prior", "decoder_unet_0"):  # the steps that ran
                log_model(arts[name], name)
        run_id = active.info.run_id
        out = tmp_path / "out"
        args = ["generate", "a red circle", "--run", run_id, "--tracking-uri", uri, "--quiet"]
        capsys.readouterr()  # MLflow's own log lines on creating the store: not the CLI's
        assert main([*args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"dalle2: error: MLflow run {run_id}'s models/ lacks the model folder(s) "
            "decoder_unet_1 of its 2-stage cascade; run the pipeline again, which logs every "
            "model into its run\n"
        )
        assert not out.exists()
        mlflow.MlflowClient(uri).set_tag(run_id, "registry.model", "unclip")
        mlflow.MlflowClient(uri).set_tag(run_id, "registry.version", "3")
        assert main([*args, "--out", str(out)]) == 2
        assert "holds them all: pass --model models:/unclip/3\n" in capsys.readouterr().err

        with mlflow.start_run(run_id):  # what register_model does in a cached rerun
            unets = [arts["decoder_unet_0"], arts["decoder_unet_1"]]
            log_missing_models(run_models(arts["clip"], arts["prior"], unets))
    finally:
        mlflow.set_tracking_uri("")
    held = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run_id, "models")}
    assert held == {f"models/{n}" for n in ("clip", "prior", "decoder_unet_0", "decoder_unet_1")}
    assert main([*args, "--out", str(out)]) == 0
    assert Image.open(out / "0000.png").size == (32, 32)
