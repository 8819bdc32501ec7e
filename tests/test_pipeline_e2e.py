"""The whole pipeline through ZenML's CLI on a tiny config, read back from a real MLflow
server over REST, used by `dalle2 generate`, reproduced by `dalle2 reproduce` from its
commit and DVC snapshot, then killed and resumed. One pipeline run serves them all.

The project is a committed copy of this repository's files (reproduce checks a commit out),
with the stack and relative MLflow URI scripts/setup.sh registers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import register_stack

from dalle2.edges.cli import main

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PIPELINE = "pipelines.unclip.unclip_pipeline"
EXPERIMENT = "unclip-test"  # tiny.yaml's


def run(
    cmd: list[str], cwd: Path, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command in the project; ZenML finds its repository in the project dir."""
    env = {**os.environ, **(env or {}), "ZENML_REPOSITORY_PATH": str(cwd)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed copy of the repository with tiny.yaml at its root and setup.sh's stack."""
    root = tmp_path_factory.mktemp("e2e") / "project"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, tracked):
        if (REPO / name).is_file():  # the working tree's version: what these tests test
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    shutil.copy(REPO / "tests" / "configs" / "tiny.yaml", root / "tiny.yaml")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "snapshot"]):
        run(cmd, root)
    register_stack(root, "unclip_stack", "sqlite:///mlruns.db")  # relative, as setup.sh's
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
    # the committed copy's code, not the editable install's (which others may be editing)
    command = [str(BIN / "zenml"), "pipeline", "run", PIPELINE, "-c", "tiny.yaml"]
    run(command, project, env={"PYTHONPATH": str(project)})
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
    from zenml.client import Client  # the run is a version of the ZenML model, its models linked

    v = Client().get_model_version("unclip", 1)
    names = [v.get_model_artifact(n).name for n in ("clip", "prior", "decoder_unet")]
    assert names == ["clip", "prior", "decoder_unet"]
    assert str(v.run_metadata["registry.version"]) == "1"


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


def _runs(root: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_reproduce_latest_trains_the_same_models_and_metrics(first_run: Path) -> None:
    """`dalle2 reproduce latest`: the run's commit checked out, its data pulled from the DVC
    remote by the snapshot's md5, everything trained again, and the models and metrics
    compared file by file."""
    root = first_run
    original = _runs(root)[0].info.run_id
    # the data must come from the remote, which the committed .dvc/config names relatively
    shutil.rmtree(root / ".dvc" / "cache")
    proc = run(
        [
            str(BIN / "dalle2"),
            "reproduce",
            "latest",
            "--tracking-uri",
            f"sqlite:///{root}/mlruns.db",
        ],
        root,
    )
    out = proc.stdout
    assert "reproduce: same environment (lock, packages, Python, torch, device)" in out
    summary = re.search(r"reproduced: all (\d+) model files and (\d+) metrics are equal", out)
    assert summary, out[-4000:]
    table = out[out.rindex("original ") :]  # the comparison, after the pipeline's own output
    files, metrics = int(summary[1]), int(summary[2])
    assert files >= 4 * 3, "clip, prior and two unets: kind.txt, a .json and weights each"
    assert metrics >= 20
    assert "DIFFERS" not in table
    for name in ("models/prior/", "models/decoder_unet_1/", "clip/final_loss", "fidelity_all"):
        assert name in table, f"{name} was not compared"
    for timing in ("time/", "samples_per_s", "sample_seconds_per_image", "resumed_from_step"):
        assert timing not in table, f"{timing}: timings are not compared"

    runs = _runs(root)
    assert len(runs) == 2
    assert runs[1].data.tags["reproduces"] == original
    # a step ZenML hands back from its cache logs nothing: these were trained again
    assert runs[1].data.metrics["decoder_unet_0/steps"] == 120
    assert runs[1].data.tags["data_md5"] == runs[0].data.tags["data_md5"]
    assert runs[1].data.tags["download_skipped"] == "True", "the snapshot's data, not a download"
    work = root / ".cache" / "reproduce" / original
    head = run(["git", "rev-parse", "HEAD"], work).stdout.strip()
    assert head == runs[0].data.tags["git_commit"]
    assert (work / "data.dvc").read_text() == (root / "data.dvc").read_text()
    assert any((root / ".dvc" / "cache").rglob("*.dir")), "pulled into the project's cache"


def test_a_run_from_another_lock_is_refused_before_anything_trains(
    first_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    from dalle2.edges.tracking import environment

    root = first_run
    uri = f"sqlite:///{root}/mlruns.db"
    client = MlflowClient(tracking_uri=uri)
    runs = _runs(root)
    original = runs[0].info.run_id
    recorded = runs[0].data.tags["env.lock_sha256"]
    assert recorded == environment.lock_sha256(root), "the run logged the project's uv.lock"
    freeze = client.download_artifacts(original, environment.ARTIFACT, str(root / ".cache"))
    assert f"torch=={version('torch')}" in Path(freeze).read_text().splitlines()
    client.set_tag(original, "env.lock_sha256", "0" * 64)  # as if trained from another lock
    monkeypatch.setenv("ZENML_REPOSITORY_PATH", str(root))
    monkeypatch.chdir(root)
    capsys.readouterr()  # the download above may draw MLflow's progress bar: not the CLI's
    try:  # the console script's own entry point, in this process (its start-up costs ~10 s)
        code = main(["reproduce", original, "--tracking-uri", uri])
    finally:
        client.set_tag(original, "env.lock_sha256", recorded)
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert (
        f"reproduce: the lock differs: the run had uv.lock {'0' * 12}, this checkout has "
        f"{recorded[:12]}" in out
    )
    assert err.strip() == (
        f"dalle2: error: the lock differs from run {original}'s, so its weights cannot come out "
        "bit-identical; check out its commit's uv.lock and run `bash scripts/setup.sh`, "
        "or pass --other-env to train and compare anyway"
    )
    assert len(_runs(root)) == len(runs), "nothing was trained"


def test_unknown_run_is_one_sentence_and_exit_code_2(
    first_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{first_run}/mlruns.db"
    monkeypatch.chdir(first_run)
    assert main(["reproduce", "0123456789abcdef", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"dalle2: error: MLflow run 0123456789abcdef was not found at {uri}"


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


def test_a_cached_rerun_still_holds_every_model(
    first_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same command again: every training step comes from ZenML's cache, so none of
    them runs or logs, yet the new MLflow run holds the whole `models/` folder (the never
    cached register_model step logs what the cached steps did not), the first run's files,
    and `dalle2 generate --run` on it draws through the whole cascade."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{first_run / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri)
    before = _runs(first_run)
    command = [str(BIN / "zenml"), "pipeline", "run", PIPELINE, "-c", "tiny.yaml"]
    run(command, first_run, env={"PYTHONPATH": str(first_run)})
    runs = _runs(first_run)
    assert len(runs) == len(before) + 1
    rerun = runs[-1].info.run_id
    trained = [k for k in runs[-1].data.metrics if k.endswith("/final_loss")]
    assert not trained, f"{trained}: these steps ran, not from the cache"
    names = ("clip", "prior", "decoder_unet_0", "decoder_unet_1")
    held = {a.path for a in client.list_artifacts(rerun, "models")}
    assert held == {f"models/{n}" for n in names}

    def manifests(run_id: str) -> dict[str, str]:
        dst = first_run / ".cache" / f"manifests-{run_id}"
        return {
            n: Path(
                client.download_artifacts(run_id, f"models/{n}/manifest.json", str(dst))
            ).read_text()
            for n in names
        }

    assert manifests(rerun) == manifests(runs[0].info.run_id), "the first run's models"

    out = first_run / "generated-cached"
    monkeypatch.chdir(first_run)
    args = ["generate", "a red circle", "--run", rerun, "--tracking-uri", uri, "--out", str(out)]
    assert main([*args, "--quiet"]) == 0, capsys.readouterr().err
    from PIL import Image

    assert Image.open(out / "0000.png").size == (32, 32), "both decoder stages drew"
