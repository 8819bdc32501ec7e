#!/usr/bin/env bash
# One-time (and idempotent) set-up: virtualenv, packages, ZenML repo + stack with the
# MLflow experiment tracker, DVC. Run from anywhere; everything lands in this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
export ZENML_ANALYTICS_OPT_IN=false ZENML_ENABLE_RICH_TRACEBACK=false
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true
export DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# DALLE2_EXTRAS=dev,team,scale also installs the team stack's and the Spark/Kubernetes packages
.venv/bin/python -m pip install -q -e ".[${DALLE2_EXTRAS:-dev}]"

zenml=".venv/bin/zenml"
[ -d .zen ] || "$zenml" init >/dev/null
# A relative URI: each checkout keeps its own ./mlruns.db (pipelines run from the repo root).
uri="sqlite:///mlruns.db"
if "$zenml" experiment-tracker describe mlflow_tracker >/dev/null 2>&1; then
  "$zenml" experiment-tracker update mlflow_tracker --tracking_uri="$uri" >/dev/null
else
  "$zenml" experiment-tracker register mlflow_tracker --flavor=mlflow --tracking_uri="$uri" >/dev/null
fi
if ! "$zenml" stack describe unclip_stack >/dev/null 2>&1; then
  "$zenml" stack register unclip_stack -o default -a default -e mlflow_tracker >/dev/null
fi
"$zenml" stack set unclip_stack >/dev/null

git rev-parse --git-dir >/dev/null 2>&1 || git init -q
[ -d .dvc ] || .venv/bin/dvc init -q
# Not `remote list | grep -q`: under pipefail, grep closing the pipe early fails the pipeline
# once a second remote (the team stack's, in .dvc/config.local) makes the listing longer.
[ -n "$(.venv/bin/dvc remote list)" ] || .venv/bin/dvc remote add -d local ../dvc-storage
echo "set-up done: .venv, ZenML stack 'unclip_stack' (MLflow at $root/mlruns.db), DVC"
