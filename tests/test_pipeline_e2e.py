"""The whole pipeline through ZenML's CLI on a tiny config, read back from a real MLflow
server over REST, used by `dalle2 generate`, then reproduced from its DVC snapshot."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PIPELINE = "pipelines.unclip.unclip_pipeline"


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command in the project; ZenML finds its repository in the project dir."""
    env = {**os.environ, "ZENML_REPOSITORY_PATH": str(cwd)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh project: git + DVC with a local remote + ZenML stack with MLflow (sqlite)."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "tests" / "configs" / "tiny.yaml", root / "tiny.yaml")
    run(["git", "init", "-q"], root)
    run([str(BIN / "dvc"), "init", "-q"], root)
    run([str(BIN / "dvc"), "remote", "add", "-d", "local", str(root.parent / "dvc-remote")], root)
    zenml = str(BIN / "zenml")
    run([zenml, "init"], root)
    run(
        [
            zenml,
            "experiment-tracker",
            "register",
            "mlflow_tracker",
            "--flavor=mlflow",
            f"--tracking_uri=sqlite:///{root / 'mlruns.db'}",
        ],
        root,
    )
    run(
        [
            zenml,
            "stack",
            "register",
            "test_stack",
            "-o",
            "default",
            "-a",
            "default",
            "-e",
            "mlflow_tracker",
            "--set",
        ],
        root,
    )
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(project: Path):
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{project / 'mlruns.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        raise AssertionError("mlflow server did not start")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def rest(base: str, path: str, body: dict | None = None) -> dict:
    if body is None:
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}")
    else:
        req = urllib.request.Request(
            f"{base}/api/2.0/mlflow/{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def runs_of(base: str) -> list[dict]:
    exp = rest(base, "experiments/get-by-name?experiment_name=unclip-test")["experiment"]
    body = {"experiment_ids": [exp["experiment_id"]], "order_by": ["attributes.start_time ASC"]}
    return rest(base, "runs/search", body)["runs"]


@pytest.fixture(scope="module")
def first_run(project: Path) -> Path:
    run([str(BIN / "zenml"), "pipeline", "run", PIPELINE, "-c", "tiny.yaml"], project)
    return project


def test_pipeline_run_is_tracked_in_mlflow(first_run: Path, mlflow_server: str) -> None:
    runs = runs_of(mlflow_server)
    assert len(runs) == 1, "one MLflow run per pipeline run"
    r = runs[0]
    metrics = {m["key"]: m["value"] for m in r["data"]["metrics"]}
    params = {p["key"]: p["value"] for p in r["data"]["params"]}
    tags = {t["key"]: t["value"] for t in r["data"]["tags"]}
    for key in (
        "clip/loss",
        "prior/loss",
        "decoder_unet_0/loss",
        "decoder_unet_1/loss",
        "clip/retrieval_acc_unseen_captions",
        "data/successes",
    ):
        assert key in metrics, f"{key} missing from the MLflow run"
    for split in ("unseen_captions", "seen_captions"):  # each set under its own name
        for key in (
            "clip_frechet_distance",
            "clip_score",
            "prior_cos_true",
            "text_image_cos",
            "prior_cos_unrelated",
            "fidelity_color",
            "fidelity_shape",
            "fidelity_size",
            "fidelity_background",
            "fidelity_all",
        ):
            assert f"{split}/{key}" in metrics, f"{split}/{key} missing from the MLflow run"
    assert not any(k.endswith("/fid") for k in metrics), "without Inception weights: no fid"
    assert metrics["data/successes"] == 216
    assert (metrics["clip/steps"], metrics["prior/steps"], metrics["decoder_unet_0/steps"]) == (
        10,
        10,
        120,
    ), "each model records the steps it trained"
    assert 0.0 <= metrics["unseen_captions/fidelity_all"] <= 1.0
    assert params["data.num_synthetic"] == "216"
    assert params["decoder.1.lowres_size"] == "16"
    md5 = (first_run / "data.dvc").read_text().split("md5: ")[1].split()[0]
    assert tags["data_snapshot_md5"] == md5  # `dvc pull` of this pointer restores the data
    run_id = r["info"]["run_id"]
    models = rest(mlflow_server, f"artifacts/list?run_id={run_id}&path=models")["files"]
    names = {f["path"] for f in models}
    expected = {"clip", "prior", "decoder_unet_0", "decoder_unet_1"}
    assert {f"models/{n}" for n in expected} <= names
    samples = rest(mlflow_server, f"artifacts/list?run_id={run_id}&path=samples")["files"]
    assert any(f["path"] == "samples/samples.png" and int(f["file_size"]) > 0 for f in samples)

    # a model people use: logged on the run, registered, champion, with a card (issue 13)
    assert r["outputs"]["model_outputs"], "the run logged no MLflow model"
    champion = rest(mlflow_server, "registered-models/alias?name=unclip&alias=champion")
    assert champion["model_version"]["run_id"] == run_id
    assert (tags["registry.version"], tags["registry.promoted"]) == ("1", "True")
    assert tags["mlflow.note.content"].startswith("# unCLIP"), "the model card is the description"
    top = rest(mlflow_server, f"artifacts/list?run_id={run_id}")["files"]
    assert any(f["path"] == "model_card.md" for f in top)
    exp = rest(mlflow_server, "experiments/get-by-name?experiment_name=unclip-test")["experiment"]
    kinds = {t["key"]: t["value"] for t in exp["tags"]}
    assert kinds["mlflow.experimentKind"] == "custom_model_development", "opens on training pages"
    code = (  # the run is a version of the ZenML model, its models linked
        "from zenml.client import Client; v = Client().get_model_version('unclip', 1); "
        "names = [v.get_model_artifact(n).name for n in ('clip', 'prior', 'decoder_unet')]; "
        "print(f'{names} version={v.run_metadata[\"registry.version\"]}')"
    )
    listed = run([sys.executable, "-c", code], first_run).stdout
    assert "['clip', 'prior', 'decoder_unet'] version=1" in listed, listed


def test_generate_from_latest_run(first_run: Path) -> None:
    out = first_run / "generated"
    uri = f"sqlite:///{first_run / 'mlruns.db'}"
    run(
        [
            str(BIN / "dalle2"),
            "generate",
            "a large red circle on a white background",
            "a small blue square on a black background",
            "--run",
            "latest",
            "--tracking-uri",
            uri,
            "--out",
            str(out),
            "--quiet",
        ],
        first_run,
    )
    table = pd.read_csv(out / "prompts.csv")
    assert list(table.columns) == ["prompt", "image"]
    assert len(table) == 2
    from PIL import Image

    for path in table["image"]:
        img = Image.open(path)
        assert img.size == (32, 32) and img.mode == "RGB"


def test_rerun_from_dvc_snapshot_trains_on_identical_data(
    first_run: Path, mlflow_server: str
) -> None:
    md5 = (first_run / "data.dvc").read_text()
    shutil.rmtree(first_run / "data")
    shutil.rmtree(first_run / ".dvc" / "cache")
    run([str(BIN / "dvc"), "pull", "-q"], first_run)
    run([str(BIN / "zenml"), "pipeline", "run", PIPELINE, "-c", "tiny.yaml"], first_run)
    assert (first_run / "data.dvc").read_text() == md5
    runs = runs_of(mlflow_server)
    assert len(runs) == 2
    tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
    assert tags[0]["data_md5"] == tags[1]["data_md5"]
    assert tags[1]["download_skipped"] == "True"


def test_bad_config_fails_before_any_step(project: Path) -> None:
    bad = project / "bad.yaml"
    bad.write_text((project / "tiny.yaml").read_text().replace("num_synthetic", "num_synthtic"))
    env = {**os.environ, "ZENML_REPOSITORY_PATH": str(project)}
    proc = subprocess.run(
        [str(BIN / "zenml"), "pipeline", "run", PIPELINE, "-c", "bad.yaml"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "data.num_synthtic" in proc.stdout + proc.stderr


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_weights(
    first_run: Path, mlflow_server: str
) -> None:
    """SIGKILL to the whole process group mid-way through train_decoder_unet_0, then the same
    command again: the earlier steps come from ZenML's cache, the unet continues from its
    last checkpoint and ends with the weights the uninterrupted first run trained."""
    config = yaml.safe_load((first_run / "tiny.yaml").read_text())
    config["steps"]["train_decoder_unet_0"]["enable_cache"] = False  # train it again
    (first_run / "kill.yaml").write_text(yaml.safe_dump(config))
    command = [str(BIN / "zenml"), "pipeline", "run", PIPELINE, "-c", "kill.yaml"]
    env = {**os.environ, "ZENML_REPOSITORY_PATH": str(first_run)}
    proc = subprocess.Popen(
        command,
        cwd=first_run,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, loader workers included
    )
    ckpts = first_run / "checkpoints"
    deadline = time.time() + 300
    killed_after = 0
    while time.time() < deadline and proc.poll() is None:
        done = sorted(ckpts.glob("decoder_unet_0-*/step-*"))
        if done and int(done[-1].name.removeprefix("step-")) >= 30:
            os.killpg(proc.pid, signal.SIGKILL)
            killed_after = int(done[-1].name.removeprefix("step-"))
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_after, "the run ended before it could be killed mid-way"
    assert killed_after < 120
    ghost = runs_of(mlflow_server)[-1]["info"]
    assert ghost["status"] == "RUNNING"  # nobody told MLflow

    rerun_log = run(command, first_run)
    assert "left running by a killed process as failed" in rerun_log.stdout + rerun_log.stderr
    runs = runs_of(mlflow_server)
    assert [r["info"]["status"] for r in runs if r["info"]["run_id"] == ghost["run_id"]] == [
        "KILLED"
    ]
    from zenml.client import Client

    zen_runs = Client().list_pipeline_runs(sort_by="desc:created", size=2, hydrate=True).items
    assert [str(r.status) for r in zen_runs] == ["completed", "failed"]
    assert "killed: the process that ran it" in (zen_runs[1].body.status_reason or "")
    rerun = runs[-1]
    metrics = {m["key"]: m["value"] for m in rerun["data"]["metrics"]}
    resumed = metrics["decoder_unet_0/resumed_from_step"]
    assert killed_after <= resumed < 120, (killed_after, resumed)
    assert metrics["decoder_unet_0/steps"] == 120
    assert "clip/final_loss" not in metrics, "train_clip should have come from the cache"
    assert not list(ckpts.glob("decoder_unet_0-*")), "a finished step removes its checkpoint"

    first = runs_of(mlflow_server)[0]["info"]["run_id"]

    def weights(run_id: str) -> dict[str, str]:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{first_run / 'mlruns.db'}")
        local = Path(
            client.download_artifacts(run_id, "models/decoder_unet_0", str(first_run / run_id))
        )
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in local.iterdir()}

    assert weights(rerun["info"]["run_id"]) == weights(first)
