#!/usr/bin/env bash
# One-time (and idempotent) set-up: virtualenv, packages, ZenML repo + stack with the
# MLflow experiment tracker, DVC. Run from anywhere; everything lands in this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
export ZENML_ANALYTICS_OPT_IN=false ZENML_ENABLE_RICH_TRACEBACK=false
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true
export DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1

# uv installs exactly uv.lock into .venv. Where uv is missing it comes from PyPI, into a
# virtualenv of its own under .cache/ (no system or user site is touched, root or not).
uv="$(command -v uv || true)"
if [ -z "$uv" ]; then
  uv=.cache/uv-tool/bin/uv
  [ -x "$uv" ] || { python3 -m venv .cache/uv-tool && .cache/uv-tool/bin/python -m pip install -q "uv>=0.9"; }
fi
# DALLE2_EXTRAS=dev,team,scale also installs the team stack's and the Spark/Kubernetes
# packages. The extras installed last are kept: `uv sync` removes whatever it is not asked for.
extras_file=.venv/dalle2-extras
extras="${DALLE2_EXTRAS:-$(cat "$extras_file" 2>/dev/null || echo dev)}"
args=()
for extra in ${extras//,/ }; do args+=(--extra "$extra"); done
# --locked: a pyproject.toml changed without `uv lock` stops here, instead of installing
# something other than the lock says
if ! "$uv" sync --locked --quiet "${args[@]}"; then
  echo "set-up stopped: uv.lock does not match pyproject.toml (or could not be installed, see above); run 'uv lock' and commit uv.lock" >&2
  exit 1
fi
echo "$extras" >"$extras_file"

# The embedded stack: the MLflow tracker at a relative URI, so each checkout keeps its own
# ./mlruns.db (pipelines run from the repo root), in the stack `unclip_stack`, made active.
.venv/bin/python scripts/register_stack.py . unclip_stack sqlite:///mlruns.db

git rev-parse --git-dir >/dev/null 2>&1 || git init -q
[ -d .dvc ] || .venv/bin/dvc init -q
# Not `remote list | grep -q`: under pipefail, grep closing the pipe early fails the pipeline
# once a second remote (the team stack's, in .dvc/config.local) makes the listing longer.
[ -n "$(.venv/bin/dvc remote list)" ] || .venv/bin/dvc remote add -d local ../dvc-storage
echo "set-up done: .venv, ZenML stack 'unclip_stack' (MLflow at $root/mlruns.db), DVC"
