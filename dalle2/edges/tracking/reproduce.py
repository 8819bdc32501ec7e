"""`dalle2 reproduce RUN_ID`: train a past pipeline run again and say whether it came out equal.

A pipeline run records what it takes to rebuild it (steps/download_images.py): the git
commit (tag `git_commit`), the resolved config (`run/config.yaml`), the DVC pointer of its
data (`run/<data_dir>.dvc`) and its environment (environment.py). Reproducing first
says how this environment differs from the run's, and stops when the lock differs unless
told to go on: other packages train other weights. It then checks the commit out into a git
worktree of its own, so the user's checkout is never touched; pulls that exact data into it
through the project's DVC cache and remotes; runs the pipeline there with ZenML's cache
off, so every model is trained again rather than handed back from the original run; and
compares the two MLflow runs: every model file by sha256, every metric by value. Metrics
that measure the machine (time, throughput) or the run's history (a resumed step) are not
compared.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dalle2.config import DataConfig
from dalle2.data.versioning import VersioningError, find_project_root, remote_args
from dalle2.device import pick_device
from dalle2.edges.tracking import environment
from dalle2.edges.tracking.environment import Environment
from dalle2.edges.tracking.stack import active_tracker

# Metrics that describe the machine, how the run got there or the registry's state when it
# ended (a reproduction finds the original as champion), not what it trained.
UNCOMPARED_METRICS = (
    "time/*",
    "*samples_per_s*",
    "*sample_seconds_per_image",
    "*resumed_from_step",
    "registry/*",
)
TRACKER_SETTINGS = "experiment_tracker.mlflow"
TAG = "reproduces"


class ReproduceError(Exception):
    """Something that stops a reproduction before it can compare; printed as one sentence."""


@dataclass
class RecordedRun:
    """What a pipeline run logged so that it can be trained again."""

    run_id: str
    commit: str
    experiment: str  # the MLflow experiment it lies in
    run_yaml: dict[str, Any]  # its ZenML run config: `parameters` (+ `settings`, `steps`)
    data_dir: str
    pointer: bytes  # `<data_dir>.dvc` after the run: `dvc pull` of it restores the data
    environment: Environment | None  # None for a run from before runs recorded it


@dataclass
class Row:
    """One compared item: a model file's sha256 or a metric's value, in both runs."""

    name: str
    original: str
    new: str

    @property
    def equal(self) -> bool:
        return self.original == self.new


def _download(client: Any, run_id: str, path: str, dst: Path) -> Path:
    return Path(client.download_artifacts(run_id, path, str(dst)))


def read_run(client: Any, run_id: str) -> RecordedRun:
    """Read what `run_id` recorded for its reproduction, or say in one sentence what it lacks."""
    run = client.get_run(run_id)
    commit = run.data.tags.get("git_commit")
    if not commit or commit == "unknown":
        raise ReproduceError(
            f"MLflow run {run_id} recorded no git commit (tag git_commit), so its code "
            "cannot be checked out; it ran outside a git checkout or before the tag existed"
        )
    recorded = {a.path for a in client.list_artifacts(run_id, "run")}
    if "run/config.yaml" not in recorded:
        raise ReproduceError(
            f"MLflow run {run_id} has no run/config.yaml artifact; only runs whose "
            "download_images step logged to the experiment tracker can be reproduced"
        )
    with tempfile.TemporaryDirectory() as tmp:
        run_yaml = yaml.safe_load(
            _download(client, run_id, "run/config.yaml", Path(tmp)).read_text()
        )
        config = run_yaml["parameters"]["config"]
        data_dir = config.get("data", {}).get(
            "data_dir", DataConfig.model_fields["data_dir"].default
        )
        if f"run/{data_dir}.dvc" not in recorded:
            raise ReproduceError(
                f"MLflow run {run_id} has no run/{data_dir}.dvc artifact, so its data "
                "snapshot is unknown"
            )
        pointer = _download(client, run_id, f"run/{data_dir}.dvc", Path(tmp)).read_bytes()
        freeze = ""
        if environment.ARTIFACT in recorded:
            freeze = _download(client, run_id, environment.ARTIFACT, Path(tmp)).read_text()
    env = environment.recorded(run.data.tags, freeze)
    experiment = client.get_experiment(run.info.experiment_id).name
    return RecordedRun(run_id, commit, experiment, run_yaml, data_dir, pointer, env)


def check_environment(recorded: RecordedRun, project: Path, other_env: bool) -> list[str]:
    """Say how this environment differs from the run's, one sentence each; stop when the
    lock differs (other packages train other weights) unless `other_env` lets it go on.
    Returns the differences, which keep the verdict from calling a reproduction exact."""
    if recorded.environment is None:
        print(
            f"reproduce: run {recorded.run_id} recorded no environment (it predates env.* "
            "tags), so the packages it trained with are unknown",
            flush=True,
        )
        return ["the run's environment is unknown"]
    device = recorded.run_yaml["parameters"]["config"].get("device", "auto")
    now = environment.current(project, pick_device(device))
    found = environment.differences(recorded.environment, now)
    for sentence in found:
        print(f"reproduce: {sentence}", flush=True)
    if not found:
        print("reproduce: same environment (lock, packages, Python, torch, device)", flush=True)
    elif recorded.environment.lock_sha256 != now.lock_sha256 and not other_env:
        raise ReproduceError(
            f"the lock differs from run {recorded.run_id}'s, so its weights cannot come out "
            "bit-identical; check out its commit's uv.lock and run `bash scripts/setup.sh`, "
            "or pass --other-env to train and compare anyway"
        )
    return found


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    """Run a git or DVC command; a failure ends in one sentence with the tool's last line."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise ReproduceError(f"{what} failed: {lines[-1] if lines else 'no output'}")
    return proc.stdout


def _git(cwd: Path, *args: str) -> str:
    return _run(["git", *args], cwd, f"`git {' '.join(args)}`").strip()


def _dvc(cwd: Path, *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd, f"`dvc {' '.join(args)}`")


def checkout(project: Path, commit: str, dest: Path, data_dir: str) -> Path:
    """Check `commit` out into a git worktree at `dest` (or reuse one there); returns the
    project folder in it. A worktree shares the repository's objects, so this is cheap, and
    the user's own working tree is never touched."""
    if subprocess.run(["git", "rev-parse"], cwd=project, capture_output=True).returncode:
        raise ReproduceError(
            f"{project} is not in a git repository, so no commit can be checked out"
        )
    prefix = _git(project, "rev-parse", "--show-prefix")  # the project's folder in the repo
    known = subprocess.run(
        ["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=project, capture_output=True
    )
    if known.returncode:
        raise ReproduceError(
            f"commit {commit} is not in the git repository at {project}; "
            "fetch it (`git fetch`) and run again"
        )
    if dest.exists():
        found = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"],
            cwd=dest,
            capture_output=True,
            text=True,
        ).stdout.split()
        if found != [str(dest.resolve()), commit]:  # a folder inside some checkout is not one
            raise ReproduceError(
                f"{dest} exists but is not a checkout of {commit}; "
                "pass another --workdir, or remove that folder"
            )
        # The run's data pointer is written over the committed one: that change is ours.
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        lines = _run(status, dest, "`git status`").splitlines()
        changed = [line[3:] for line in lines if line[3:] != f"{prefix}{data_dir}.dvc"]
        if changed:
            raise ReproduceError(
                f"the worktree {dest} has local changes ({', '.join(changed[:3])}); "
                f"remove it (`git worktree remove --force {dest}`) and run again"
            )
        print(f"reproduce: reusing the checkout of {commit[:10]} in {dest}", flush=True)
    else:
        _git(project, "worktree", "prune")  # a worktree folder deleted by hand stays registered
        dest.parent.mkdir(parents=True, exist_ok=True)
        _git(project, "worktree", "add", "--detach", str(dest), commit)
        print(f"reproduce: checked out {commit[:10]} into {dest}", flush=True)
    return dest / prefix


def restore_data(project: Path, work: Path, recorded: RecordedRun) -> None:
    """`dvc pull` the run's data snapshot into the worktree."""
    if not (work / ".dvc").is_dir():
        raise ReproduceError(f"commit {recorded.commit} has no .dvc folder, so DVC cannot pull")
    share_dvc(project, work)
    (work / f"{recorded.data_dir}.dvc").write_bytes(recorded.pointer)
    try:
        remote = remote_args(work)  # the team stack's remote when $DALLE2_DVC_REMOTE names it
    except VersioningError as err:
        raise ReproduceError(str(err)) from None
    print(f"reproduce: dvc pull {' '.join(remote)} {recorded.data_dir}.dvc", flush=True)
    _dvc(work, "pull", "-q", *remote, f"{recorded.data_dir}.dvc")


def share_dvc(project: Path, work: Path) -> None:
    """Give a worktree the project's DVC cache and remotes.

    The worktree keeps the committed .dvc/config, but a local remote's relative URL would
    resolve inside the worktree, and its own cache would download everything again. So the
    project's config.local is carried over, every remote is pointed at the URL the project
    resolves it to, and the cache at the project's cache.
    """
    local = project / ".dvc" / "config.local"
    if local.is_file():
        shutil.copy(local, work / ".dvc" / "config.local")
    _dvc(work, "cache", "dir", "--local", _dvc(project, "cache", "dir").strip())
    urls = {}  # `dvc config --list` prints local paths resolved, later levels last
    for line in _dvc(project, "config", "--list").splitlines():
        key, _, value = line.partition("=")
        if key.startswith("remote.") and key.endswith(".url"):
            urls[key.removeprefix("remote.").removesuffix(".url")] = value
    for name, url in urls.items():
        _dvc(work, "remote", "modify", "--local", name, "url", url)


def run_config(
    recorded: RecordedRun, project: Path, work: Path, experiment: str, run_name: str
) -> dict[str, Any]:
    """The run's ZenML config, set to train every step again into `experiment`.

    run/config.yaml holds the parameters; when it holds no `settings`/`steps`, those of the
    commit's zenml_config.yaml are used (which steps log to the experiment tracker), widened
    to every step this config builds: another decoder stage, or a pretrained CLIP.
    """
    out = copy.deepcopy(recorded.run_yaml)
    template_file = work / "zenml_config.yaml"
    template = yaml.safe_load(template_file.read_text()) if template_file.is_file() else {}
    settings = out.get("settings") or copy.deepcopy(template.get("settings") or {})
    steps = out.get("steps") or copy.deepcopy(template.get("steps") or {})
    if "steps" not in out:
        trackers = {s.get("experiment_tracker") for s in steps.values() if isinstance(s, dict)}
        trackers.discard(None)
        if len(trackers) == 1:
            tracker = trackers.pop()
            config = out["parameters"]["config"]
            pretrained = (config.get("clip") or {}).get("pretrained_model") is not None
            names = ["load_pretrained_clip" if pretrained else "train_clip"]
            names += [f"train_decoder_unet_{i}" for i in range(len(config.get("decoder") or []))]
            for name in names:
                steps.setdefault(name, {"experiment_tracker": tracker})
    mlflow_settings = settings.setdefault(TRACKER_SETTINGS, {})
    mlflow_settings["experiment_name"] = experiment
    mlflow_settings["tags"] = {**(mlflow_settings.get("tags") or {}), TAG: recorded.run_id}
    _absolute_url_list(out["parameters"]["config"], project, work)
    # enable_cache: ZenML would otherwise hand back the original run's models unretrained
    head = {"enable_cache": False, "run_name": run_name, "settings": settings, "steps": steps}
    return {**head, **{k: v for k, v in out.items() if k not in head}}


def _absolute_url_list(config: dict[str, Any], project: Path, work: Path) -> None:
    """A relative URL list lies in the user's project (often DVC-tracked, so not in git):
    point the worktree's run at it there; the downloaded shards come from `dvc pull`."""
    data = config.get("data") or {}
    url_list = data.get("url_list")
    if not url_list or Path(url_list).is_absolute() or (work / url_list).exists():
        return
    if (project / url_list).exists():
        data["url_list"] = str((project / url_list).resolve())


def use_project_stack(project: Path, work: Path) -> None:
    """Give the worktree the project's ZenML repository (its active stack), and make a
    relative sqlite tracking URI (as scripts/setup.sh registers) reach the project's
    database: the pipeline runs in the worktree, where it would name a new, empty one."""
    zen_root = Path(os.environ.get("ZENML_REPOSITORY_PATH") or project)
    if (zen_root / ".zen").is_dir():
        shutil.copytree(zen_root / ".zen", work / ".zen", dirs_exist_ok=True)
    tracker = active_tracker(zen_root)
    uri = tracker.config.tracking_uri or "" if tracker else ""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri.removeprefix("sqlite:///").split("?")[0]
        link, target = work / rel, (project / rel).resolve()  # pipelines run at the root
        if not link.exists() and target.is_file():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target)


def run_pipeline(work: Path, config_file: Path) -> None:
    """`zenml pipeline run` in the worktree, its output streamed; the commit's own code runs
    (PYTHONPATH), not the editable install of the user's checkout."""
    zenml = Path(sys.executable).parent / "zenml"
    cmd = [str(zenml) if zenml.exists() else "zenml", "pipeline", "run"]
    cmd += ["pipelines.unclip.unclip_pipeline", "-c", str(config_file)]
    path = [str(work), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "ZENML_REPOSITORY_PATH": str(work), "PYTHONPATH": os.pathsep.join(path)}
    print(f"{' '.join(cmd[1:])} (in {work})", flush=True)
    code = subprocess.run(cmd, cwd=work, env=env).returncode
    if code:
        raise ReproduceError(f"the pipeline run in {work} failed (exit code {code}); see above")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _model_files(client: Any, run_id: str, dst: Path) -> dict[str, str]:
    """models/<name>/<file> -> sha256 of every model file `run_id` logged."""
    if not client.list_artifacts(run_id, "models"):
        return {}
    root = _download(client, run_id, "models", dst)
    return {
        f"models/{p.relative_to(root).as_posix()}": _sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def compare(client: Any, original: str, new: str) -> list[Row]:
    """Every model file and compared metric of `original`, beside its value in `new`."""
    with tempfile.TemporaryDirectory() as tmp:
        before = _model_files(client, original, Path(tmp) / "original")
        after = _model_files(client, new, Path(tmp) / "new")
    rows = [Row(name, sha, after.get(name, "missing")) for name, sha in before.items()]
    m0, m1 = client.get_run(original).data.metrics, client.get_run(new).data.metrics
    for key in sorted(m0):
        if not any(fnmatch.fnmatch(key, p) for p in UNCOMPARED_METRICS):
            rows.append(Row(key, repr(m0[key]), repr(m1[key]) if key in m1 else "missing"))
    return rows


def report(rows: list[Row], original: str, new: str, env_differs: list[str] = ()) -> bool:
    """Print the comparison table; True when everything is equal in the same environment."""
    width = max((len(r.name) for r in rows), default=10)

    def short(v: str) -> str:  # a sha256 fits the table in 12 characters
        return v[:12] if len(v) == 64 else v

    vw = max((len(short(v)) for r in rows for v in (r.original, r.new)), default=8)
    print(f"\n{'':<{width}}  {'original ' + original[:8]:<{vw}}  {'new ' + new[:8]:<{vw}}")
    for r in rows:
        verdict = "equal" if r.equal else "DIFFERS"
        print(f"{r.name:<{width}}  {short(r.original):<{vw}}  {short(r.new):<{vw}}  {verdict}")
    files = sum(r.name.startswith("models/") for r in rows)
    metrics = len(rows) - files
    differ = [r.name for r in rows if not r.equal]
    if not differ and env_differs:
        print(
            f"equal but not an exact reproduction: all {files} model files and {metrics} "
            f"metrics are equal in another environment ({'; '.join(env_differs)})"
        )
        return False
    if not differ:
        print(f"reproduced: all {files} model files and {metrics} metrics are equal")
        return True
    print(f"not reproduced: {len(differ)} of {len(rows)} differ: {', '.join(differ)}")
    return False


def reproduce(
    run_id: str,
    tracking_uri: str,
    workdir: Path | None = None,
    experiment: str | None = None,
    other_env: bool = False,
) -> bool:
    """Train MLflow run `run_id` again from its commit, config and data; True when every
    model file and compared metric came out equal in the same environment. The new run is
    tagged reproduces=<run_id>. `other_env` trains on when the lock differs."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a table follows
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    recorded = read_run(client, run_id)
    experiment = experiment or recorded.experiment
    project = find_project_root()
    env_differs = check_environment(recorded, project, other_env)
    dest = (workdir or project / ".cache" / "reproduce" / run_id).absolute()
    work = checkout(project, recorded.commit, dest, recorded.data_dir)
    restore_data(project, work, recorded)
    use_project_stack(project, work)
    if client.get_experiment_by_name(experiment) is None:
        # created here, so its artifact root is the project's rather than the worktree's
        client.create_experiment(experiment)
    run_name = f"reproduce-{run_id[:8]}-{time.strftime('%Y_%m_%d-%H_%M_%S')}"
    config_file = work / "reproduce.yaml"
    config = run_config(recorded, project, work, experiment, run_name)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    run_pipeline(work, config_file)

    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'")
    if not found:
        raise ReproduceError(
            f"the pipeline ran but left no MLflow run named {run_name} at {tracking_uri}; "
            "pass the --tracking-uri the stack's experiment tracker logs to"
        )
    new = found[0].info.run_id  # tagged reproduces=<run_id> by the tracker settings
    return report(compare(client, run_id, new), run_id, new, env_differs)
