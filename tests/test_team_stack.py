"""The team stack of `scripts/stack.sh up`: real servers on loopback, checked as a client sees them.

Skipped while the stack is down, unless DALLE2_REQUIRE_TEAM_STACK=1 (CI), where that fails.
The values come from `$DALLE2_STACK_DIR/env` and `secrets.env` (default `<repo>/.stack`),
read explicitly: conftest.py points ZenML at a temp dir and drops MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from dalle2.edges.tracking.stack import read_env_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.team_stack


def stack_dir() -> Path:
    return Path(os.environ.get("DALLE2_STACK_DIR") or ROOT / ".stack")


def stack_secrets(directory: Path | None = None) -> dict[str, str]:
    """Every key and password of the team stack (secrets.env), by name."""
    path = (directory or stack_dir()) / "secrets.env"
    return {k: v for k, v in read_env_file(path).items() if v} if path.is_file() else {}


def _texts(paths_or_text: str | bytes | os.PathLike | Iterable) -> Iterable[tuple[str, bytes]]:
    if isinstance(paths_or_text, bytes):
        yield "<bytes>", paths_or_text
    elif isinstance(paths_or_text, str) and not os.path.exists(paths_or_text):
        # a str naming no file is text (a Path that names none is an error)
        yield "<text>", paths_or_text.encode()
    elif isinstance(paths_or_text, str | os.PathLike):
        path = Path(paths_or_text)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            yield str(f), f.read_bytes()
    else:
        for item in paths_or_text:
            yield from _texts(item)


def assert_no_secrets(
    paths_or_text: str | bytes | os.PathLike | Iterable,
    secrets: Mapping[str, str] | None = None,
) -> None:
    """Fail if any team-stack key or password occurs in the given text, bytes, files or folders.

    `paths_or_text`: a str that names no existing path is text; paths may be files or
    folders (searched whole); an iterable may mix them (e.g. `data.dvc`, a downloaded MLflow
    artifact folder). `secrets` defaults to the stack's secrets.env. The failure names the
    place and the secret's NAME, never its value.
    """
    secrets = stack_secrets() if secrets is None else secrets
    needles = {name: value.encode() for name, value in secrets.items() if len(value) >= 8}
    found = [
        f"{where}: {name}"
        for where, blob in _texts(paths_or_text)
        for name, needle in needles.items()
        if needle in blob
    ]
    assert not found, "team-stack secrets found in: " + "; ".join(found)


# --- fixtures --------------------------------------------------------------------------


def _get(url: str, auth: tuple[str, str] | None = None, timeout: float = 30) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header(
            "Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class Settings(dict):
    """The stack's settings and secrets; its repr names keys only, so a failing test's
    traceback (pytest prints fixture values) never shows a password in a CI log."""

    def __repr__(self) -> str:
        return f"<team stack settings: {', '.join(sorted(self))}>"


@pytest.fixture(scope="module")
def team() -> dict[str, str]:
    """The env file's values plus the secrets; skips (or fails in CI) when the stack is down."""
    directory = stack_dir()
    problem = None
    if not (directory / "env").is_file():
        problem = f"no team stack at {directory} (run: scripts/stack.sh up)"
    else:
        env = read_env_file(directory / "env")
        for name, url in (
            ("MLflow", env["MLFLOW_TRACKING_URI"] + "/health"),
            ("ZenML", env["ZENML_STORE_URL"] + "/health"),
        ):
            try:
                _get(url, timeout=5)
            except OSError as e:
                problem = f"the team stack's {name} server at {url} is down ({e})"
                problem += "; run scripts/stack.sh up"
                break
    if problem:
        if os.environ.get("DALLE2_REQUIRE_TEAM_STACK") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    return Settings({**stack_secrets(directory), **env})


def client_env(team: Mapping[str, str], tmp_path: Path, *, aws: bool = True) -> dict[str, str]:
    """A subprocess environment of a fresh client shell that sourced the env file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ZENML_", "AWS_"))}
    env.update(
        {k: v for k, v in team.items() if not k.startswith("DALLE2_") or k == "DALLE2_DVC_REMOTE"}
    )
    if not aws:
        env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    env["ZENML_CONFIG_PATH"] = str(tmp_path / "zenml-config")
    env["ZENML_REPOSITORY_PATH"] = str(tmp_path)  # no .zen here: the global config decides
    env["DVC_SITE_CACHE_DIR"] = str(tmp_path / "dvc-site")
    return env


# --- (a) (b) MLflow: basic auth and per-experiment permissions --------------------------


def test_mlflow_requires_credentials(team):
    url = team["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(url) == 401
    assert _get(url, ("nobody", "wrong-password")) == 401
    assert _get(url, (team["MLFLOW_TRACKING_USERNAME"], team["MLFLOW_TRACKING_PASSWORD"])) == 200


def test_outsider_cannot_read_trainers_experiment(team):
    base = team["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow"
    trainer = (team["MLFLOW_TRACKING_USERNAME"], team["MLFLOW_TRACKING_PASSWORD"])
    outsider = ("outsider", team["DALLE2_MLFLOW_OUTSIDER_PASSWORD"])

    def post(path, body, auth):
        req = urllib.request.Request(
            f"{base}/{path}",
            data=json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                "Authorization": "Basic " + base64.b64encode(":".join(auth).encode()).decode(),
            },
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    exp_id = post("experiments/create", {"name": f"team-stack-test-{uuid.uuid4().hex}"}, trainer)[
        "experiment_id"
    ]
    try:
        assert _get(f"{base}/experiments/get?experiment_id={exp_id}", trainer) == 200
        assert _get(f"{base}/experiments/get?experiment_id={exp_id}", outsider) == 403
        assert _get(f"{base}/experiments/get?experiment_id={exp_id}") == 401
    finally:
        post("experiments/delete", {"experiment_id": exp_id}, trainer)


def test_mlflow_artifacts_go_through_the_server_to_s3(team, tmp_path):
    """A client with only the tracking URI and trainer's login logs and reads an artifact."""
    script = textwrap.dedent(
        """
        import uuid, mlflow, boto3
        client = mlflow.MlflowClient()
        exp = client.create_experiment(f"team-stack-artifacts-{uuid.uuid4().hex}")
        run = client.create_run(exp)
        client.log_text(run.info.run_id, "hello team stack", "notes/hello.txt")
        path = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="notes/hello.txt", dst_path="dl")
        assert open(path).read() == "hello team stack"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(
            Bucket="mlflow", Prefix="artifacts/" + exp + "/").get("Contents", [])]
        assert any(k.endswith("notes/hello.txt") for k in keys), keys
        client.delete_experiment(exp)
        print("ok")
        """
    )
    env = client_env(team, tmp_path)
    r = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_s3_refuses_anonymous_requests(team):
    assert _get(team["AWS_ENDPOINT_URL"] + "/mlflow") == 403


# --- (c) ZenML ---------------------------------------------------------------------------


def test_zenml_client_sees_team_stack_and_writes_to_s3(team, tmp_path):
    """Env vars alone connect a fresh client; the artifact store reads and writes S3 with
    the `s3_secret` (the AWS_* variables are removed), the tracker resolves `mlflow_secret`."""
    script = textwrap.dedent(
        """
        import os, uuid
        from zenml.client import Client
        from zenml.enums import StackComponentType as T
        from zenml.io import fileio

        c = Client()
        c.activate_stack("team_stack")
        stack = c.active_stack
        model = c.get_stack("team_stack")
        store = model.components[T.ARTIFACT_STORE][0]
        tracker = model.components[T.EXPERIMENT_TRACKER][0]
        assert (store.flavor_name, tracker.flavor_name) == ("s3", "mlflow"), (store, tracker)
        assert model.components[T.ORCHESTRATOR][0].flavor_name == "local"
        assert stack.artifact_store.path == "s3://zenml/artifacts"
        cfg = stack.experiment_tracker.config
        assert cfg.tracking_uri == os.environ["MLFLOW_TRACKING_URI"]
        assert cfg.tracking_username == os.environ["MLFLOW_TRACKING_USERNAME"]
        assert cfg.tracking_password == os.environ["MLFLOW_TRACKING_PASSWORD"]

        path = f"{stack.artifact_store.path}/tests/{uuid.uuid4().hex}.txt"
        with fileio.open(path, "w") as f:
            f.write("written through ZenML")
        assert fileio.exists(path)
        with fileio.open(path, "r") as f:
            assert f.read() == "written through ZenML"
        fileio.remove(path)
        assert not fileio.exists(path)
        print("ok")
        """
    )
    env = client_env(team, tmp_path, aws=False)
    assert "ZENML_STORE_URL" in env and "ZENML_STORE_API_KEY" in env
    # a file, not `python -c`: ZenML takes its source root from the main module's path
    (tmp_path / "check_stack.py").write_text(script)
    r = subprocess.run(
        [sys.executable, "check_stack.py"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.stdout + r.stderr)[-3000:]


# --- (d) DVC -----------------------------------------------------------------------------


def test_dvc_push_pull_through_team_remote(team, tmp_path):
    """The checkout's `team` remote (.dvc/config.local), copied into a temp DVC project."""

    def dvc(*args, cwd):
        return subprocess.run(
            [sys.executable, "-m", "dvc", *args],
            cwd=cwd,
            env=client_env(team, tmp_path, aws=False),  # the keys come from config.local
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    # `up` registers the remote in the checkout whose stack it is (.stack's parent)
    checkout = stack_dir().parent if (stack_dir().parent / ".dvc").is_dir() else ROOT
    settings = dict(
        line.split("=", 1)
        for line in dvc("config", "--local", "--list", cwd=checkout).splitlines()
        if line.startswith("remote.team.")
    )
    assert settings.get("remote.team.url", "").startswith("s3://"), "no DVC remote 'team'"
    proj = tmp_path / "proj"
    proj.mkdir()
    dvc("init", "-q", "--no-scm", cwd=proj)
    for key, value in settings.items():
        dvc("config", "--local", key, value, cwd=proj)
    content = f"team stack dvc test {uuid.uuid4().hex}\n"
    (proj / "small.txt").write_text(content)
    dvc("add", "-q", "small.txt", cwd=proj)
    dvc("push", "-q", "-r", "team", cwd=proj)
    (proj / "small.txt").unlink()
    subprocess.run(["rm", "-rf", str(proj / ".dvc" / "cache")], check=True)
    dvc("pull", "-q", "-r", "team", cwd=proj)
    assert (proj / "small.txt").read_text() == content
    assert_no_secrets([proj / "small.txt.dvc", proj / ".dvc" / "config"], team)

    import boto3

    md5 = hashlib.md5(content.encode()).hexdigest()
    bucket, _, prefix = settings["remote.team.url"][len("s3://") :].partition("/")
    key = f"{prefix.rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}".lstrip("/")
    s3 = boto3.client(
        "s3",
        endpoint_url=settings["remote.team.endpointurl"],
        aws_access_key_id=team["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=team["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    s3.head_object(Bucket=bucket, Key=key)  # it is really in the bucket
    s3.delete_object(Bucket=bucket, Key=key)


# --- (e) no secret in the repository -------------------------------------------------------


def test_no_secret_in_tracked_files(team):
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    paths = [ROOT / p.decode() for p in tracked if p and (ROOT / p.decode()).is_file()]
    assert len(paths) > 10
    assert_no_secrets(paths, stack_secrets())
    assert_no_secrets(paths, {k: v for k, v in team.items() if "PASSWORD" in k or "KEY" in k})


def test_assert_no_secrets_catches_a_secret(tmp_path):
    secrets = {"DALLE2_S3_SECRET_KEY": "0123456789abcdef"}
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "leak.dvc").write_text("key: 0123456789abcdef\n")
    with pytest.raises(AssertionError, match=r"leak\.dvc: DALLE2_S3_SECRET_KEY"):
        assert_no_secrets(tmp_path, secrets)
    with pytest.raises(AssertionError) as info:
        assert_no_secrets("text with 0123456789abcdef inside", secrets)
    assert "0123456789abcdef" not in str(info.value)
    assert_no_secrets(["clean text", b"clean bytes"], secrets)
    with pytest.raises(FileNotFoundError):
        assert_no_secrets(tmp_path / "missing.dvc", secrets)


def test_state_files_are_private(team):
    directory = stack_dir()
    for name in ("env", "secrets.env"):
        assert (directory / name).stat().st_mode & 0o077 == 0, name
    local = ROOT / ".dvc" / "config.local"
    if local.exists():
        assert local.stat().st_mode & 0o077 == 0


def test_status_lists_every_server_up(team):
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "stack.sh"), "status"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "DALLE2_STACK_DIR": str(stack_dir())},
    ).stdout
    lines = {line.split()[0]: line.split() for line in out.splitlines()}
    assert set(lines) == {"postgres", "s3", "mlflow", "zenml"}, out
    assert all(words[1] == "up" for words in lines.values()), out
