"""What the team stack costs a run: the tiny pipeline on the embedded stack and on
`team_stack` (scripts/stack.sh up), alternately in one process, and the wall-time ratio.

Each run is a fresh project (git + DVC + ZenML repository) with every step uncached, so
both sides do the same work; the team side logs over HTTP to the MLflow server, stores
artifacts in S3 and pushes its data to the S3 remote. Ratios, not seconds, compare across
machines; run nothing else meanwhile (2 cores).

    bash scripts/stack.sh up
    .venv/bin/python benchmarks/team_overhead.py --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

from dalle2.edges.tracking.stack import read_env_file

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUIET = {
    "ZENML_ANALYTICS_OPT_IN": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "ZENML_LOGGING_VERBOSITY": "WARN",
}


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")


def project(root: Path, team: dict[str, str] | None) -> tuple[Path, dict[str, str]]:
    """A fresh project on the embedded stack (team=None) or on team_stack."""
    root.mkdir(parents=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ZENML_", "AWS_"))}
    env = {**base, **QUIET, "ZENML_REPOSITORY_PATH": str(root)}
    config = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    config["enable_cache"] = False
    config["parameters"]["config"]["registry"] = {"name": f"unclip-bench-{uuid.uuid4().hex[:8]}"}
    (root / "zenml_config.yaml").write_text(yaml.safe_dump(config))
    dvc, zenml = str(BIN / "dvc"), str(BIN / "zenml")
    sh(["git", "init", "-q"], root, env)
    sh([dvc, "init", "-q"], root, env)
    if team is None:
        env["ZENML_CONFIG_PATH"] = str(root / ".zenml-config")
        sh([zenml, "init"], root, env)
        uri = f"--tracking_uri=sqlite:///{root / 'mlruns.db'}"
        sh([dvc, "remote", "add", "-d", "local", str(root / "remote")], root, env)
        sh(
            [zenml, "experiment-tracker", "register", "mlflow_tracker", "--flavor=mlflow", uri],
            root,
            env,
        )
        sh(
            [
                zenml,
                "stack",
                "register",
                "bench",
                "-o",
                "default",
                "-a",
                "default",
                "-e",
                "mlflow_tracker",
                "--set",
            ],
            root,
            env,
        )
    else:
        env.update({k: v for k, v in team.items() if k != "ZENML_CONFIG_PATH"})
        env["ZENML_CONFIG_PATH"] = str(root / ".zenml-config")
        env["DALLE2_DVC_REMOTE"] = "team"
        sh([dvc, "remote", "add", "--local", "team", f"s3://dvc/bench-{root.name}"], root, env)
        sh(
            [dvc, "remote", "modify", "--local", "team", "endpointurl", team["AWS_ENDPOINT_URL"]],
            root,
            env,
        )
        sh([zenml, "init"], root, env)
        sh([zenml, "stack", "set", "team_stack"], root, env)
    return root, env


def timed_run(root: Path, env: dict[str, str]) -> float:
    cmd = [str(BIN / "zenml"), "pipeline", "run", "pipelines.unclip.unclip_pipeline"]
    t0 = time.perf_counter()
    sh([*cmd, "-c", "zenml_config.yaml"], root, env)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--stack-dir", type=Path, default=REPO / ".stack")
    args = parser.parse_args()
    env_file = args.stack_dir / "env"
    if not env_file.is_file():
        sys.exit(f"no team stack at {args.stack_dir}: run `bash scripts/stack.sh up` first")
    team = read_env_file(env_file)
    times: dict[str, list[float]] = {"embedded": [], "team": []}
    with tempfile.TemporaryDirectory(prefix="team-overhead-") as tmp:
        for i in range(args.repeats):
            for side in ("embedded", "team"):
                root, env = project(Path(tmp) / f"{side}-{i}", team if side == "team" else None)
                seconds = timed_run(root, env)
                times[side].append(seconds)
                print(f"{side:>8} run {i + 1}: {seconds:6.1f} s", flush=True)
    embedded, shared = (statistics.median(times[k]) for k in ("embedded", "team"))
    print(f"median: embedded {embedded:.1f} s, team {shared:.1f} s, ratio {shared / embedded:.2f}")


if __name__ == "__main__":
    main()
