"""`dalle2 reproduce`: a tiny pipeline run trained again from its commit, config and data.

The project is a git clone of this repository's files (reproduce checks a commit out), with
the ZenML stack and relative MLflow URI scripts/setup.sh registers, and its own ZenML store
(the e2e test's store already holds a tracker of this name).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from test_pipeline_e2e import BIN, PIPELINE, REPO

from dalle2.tracking import environment
from steps._shared import git_commit

TINY = REPO / "tests" / "configs" / "tiny.yaml"
EXPERIMENT = "unclip-test"  # tiny.yaml's


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A committed copy of the repository that ran tiny.yaml once; (root, env for commands)."""
    state = tmp_path_factory.mktemp("reproduce")
    root = state / "project"
    env = {
        **os.environ,
        "ZENML_CONFIG_PATH": str(state / "zenml-config"),
        "ZENML_REPOSITORY_PATH": str(root),
    }
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, tracked):
        if (REPO / name).is_file():  # the working tree's version: what these tests test
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    # tiny.yaml's base unet trains 120 steps so the resume test can kill it mid-way; 20 (two
    # checkpoints) show the same here, in a fraction of the time, twice
    config = yaml.safe_load(TINY.read_text())
    config["parameters"]["config"]["decoder"][0]["train"]["steps"] = 20
    (root / "tiny.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run(["git", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "snapshot"], root, env)
    zenml = str(BIN / "zenml")
    run([zenml, "init"], root, env)
    uri = "--tracking_uri=sqlite:///mlruns.db"  # relative, as scripts/setup.sh registers it
    run(
        [zenml, "experiment-tracker", "register", "mlflow_tracker", "--flavor=mlflow", uri],
        root,
        env,
    )
    components = ["-o", "default", "-a", "default", "-e", "mlflow_tracker"]
    run([zenml, "stack", "register", "unclip_stack", *components, "--set"], root, env)
    # the committed copy's code, not the editable install's (which others may be editing)
    run(
        [zenml, "pipeline", "run", PIPELINE, "-c", "tiny.yaml"],
        root,
        {**env, "PYTHONPATH": str(root)},
    )
    return root, env


def _runs(root: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_reproduce_latest_trains_the_same_models_and_metrics(
    project: tuple[Path, dict[str, str]],
) -> None:
    root, env = project
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
        env,
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
    assert runs[1].data.metrics["decoder_unet_0/steps"] == 20
    work = root / ".cache" / "reproduce" / original
    head = run(["git", "rev-parse", "HEAD"], work, env).stdout.strip()
    assert head == runs[0].data.tags["git_commit"]
    assert (work / "data.dvc").read_text() == (root / "data.dvc").read_text()
    assert any((root / ".dvc" / "cache").rglob("*.dir")), "pulled into the project's cache"


def test_a_run_from_another_lock_is_refused_before_anything_trains(
    project: tuple[Path, dict[str, str]],
) -> None:
    from mlflow import MlflowClient

    root, env = project
    uri = f"sqlite:///{root}/mlruns.db"
    client = MlflowClient(tracking_uri=uri)
    runs = _runs(root)
    original = runs[0].info.run_id
    recorded = runs[0].data.tags["env.lock_sha256"]
    assert recorded == environment.lock_sha256(root), "the run logged the project's uv.lock"
    freeze = client.download_artifacts(original, environment.ARTIFACT, str(root / ".cache"))
    assert f"torch=={version('torch')}" in Path(freeze).read_text().splitlines()
    client.set_tag(original, "env.lock_sha256", "0" * 64)  # as if trained from another lock
    try:
        proc = subprocess.run(
            [str(BIN / "dalle2"), "reproduce", original, "--tracking-uri", uri],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        client.set_tag(original, "env.lock_sha256", recorded)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (
        f"reproduce: the lock differs: the run had uv.lock {'0' * 12}, this checkout has "
        f"{recorded[:12]}" in proc.stdout
    )
    assert proc.stderr.strip() == (
        f"dalle2: error: the lock differs from run {original}'s, so its weights cannot come out "
        "bit-identical; check out its commit's uv.lock and run `bash scripts/setup.sh`, "
        "or pass --other-env to train and compare anyway"
    )
    assert len(_runs(root)) == len(runs), "nothing was trained"


def test_unknown_run_is_one_sentence_and_exit_code_2(
    project: tuple[Path, dict[str, str]],
) -> None:
    root, env = project
    uri = f"sqlite:///{root}/mlruns.db"
    proc = subprocess.run(
        [str(BIN / "dalle2"), "reproduce", "0123456789abcdef", "--tracking-uri", uri],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == f"dalle2: error: MLflow run 0123456789abcdef was not found at {uri}"
    )


def test_the_data_pointer_alone_does_not_make_a_checkout_dirty(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "data.dvc").write_text("outs: [{md5: a.dir}]\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "-A")
    git("commit", "-qm", "one")
    assert git_commit(tmp_path)[1] is False
    (tmp_path / "data.dvc").write_text("outs: [{md5: b.dir}]\n")  # the pipeline's own rewrite
    assert git_commit(tmp_path)[1] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path)[1] is True
