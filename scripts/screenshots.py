#!/usr/bin/env python3
"""Screenshots of a running stack's MLflow UI and ZenML dashboard, in headless Chromium.

    .venv/bin/python scripts/screenshots.py --out /tmp/ui-shots            # env defaults
    source .stack/env && .venv/bin/python scripts/screenshots.py \\
        --zenml-user admin --zenml-password "$DALLE2_ZENML_ADMIN_PASSWORD"

MLflow: the experiment's training runs (with its metric columns ticked), its latest run, the
model registry and the model; plus, from a fresh browser, the page the bare experiment link
lands on (GenAI pages on MLflow 3.17/3.18, mlflow/mlflow#24498). ZenML: the latest pipeline
run with its step graph. Writes PNGs and summary.json to --out; needs `chromium` (Debian
package). Defaults come from MLFLOW_TRACKING_URI / _USERNAME / _PASSWORD and
ZENML_STORE_URL; the dashboard needs a user's password (an API key does not open it).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ui_browser import (  # the helper lives with the tests
    MLFLOW_FIRST_VISIT_DISMISSED,
    MLFLOW_MODEL_TRAINING_MODE,
    Browser,
    find_chromium,
    mlflow_breadcrumb,
    mlflow_experiment_url,
    mlflow_page_state,
    mlflow_toggle_columns,
    zenml_login,
)


def _mlflow_api(args, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{args.mlflow_url.rstrip('/')}/api/2.0/mlflow/{path}",
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    if args.mlflow_user:
        token = base64.b64encode(f"{args.mlflow_user}:{args.mlflow_password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.load(r)


def _browser(args, fresh: bool = False) -> Browser:
    b = Browser(width=args.width, height=args.height)
    b.start()
    if args.mlflow_user:
        b.set_credentials(args.mlflow_url, args.mlflow_user, args.mlflow_password or "")
    if not fresh:
        items = {**MLFLOW_FIRST_VISIT_DISMISSED, **MLFLOW_MODEL_TRAINING_MODE}
        b.set_local_storage(f"{args.mlflow_url.rstrip('/')}/health", items)
    return b


def mlflow_shots(args, out: Path) -> dict:
    base = args.mlflow_url.rstrip("/")
    query = urllib.parse.urlencode({"experiment_name": args.experiment})
    exp = _mlflow_api(args, f"experiments/get-by-name?{query}")["experiment"]
    exp_id = exp["experiment_id"]
    search = {"experiment_ids": [exp_id], "max_results": 1, "order_by": ["start_time DESC"]}
    runs = _mlflow_api(args, "runs/search", search).get("runs", [])
    summary: dict = {"experiment_id": exp_id, "shots": []}
    b = _browser(args)
    try:
        b.open(mlflow_experiment_url(base, exp_id))
        b.wait_for_text("matching run", timeout=args.timeout)
        if runs:
            run = runs[0]
            metrics = sorted(m["key"] for m in run["data"].get("metrics", []))
            metrics = sorted(metrics, key=lambda k: not k.startswith("fidelity"))[:3]
            mlflow_toggle_columns(b, "Dataset", *metrics)  # the wide, empty Dataset off
        summary["shots"].append(str(b.screenshot(out / "mlflow-runs.png")))
        if runs:
            run_id = runs[0]["info"]["run_id"]
            b.open(mlflow_experiment_url(base, exp_id, run_id=run_id))
            b.wait_for_text("Parameters", timeout=args.timeout)
            summary["run_id"] = run_id
            summary["shots"].append(str(b.screenshot(out / "mlflow-run.png")))
        b.open(f"{base}/#/models")
        b.wait_for_text("Registered Models", timeout=args.timeout)
        summary["shots"].append(str(b.screenshot(out / "mlflow-models.png")))
        if args.model:
            b.open(f"{base}/#/models/{urllib.parse.quote(args.model)}")
            b.wait_for_text(args.model, "Version", timeout=args.timeout)
            summary["shots"].append(str(b.screenshot(out / "mlflow-model.png")))
    finally:
        b.close()
    fresh = _browser(args, fresh=True)
    try:
        fresh.open(f"{base}/#/experiments/{exp_id}")
        summary["fresh_browser_experiment_link"] = mlflow_page_state(fresh, exp_id, args.timeout)
        summary["shots"].append(str(fresh.screenshot(out / "mlflow-fresh-experiment-link.png")))
        if runs:
            fresh.open(f"{base}/#/experiments/{exp_id}/runs/{summary['run_id']}")
            fresh.wait_for_text("Parameters", timeout=args.timeout)
            summary["fresh_browser_run_breadcrumb"] = mlflow_breadcrumb(fresh)
    finally:
        fresh.close()
    summary["direct_link"] = mlflow_experiment_url(base, exp_id)
    return summary


def zenml_shots(args, out: Path) -> dict:
    base = args.zenml_url.rstrip("/")
    b = Browser(width=args.width, height=args.height)
    b.start()
    try:
        zenml_login(b, base, args.zenml_user or "", args.zenml_password or "")
        run_id = args.zenml_run
        if not run_id:
            b.open(f"{base}/")
            page = b.evaluate(
                "fetch('/api/v1/runs?sort_by=desc:created&size=1').then(r => r.json())",
                await_promise=True,
            )
            items = (page or {}).get("items") or []
            if not items:
                return {"error": "no pipeline runs on the server", "shots": []}
            run_id = items[0]["id"]
        b.open(f"{base}/projects/default/runs/{run_id}")
        b.wait_for(
            "document.querySelectorAll('.react-flow__node').length > 0",
            timeout=args.timeout,
            what="the run's step graph",
        )
        steps = b.evaluate(
            "[...document.querySelectorAll('.react-flow__node')]"
            ".map(n => n.innerText.split('\\n')[0])"
        )
        shot = b.screenshot(out / "zenml-run.png")
        return {"run_id": run_id, "graph_nodes": steps, "shots": [str(shot)]}
    finally:
        b.close()


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(env("DALLE2_SCREENSHOT_DIR", "ui-shots")))
    p.add_argument("--mlflow-url", default=env("MLFLOW_TRACKING_URI", "http://127.0.0.1:5050"))
    p.add_argument("--mlflow-user", default=env("MLFLOW_TRACKING_USERNAME"))
    p.add_argument("--mlflow-password", default=env("MLFLOW_TRACKING_PASSWORD"))
    p.add_argument("--experiment", default="unclip")
    p.add_argument("--model", default="unclip", help="registered model to show ('' for none)")
    p.add_argument("--zenml-url", default=env("ZENML_STORE_URL", "http://127.0.0.1:8237"))
    p.add_argument("--zenml-user", default=env("DALLE2_ZENML_USER", "admin"))
    p.add_argument("--zenml-password", default=env("DALLE2_ZENML_PASSWORD"))
    p.add_argument("--zenml-run", help="pipeline run id (default: the latest)")
    p.add_argument("--skip", choices=["mlflow", "zenml"], action="append", default=[])
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=900)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per page")
    args = p.parse_args(argv)
    if find_chromium() is None:
        p.error("chromium is not installed (apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    if "mlflow" not in args.skip:
        summary["mlflow"] = mlflow_shots(args, args.out)
    if "zenml" not in args.skip:
        summary["zenml"] = zenml_shots(args, args.out)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
