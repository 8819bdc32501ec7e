"""The model registry's champion rule: a new version takes the alias only when it is better
on the same evaluation set."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import mlflow

from dalle2.config import UnclipConfig


@dataclass(frozen=True)
class Decision:
    """What the registry step did with a new model version."""

    version: str
    registered: bool  # False: a version with these exact files existed already
    promoted: bool  # the version holds the alias now
    value: float | None  # the candidate's metric
    champion_version: str | None  # the alias's version before
    champion_value: float | None
    reason: str  # one sentence


def _metric_of(client: mlflow.MlflowClient, mv: Any, metric: str) -> float | None:
    """A version's metric: the value recorded on it at registration, else its run's."""
    tag = mv.tags.get(f"metric.{metric}")
    if tag is not None:
        return float(tag)
    if mv.run_id:
        value = client.get_run(mv.run_id).data.metrics.get(metric)
        return None if value is None else float(value)
    return None


def evaluation_set(cfg: UnclipConfig, data_md5: str) -> str:
    """An id of the prompts and judge a run's metrics come from: the dataset, the held-out
    split over its captions and the evaluate step's settings. Equal ids, comparable metrics."""
    data = cfg.data
    measured = {
        "data": data_md5,
        "holdout": [
            data.holdout,
            data.holdout_fraction,
            data.model_dump(mode="json")["holdout_rules"],
        ],
        "eval": cfg.eval.model_dump(mode="json", exclude={"grid_size"}),
    }
    return hashlib.sha256(json.dumps(measured, sort_keys=True).encode()).hexdigest()[:16]


def register(
    model_uri: str,
    content_id: str,
    value: float | None,
    *,
    name: str,
    metric: str,
    greater_is_better: bool = True,
    alias: str = "champion",
    eval_set: str = "",
) -> Decision:
    """Register `model_uri` under `name` (unless a version holds the same files) and give it
    `alias` when no version holds the alias or its `metric` is better than the holder's.

    Like is compared with like: the holder's metric counts only when it was measured on the
    same evaluation set (`eval_set`, from evaluation_set); a model of other data or other
    held-out prompts never takes the alias on a number from another set of prompts.
    """
    client = mlflow.MlflowClient()
    if value is not None and not math.isfinite(value):
        value = None
    same = [
        mv
        for mv in client.search_model_versions(f"name = '{name}'")
        if mv.tags.get("content_id") == content_id
    ]
    if same:
        mv, registered = min(same, key=lambda m: int(m.version)), False
    else:
        tags = {"content_id": content_id, "eval_set": eval_set}
        if value is not None:
            tags[f"metric.{metric}"] = repr(value)
        mv = mlflow.register_model(model_uri, name, tags=tags)
        registered = True
    version = str(mv.version)  # stores return it as int or str
    held = client.get_registered_model(name).aliases.get(alias)  # stores differ on a miss
    held = None if held is None else str(held)

    def decide(promoted: bool, reason: str, champ_value: float | None = None) -> Decision:
        if promoted:
            client.set_registered_model_alias(name, alias, version)
        return Decision(version, registered, promoted, value, held, champ_value, reason)

    if held is None:
        return decide(True, f"no version held @{alias}, so version {version} takes it")
    if held == version:
        return decide(False, f"version {version} already holds @{alias}")
    champion = client.get_model_version(name, held)
    if champion.tags.get("eval_set") != eval_set:
        return decide(
            False,
            f"version {held} (@{alias}) was evaluated on other data or prompts (evaluation "
            f"set {champion.tags.get('eval_set') or 'unrecorded'}, this one {eval_set}), so "
            f"it keeps the alias; set registry.name to give this dataset its own model",
        )
    champ_value = _metric_of(client, champion, metric)
    if value is None:
        return decide(False, f"this run has no {metric}; @{alias} stays on version {held}")
    if champ_value is None:
        return decide(
            False,
            f"version {held} (@{alias}) has no {metric} to compare with, so it keeps the "
            f"alias; move it by hand if version {version} should serve",
        )
    better = value > champ_value if greater_is_better else value < champ_value
    verdict = "better than" if better else "not better than"
    reason = (
        f"{metric} {value:.4g} of version {version} is {verdict} {champ_value:.4g} of "
        f"version {held}"
    )
    return decide(better, reason, champ_value)
