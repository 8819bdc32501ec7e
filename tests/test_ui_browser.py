"""In a real (headless) Chromium: the MLflow UI and the ZenML dashboard show what was logged.

The fixtures start throw-away servers in a temp dir (MLflow with basic auth on SQLite, an
authenticated ZenML server), log a run / register a model / run a two-step pipeline, and hand
the checks only a Site (URL, credentials, what to look for): to point the checks at another
stack, swap the two *_site fixtures. Screenshots land in $DALLE2_SCREENSHOT_DIR (default: a
pytest temp dir), so CI can keep them as artifacts.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ui_browser import (
    MLFLOW_FIRST_VISIT_DISMISSED,
    MLFLOW_MODEL_TRAINING_MODE,
    Browser,
    find_chromium,
    mlflow_breadcrumb,
    mlflow_experiment_url,
    mlflow_page_state,
    mlflow_sidebar_mode,
    mlflow_toggle_columns,
    zenml_login,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        find_chromium() is None, reason="chromium is not installed (apt-get install chromium)"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("flask_wtf") is None,
        reason="the UIs' servers need the team extra: DALLE2_EXTRAS=dev,team bash scripts/setup.sh",
    ),
]

REPO = Path(__file__).resolve().parents[1]
METRICS = {"fidelity_all": [0.5, 0.75, 0.875], "loss": [1.2, 0.8, 0.6]}
STEPS = ("make_numbers", "add_up")
PAGE_TIMEOUT = 60.0  # seconds for a page to show its text (the 2-core CI box is slow)


@dataclass(frozen=True)
class Site:
    """A UI to check: its base URL, login, and what was logged there."""

    url: str
    username: str | None = None
    password: str | None = None
    logged: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd: list[str], log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )


def _stop(proc: subprocess.Popen) -> None:
    """Stop a server we launched and its workers (its own process group, by its id)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited: {log.read_text()[-3000:]}")
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=5) as r,
        ):
            if r.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout}s: {log.read_text()[-3000:]}")


def _clean_env(**extra: str) -> dict:
    """The environment minus the tracking/ZenML client settings of this test session."""
    drop = ("MLFLOW_TRACKING_", "ZENML_STORE_", "ZENML_CONFIG_PATH", "ZENML_REPOSITORY_PATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        MLFLOW_DISABLE_TELEMETRY="true",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        ZENML_ANALYTICS_OPT_IN="false",
        ZENML_AUTO_OPEN_DASHBOARD="false",
        PYTHONWARNINGS="ignore",
        **extra,
    )
    return env


@contextlib.contextmanager
def _environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _seed_mlflow(url: str, user: str, password: str) -> dict:
    """An experiment `unclip` (kind: custom model development) with one finished run carrying
    metrics, params and an image, and a registered model `unclip` with alias `champion`."""
    import numpy as np
    from mlflow import MlflowClient
    from PIL import Image

    with _environ(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password):
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        exp_id = client.create_experiment(
            "unclip", tags={"mlflow.experimentKind": "custom_model_development"}
        )
        run = client.create_run(exp_id, run_name="tiny-unclip")
        run_id = run.info.run_id
        client.log_param(run_id, "preset", "tiny")
        for step in range(3):
            for key, values in METRICS.items():
                client.log_metric(run_id, key, values[step], step=step)
        grid = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")
        client.log_image(run_id, Image.fromarray(grid), "samples/grid.png")
        client.log_text(run_id, "weights would be here", "model/README.txt")
        client.set_terminated(run_id)
        client.create_registered_model("unclip")
        version = client.create_model_version(
            "unclip", source=f"{run.info.artifact_uri}/model", run_id=run_id
        ).version
        client.set_registered_model_alias("unclip", "champion", version)
    return {
        "experiment": "unclip",
        "experiment_id": exp_id,
        "run_id": run_id,
        "run_name": "tiny-unclip",
        "metrics": {k: v[-1] for k, v in METRICS.items()},
        "model": "unclip",
        "alias": "champion",
        "version": str(version),
    }


TINY_PIPELINE = f"""\
import json

from zenml import pipeline, step


@step
def {STEPS[0]}() -> list[int]:
    return [1, 2, 3]


@step
def {STEPS[1]}(numbers: list[int]) -> int:
    return sum(numbers)


@pipeline(enable_cache=False)
def ui_smoke_pipeline():
    {STEPS[1]}({STEPS[0]}())


if __name__ == "__main__":
    run = ui_smoke_pipeline()
    print("ZENML_RUN " + json.dumps({{"id": str(run.id), "name": run.name,
                                      "status": str(run.status)}}))
"""


def _run_zenml_pipeline(url: str, user: str, password: str, root: Path) -> dict:
    project = root / "project"
    project.mkdir()
    (project / "tiny_pipeline.py").write_text(TINY_PIPELINE)
    env = _clean_env(
        ZENML_CONFIG_PATH=str(root / "client-config"),
        ZENML_STORE_URL=url,
        ZENML_STORE_USERNAME=user,
        ZENML_STORE_PASSWORD=password,
        ZENML_LOGGING_VERBOSITY="WARN",
        ZENML_ENABLE_RICH_TRACEBACK="false",
    )
    done = subprocess.run(
        [sys.executable, "tiny_pipeline.py"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("ZENML_RUN ")]
    if done.returncode or not lines:
        raise RuntimeError(f"pipeline failed ({done.returncode}): {done.stderr[-3000:]}")
    run = json.loads(lines[-1].removeprefix("ZENML_RUN "))
    return {"run_id": run["id"], "run_name": run["name"], "status": run["status"], "steps": STEPS}


def _start_mlflow(root: Path, procs: list[subprocess.Popen]) -> Site:
    """MLflow with basic auth on SQLite, as the team stack runs it; seeded once healthy.

    $DALLE2_UI_MLFLOW_PYTHON: the interpreter whose MLflow serves the UI (default this one),
    e.g. a venv with a newer MLflow, to see what its UI does with the same data.
    """
    ml_dir = root / "mlflow"
    ml_dir.mkdir()
    port, user, password = _free_port(), "admin", secrets.token_urlsafe(12)
    auth_ini = ml_dir / "basic_auth.ini"
    auth_ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{ml_dir}/auth.db\n"
        f"admin_username = {user}\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = _clean_env(
        MLFLOW_AUTH_CONFIG_PATH=str(auth_ini), MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16)
    )
    python = os.environ.get("DALLE2_UI_MLFLOW_PYTHON") or sys.executable
    cmd = [python, "-m", "mlflow", "server", "--app-name", "basic-auth"]
    cmd += ["--backend-store-uri", f"sqlite:///{ml_dir}/mlflow.db"]
    cmd += ["--artifacts-destination", str(ml_dir / "artifacts")]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = ml_dir / "server.log"
    procs.append(proc := _launch(cmd, log, env, ml_dir))
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(f"{url}/health", proc, log)
    return Site(url, user, password, _seed_mlflow(url, user, password))


def _start_zenml(root: Path, procs: list[subprocess.Popen]) -> Site:
    """A ZenML server with password auth (as the team stack; `zenml login --local` runs
    NO_AUTH and, here, 500s on every dashboard page), then one run of the tiny pipeline."""
    zn_dir = root / "zenml"
    zn_dir.mkdir()
    port, user, password = _free_port(), "admin", secrets.token_urlsafe(12)
    shutil.copy(REPO / "scripts" / "zenml_server.py", zn_dir / "server_main.py")
    env = _clean_env(
        ZENML_CONFIG_PATH=str(zn_dir / "server-config"),
        ZENML_STORE_URL=f"sqlite:///{zn_dir}/zenml.db",
        ZENML_LOCAL_STORES_PATH=str(zn_dir / "local_stores"),
        ZENML_SERVER_AUTH_SCHEME="OAUTH2_PASSWORD_BEARER",
        ZENML_SERVER_JWT_SECRET_KEY=secrets.token_hex(32),
        ZENML_SERVER_AUTO_ACTIVATE="true",
        ZENML_DEFAULT_USER_NAME=user,
        ZENML_DEFAULT_USER_PASSWORD=password,
    )
    log = zn_dir / "server.log"
    cmd = [sys.executable, "server_main.py", "127.0.0.1", str(port)]
    procs.append(proc := _launch(cmd, log, env, zn_dir))
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(f"{url}/health", proc, log)
    return Site(url, user, password, _run_zenml_pipeline(url, user, password, zn_dir))


@pytest.fixture(scope="module")
def _servers(request, tmp_path_factory):
    """Start the servers the selected tests need, all at once, each seeded in a background
    thread as soon as it is up (the ZenML pipeline runs while the MLflow checks do).
    Yields {"mlflow": Future[Site], "zenml": Future[Site]} (only the needed ones)."""
    wanted = {name for item in request.session.items for name in item.fixturenames}
    root = tmp_path_factory.mktemp("ui-servers")
    procs: list[subprocess.Popen] = []
    pool = ThreadPoolExecutor(2)
    starters = {"mlflow": _start_mlflow, "zenml": _start_zenml}
    try:
        yield {
            name: pool.submit(start, root, procs)
            for name, start in starters.items()
            if f"{name}_site" in wanted
        }
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for proc in procs:
            _stop(proc)


@pytest.fixture(scope="module")
def mlflow_site(_servers) -> Site:
    return _servers["mlflow"].result(timeout=400)


@pytest.fixture(scope="module")
def zenml_site(_servers) -> Site:
    return _servers["zenml"].result(timeout=400)


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory) -> Path:
    if path := os.environ.get("DALLE2_SCREENSHOT_DIR"):
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        return out
    return tmp_path_factory.mktemp("ui-screenshots")


@contextlib.contextmanager
def _browser(site: Site, *, fresh: bool = False, storage: dict | None = None):
    """A browser logged in to site. Fresh: an empty profile, as a first-time visitor has.
    Else a returning MLflow user's localStorage (pop-ups closed, sidebar on Model training),
    or `storage`."""
    with Browser() as b:
        if site.username:
            b.set_credentials(site.url, site.username, site.password or "")
        if not fresh:
            items = {**MLFLOW_FIRST_VISIT_DISMISSED, **MLFLOW_MODEL_TRAINING_MODE}
            # a plain page of the same origin: no need to boot the whole app for it
            b.set_local_storage(f"{site.url}/health", storage if storage is not None else items)
        yield b


# ------------------------------------------------------------------------------ MLflow


def _run_url(site: Site) -> str:
    return mlflow_experiment_url(
        site.url, site.logged["experiment_id"], run_id=site.logged["run_id"]
    )


def test_mlflow_runs_page_lists_the_run_and_its_metric(mlflow_site, screenshot_dir):
    logged = mlflow_site.logged
    with _browser(mlflow_site) as b:
        b.open(mlflow_experiment_url(mlflow_site.url, logged["experiment_id"]))
        b.wait_for_text(logged["run_name"], "1 matching run", timeout=PAGE_TIMEOUT)
        mlflow_toggle_columns(b, "Dataset", *logged["metrics"])  # Dataset off, metrics on
        text = b.wait_for_text("fidelity_all", f"{logged['metrics']['fidelity_all']}")
        assert mlflow_sidebar_mode(b) == "machine_learning", text[:800]
        b.screenshot(screenshot_dir / "mlflow-runs.png")

        b.open(
            mlflow_experiment_url(mlflow_site.url, logged["experiment_id"], run_id=logged["run_id"])
        )
        text = b.wait_for_text(
            logged["run_name"], "fidelity_all", "Parameters", timeout=PAGE_TIMEOUT
        )
        for key, value in logged["metrics"].items():
            assert f"{key}\n{value}" in text, text[:1500]
        b.screenshot(screenshot_dir / "mlflow-run.png")


def test_mlflow_model_registry_shows_the_champion_alias(mlflow_site, screenshot_dir):
    logged = mlflow_site.logged
    with _browser(mlflow_site) as b:
        b.open(f"{mlflow_site.url}/#/models")
        text = b.wait_for_text(logged["model"], logged["alias"], timeout=PAGE_TIMEOUT)
        row = text[text.index("Aliased versions") :]
        # the row: name, latest version, "@ champion : Version 1" (with a no-break space)
        assert re.search(rf"{logged['model']}\s+Version \d+\s+@\s*{logged['alias']}", row), row
        b.screenshot(screenshot_dir / "mlflow-models.png")

        b.open(f"{mlflow_site.url}/#/models/{logged['model']}")
        text = b.wait_for_text(
            f"Version {logged['version']}", logged["alias"], timeout=PAGE_TIMEOUT
        )
        b.screenshot(screenshot_dir / "mlflow-model-unclip.png")


def _mlflow_version(site: Site) -> str:
    request = urllib.request.Request(f"{site.url}/version")
    if site.username:
        token = base64.b64encode(f"{site.username}:{site.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.read().decode()


def test_mlflow_fresh_browser_lands_on_genai_pages(mlflow_site, screenshot_dir):
    """Record where a fresh browser lands on a custom_model_development experiment.

    MLflow 3.17.2 (and 3.18.0) keep the GenAI / Model training switch in localStorage
    (`mlflow.workflowType`, default GenAI) and ignore `mlflow.experimentKind`
    (mlflow/mlflow#24498): the bare experiment link opens the GenAI overview, and a run's
    breadcrumb says "Evaluations". If this fails because MLflow now lands on the training
    runs, #24498 is fixed for us: the ?workflowType=machine_learning links can go.
    """
    logged = mlflow_site.logged
    record: dict = {"experiment_id": logged["experiment_id"]}
    with _browser(mlflow_site, fresh=True) as b:
        b.open(f"{mlflow_site.url}/#/experiments/{logged['experiment_id']}")
        record["experiment_link"] = mlflow_page_state(b, logged["experiment_id"], PAGE_TIMEOUT)
        record["mlflow_version"] = _mlflow_version(mlflow_site)
        b.screenshot(screenshot_dir / "mlflow-fresh-experiment-link.png")
    with _browser(mlflow_site, fresh=True) as b:
        b.open(f"{mlflow_site.url}/#/experiments/{logged['experiment_id']}/runs/{logged['run_id']}")
        b.wait_for_text(logged["run_name"], "fidelity_all", timeout=PAGE_TIMEOUT)
        record["run_link"] = {"breadcrumb": mlflow_breadcrumb(b), "sidebar": mlflow_sidebar_mode(b)}
        b.screenshot(screenshot_dir / "mlflow-fresh-run-link.png")
    # the same link in a browser whose localStorage holds the switch on "Model training"
    with _browser(mlflow_site, storage=MLFLOW_MODEL_TRAINING_MODE) as b:
        b.open(f"{mlflow_site.url}/#/experiments/{logged['experiment_id']}")
        record["experiment_link_model_training_in_localStorage"] = mlflow_page_state(
            b, logged["experiment_id"], PAGE_TIMEOUT
        )
    (screenshot_dir / "mlflow-fresh-browser.json").write_text(json.dumps(record, indent=2))

    landed = record["experiment_link"]
    assert landed["tab"] == "overview" and landed["sidebar"] == "genai", record
    assert landed["workflowType_param"] == "genai", record
    assert not landed["localStorage_workflowType"], record  # the default, never stored
    assert "Evaluations" in record["run_link"]["breadcrumb"], record
    # ... and it is localStorage that decides: with the switch stored, the runs open
    stored = record["experiment_link_model_training_in_localStorage"]
    assert stored["tab"] == "runs" and stored["sidebar"] == "machine_learning", record


def test_mlflow_direct_link_opens_training_runs_in_a_fresh_browser(mlflow_site, screenshot_dir):
    logged = mlflow_site.logged
    url = mlflow_experiment_url(mlflow_site.url, logged["experiment_id"])
    with _browser(mlflow_site, fresh=True) as b:
        b.open(url)
        text = b.wait_for_text(
            logged["run_name"], "Run Name", "1 matching run", timeout=PAGE_TIMEOUT
        )
        landed = mlflow_page_state(b, logged["experiment_id"], PAGE_TIMEOUT)
        assert landed["tab"] == "runs" and landed["sidebar"] == "machine_learning", landed
        assert landed["workflowType_param"] == "machine_learning", landed
        assert "Judges" not in text and "Model registry" in text, text[:800]
        b.screenshot(screenshot_dir / "mlflow-fresh-direct-link.png")

        b.open(
            mlflow_experiment_url(mlflow_site.url, logged["experiment_id"], run_id=logged["run_id"])
        )
        b.wait_for_text(logged["run_name"], "fidelity_all", timeout=PAGE_TIMEOUT)
        crumb = mlflow_breadcrumb(b)
        assert "Runs" in crumb and "Evaluations" not in crumb, crumb


# ------------------------------------------------------------------------------ ZenML


def test_zenml_run_page_shows_the_run_and_its_step_graph(zenml_site, screenshot_dir):
    logged = zenml_site.logged
    with Browser() as b:
        zenml_login(b, zenml_site.url, zenml_site.username or "", zenml_site.password or "")
        b.open(f"{zenml_site.url}/projects/default/runs/{logged['run_id']}")
        # the step graph is drawn after the run and its steps load: real time, not a budget
        text = b.wait_for_text(
            logged["run_name"], *logged["steps"], "completed", timeout=PAGE_TIMEOUT
        )
        nodes = b.evaluate(
            "[...document.querySelectorAll('.react-flow__node')].map(n => n.innerText)"
        )
        assert all(any(step in node for node in nodes) for step in logged["steps"]), (nodes, text)
        b.screenshot(screenshot_dir / "zenml-run.png")
