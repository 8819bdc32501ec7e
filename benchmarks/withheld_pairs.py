"""Composition: does the pipeline draw colour-shape pairs it never saw together?

The protocol: whole colour-shape pairs (every size and background of them, 6 captions a
pair) are withheld from all training through a `data.holdout_rules` rule, the pipeline is
trained on the rest at the config's own steps, and its evaluate step scores the withheld
captions (`unseen_colour_shape/`), the single held-out captions (`unseen_captions/`) and
the seen ones with shapes64's pixel reader, and counts empty canvases (no object drawn). Only this
benchmark knows shapes64's grammar; the pipeline gets a regular expression.

    python benchmarks/withheld_pairs.py                        # today's default, 2 draws
    python benchmarks/withheld_pairs.py --name "drop 0.5" --set decoder.0.text_drop_prob=0.5
    python benchmarks/withheld_pairs.py --config configs/shapes64-quality.yaml --draws 1
    python benchmarks/withheld_pairs.py --draws 1 --first-draw 1  # the second draw alone

Each draw is one pipeline run (about 10 minutes of the default on 2 CPU cores), in a git
worktree of the checkout as it is (uncommitted changes included) that is removed after it;
rows go to .cache/bench/withheld_pairs.jsonl and the table printed covers every row
recorded there.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dalle2.data import shapes64  # noqa: E402

RESULTS = ROOT / ".cache" / "bench" / "withheld_pairs.jsonl"
EXPERIMENT = "withheld-pairs-bench"
COLUMNS = (
    ("unseen_colour_shape", "fidelity_color"),
    ("unseen_colour_shape", "fidelity_shape"),
    ("unseen_colour_shape", "fidelity_size"),
    ("unseen_colour_shape", "fidelity_all"),
    ("unseen_colour_shape", "empty_canvas"),
    ("unseen_captions", "fidelity_all"),
    ("seen_captions", "fidelity_all"),
    ("seen_captions", "empty_canvas"),
)


def draw_pairs(seed: int, count: int = 3) -> list[str]:
    """`count` colour-shape pairs, no two sharing a colour or a shape where the grammar
    allows, so each pair's colour and shape are both seen in other pairs."""
    rng = random.Random(seed)
    colours, shapes = list(shapes64.COLORS), list(shapes64.SHAPES)
    rng.shuffle(colours)
    rng.shuffle(shapes)
    return [f"{colours[i]} {shapes[i % len(shapes)]}" for i in range(count)]


def withheld_config(base: dict[str, Any], pairs: list[str], name: str) -> dict[str, Any]:
    """The run config that withholds `pairs` from all training and scores them apart."""
    run = json.loads(json.dumps(base))
    cfg = run["parameters"]["config"]
    rule = {
        "name": "colour_shape",
        "match": r"\b(" + "|".join(pairs) + r")\b",
        "fraction": 1.0,
    }
    cfg["data"]["holdout_rules"] = [*cfg["data"].get("holdout_rules", []), rule]
    cfg["registry"] = {**cfg.get("registry", {}), "name": "unclip-withheld-bench"}
    settings = run.setdefault("settings", {}).setdefault("experiment_tracker.mlflow", {})
    settings["experiment_name"] = EXPERIMENT
    run["run_name"] = f"withheld-{re.sub(r'[^a-z0-9]+', '-', name.lower())}-{int(time.time())}"
    return run


def apply_override(cfg: dict[str, Any], assignment: str) -> None:
    """`decoder.0.text_drop_prob=0.5`: a dotted path into the config, a YAML value."""
    path, _, value = assignment.partition("=")
    *parents, leaf = path.split(".")
    node: Any = cfg
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[int(leaf) if isinstance(node, list) else leaf] = yaml.safe_load(value)


def run_pipeline(run: dict[str, Any], work: Path) -> dict[str, float]:
    """Train it through ZenML in a git worktree of this checkout as it is now (HEAD and the
    working tree's changes: the lever being tried is what trains), with the project's
    ZenML stack, MLflow store and DVC cache; return the MLflow run's metrics. Edits made
    while it trains, and what it writes (data.dvc, shards), stay out of the checkout."""
    import mlflow

    from dalle2.edges.runs import default_tracking_uri
    from dalle2.edges.tracking import reproduce

    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri())
    if client.get_experiment_by_name(EXPERIMENT) is None:  # artifacts in the project's store
        client.create_experiment(EXPERIMENT, (ROOT / "mlruns" / EXPERIMENT).as_uri())
    kept = work / f"{run['run_name']}.yaml"  # composition.py --config reads it afterwards
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(yaml.safe_dump(run, sort_keys=False))
    dest = work / run["run_name"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    tree = reproduce.checkout(ROOT, head.stdout.strip(), dest, "data")
    try:
        _copy_changes(tree)
        reproduce.share_dvc(ROOT, tree)
        reproduce.use_project_stack(ROOT, tree)
        reproduce.run_pipeline(tree, kept)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(dest)], cwd=ROOT, check=False)
    exp = client.get_experiment_by_name(EXPERIMENT)
    found = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run['run_name']}'")
    return found[0].data.metrics


def _copy_changes(tree: Path) -> None:
    """The checkout's uncommitted state into `tree`: modified and untracked files (not
    ignored ones) copied, deleted ones removed."""

    def listed(flag: str) -> list[str]:
        out = subprocess.run(
            ["git", "ls-files", flag, "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        return [f for f in out.stdout.decode().split("\0") if f]

    deleted = set(listed("-d"))
    for name in {*listed("-m"), *listed("-o")} - deleted:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    for name in deleted:
        (tree / name).unlink(missing_ok=True)


def table(rows: list[dict[str, Any]]) -> str:
    head = "| row | draw | pairs | " + " | ".join(f"{s}/{k}" for s, k in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 3) + "|"]
    for r in rows:
        cells = []
        for s, k in COLUMNS:
            v = r["metrics"].get(f"{s}/{k}")
            cells.append("-" if v is None else (f"{v:.0f}" if k == "empty_canvas" else f"{v:.2f}"))
        pairs = ", ".join(r["pairs"])
        lines.append(f"| {r['name']} | {r['draw']} | {pairs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="zenml_config.yaml")
    p.add_argument("--name", default="default", help="the row's label")
    p.add_argument("--draws", type=int, default=2, help="draws of withheld pairs (one run each)")
    p.add_argument("--first-draw", type=int, default=0, help="seed of the first draw")
    p.add_argument("--pairs", type=int, default=3, help="pairs withheld per draw")
    p.add_argument("--set", action="append", default=[], help="KEY.PATH=VALUE into the config")
    p.add_argument("--dry-run", action="store_true", help="write the configs, train nothing")
    args = p.parse_args()
    base = yaml.safe_load((ROOT / args.config).read_text())
    for assignment in args.set:
        apply_override(base["parameters"]["config"], assignment)
    for draw in range(args.first_draw, args.first_draw + args.draws):
        pairs = draw_pairs(seed=draw, count=args.pairs)
        run = withheld_config(base, pairs, f"{args.name}-{draw}")
        if args.dry_run:
            print(yaml.safe_dump(run["parameters"]["config"]["data"], sort_keys=False))
            continue
        t0 = time.perf_counter()
        metrics = run_pipeline(run, ROOT / ".cache" / "bench" / "withheld_pairs")
        row = {
            "name": args.name,
            "draw": draw,
            "pairs": pairs,
            "config": args.config,
            "set": args.set,
            "seconds": time.perf_counter() - t0,
            "metrics": metrics,
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
    if RESULTS.is_file():
        recorded = [json.loads(line) for line in RESULTS.read_text().splitlines() if line]
        print(table(recorded))


if __name__ == "__main__":
    main()
