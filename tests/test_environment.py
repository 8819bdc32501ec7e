"""What a run records of its environment, how a reproduction tells two apart, and the lock
that set-up installs (uv.lock, checked against pyproject.toml)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from dalle2.edges.tracking import environment
from dalle2.edges.tracking.environment import Environment
from steps._git import git_commit

REPO = Path(__file__).resolve().parents[1]


def _env(**changes: object) -> Environment:
    base = {
        "lock_sha256": "a" * 64,
        "packages": {"numpy": "2.4.6", "torch": "2.15.0", "mlflow": "3.17.2"},
        "python": "3.11.7",
        "torch": "2.15.0",
        "device": "cpu (x86_64)",
    }
    return Environment(**{**base, **changes})


def test_the_same_environment_has_no_differences() -> None:
    assert environment.differences(_env(), _env()) == []


def test_each_difference_is_one_sentence() -> None:
    then = _env()
    now = _env(
        lock_sha256="b" * 64,
        packages={"numpy": "2.5.5", "torch": "2.15.0", "pandas": "2.3.3"},
        device="cuda (NVIDIA H200, CUDA 13.0)",
    )
    found = environment.differences(then, now)
    assert found == [
        f"the lock differs: the run had uv.lock {'a' * 12}, this checkout has {'b' * 12}",
        "device differs: cpu (x86_64) in the run, cuda (NVIDIA H200, CUDA 13.0) now",
        "3 installed package(s) differ: mlflow 3.17.2 -> (absent), numpy 2.4.6 -> 2.5.5, "
        "pandas (absent) -> 2.3.3",
    ]


def test_what_a_run_logs_reads_back_as_the_same_environment(tmp_path: Path) -> None:
    (tmp_path / "uv.lock").write_text("version = 1\n")
    env = environment.current(tmp_path, torch.device("cpu"))
    assert env.torch == torch.__version__
    assert env.packages["torch"] == version("torch")
    assert env.lock_sha256 != environment.NO_LOCK
    back = environment.recorded(env.tags(), env.freeze())
    assert back == env
    assert back.packages_sha256 == env.tags()["env.packages_sha256"]
    assert environment.recorded({"git_commit": "abc"}, "") is None, "a run from before env.*"


def test_served_requirements_are_the_locks_versions(tmp_path: Path) -> None:
    (tmp_path / "uv.lock").write_text(
        'version = 1\n[[package]]\nname = "einops"\nversion = "0.0.1"\n'
        '[[package]]\nname = "numpy"\nversion = "1.0"\n'
        '[[package]]\nname = "numpy"\nversion = "2.0"\n'
    )
    pins = environment.lock_pins(tmp_path, ("einops", "numpy", "no-such-package-here"))
    # the lock's version even where another is installed; two locked: the installed one
    assert pins == ["einops==0.0.1", f"numpy=={version('numpy')}", "no-such-package-here"]


def test_the_committed_lock_pins_every_dependency_of_pyproject() -> None:
    """uv.lock is the one the project's own pyproject resolves to (set-up installs it)."""
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    root = next(p for p in lock["package"] if p["name"] == "dalle2-pipeline")
    locked = {environment.normalize(d["name"]) for d in root["metadata"]["requires-dist"]}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        wanted += extra
    for req in wanted:
        name = environment.normalize(req.split("[")[0].split(">")[0].split("<")[0].split("=")[0])
        name = environment.normalize(name.split("~")[0].split("!")[0].strip())
        assert name in locked, f"{name} is in pyproject.toml but not in uv.lock"


def _uv() -> str:
    found = shutil.which("uv") or str(REPO / ".cache" / "uv-tool" / "bin" / "uv")
    if not Path(found).is_file():
        pytest.skip("uv is not installed (scripts/setup.sh installs it)")
    return found


def test_set_up_stops_on_a_stale_lock_in_one_sentence(tmp_path: Path) -> None:
    """A dependency dropped from pyproject.toml without `uv lock`: set-up installs nothing
    other than the lock, and says what to run."""
    for name in ("pyproject.toml", "uv.lock", "README.md", "scripts/setup.sh"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "dalle2").mkdir()
    (tmp_path / "dalle2" / "__init__.py").write_text("")
    text = (tmp_path / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(text.replace('    "einops>=0.7",\n', "", 1))
    proc = subprocess.run(
        ["bash", "scripts/setup.sh"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": f"{Path(_uv()).parent}:{os.environ['PATH']}"},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "set-up stopped: uv.lock does not match pyproject.toml (or could not be installed, "
        "see above); run 'uv lock' and commit uv.lock"
    )
    assert "needs to be updated" in proc.stderr  # uv's own reason, above it
    assert not (tmp_path / ".venv" / "bin" / "zenml").exists(), "nothing was installed"


def test_equal_files_in_another_environment_are_not_called_reproduced(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dalle2.edges.tracking.reproduce import Row, report

    rows = [Row("models/prior/weights.safetensors", "ab" * 32, "ab" * 32)]
    assert report(rows, "run1", "run2") is True
    assert "reproduced: all 1 model files and 0 metrics are equal" in capsys.readouterr().out
    assert report(rows, "run1", "run2", ["torch differs: 2.14.1 in the run, 2.15.0 now"]) is False
    assert capsys.readouterr().out.splitlines()[-1] == (
        "equal but not an exact reproduction: all 1 model files and 0 metrics are equal in "
        "another environment (torch differs: 2.14.1 in the run, 2.15.0 now)"
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
