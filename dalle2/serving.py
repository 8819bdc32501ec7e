"""The trained text-to-image system as an MLflow model: prompts in, base64 PNGs out.

    mlflow models serve -m models:/unclip@champion --env-manager local --port 5001
    mlflow.pyfunc.load_model("models:/unclip@champion").predict(pd.DataFrame({"prompt": [...]}))

MLflow logs this file as the model's code ("models from code"), so nothing is pickled: the
logged model holds this file, a copy of the dalle2 package (the code that wrote the weights)
and the run's model folders (safetensors + JSON configs + sha256 manifests), which
`load_context` loads with the project's own checked loaders. Like cli.py, this module is an
edge of the library and may import mlflow; the registry's champion rule lives here too.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import numbers
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, set_model
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from dalle2.data.versioning import VersioningError, find_project_root
from dalle2.tracking.environment import lock_pins

if TYPE_CHECKING:
    from dalle2.config import UnclipConfig

MODELS = "models"  # the pyfunc artifact: a folder with clip/, prior/, decoder_unet_{i}/
CARD = "model_card"  # the pyfunc artifact: the run's model card (markdown)
MAX_PROMPTS = 32  # per request: the rows sample as one batch, and a request must end in time
MAX_CHARS = 2000  # refused before tokenising, so a huge prompt costs nothing
EXAMPLE_PROMPT = "a large red circle on a white background"

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, "prompt"), ColSpec(DataType.long, "seed", False)]),
    outputs=Schema([ColSpec(DataType.string, "image")]),
    # None keeps the base decoder stage's own sampling settings (its config in the model)
    params=ParamSchema(
        [
            ParamSpec("guidance_scale", DataType.double, None),
            ParamSpec("steps", DataType.long, None),
        ]
    ),
)

# What the model's code imports, pinned as uv.lock pins them for other env managers.
REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "open_clip_torch",
    "torch-fidelity",
    "webdataset",
    "pyarrow",
    "einops",
    "safetensors",
    "pydantic",
    "pyyaml",
    "numpy",
    "pandas",
    "pillow",
    "tqdm",
)


def bad_request(message: str) -> MlflowException:
    """A request the caller can fix: the scoring server answers 400 and keeps serving."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def png_base64(image: Any) -> str:
    """A (H, W, 3) uint8 tensor or array as a base64 PNG string."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.numpy() if hasattr(image, "numpy") else image).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class UnclipModel(PythonModel):
    """CLIP -> prior -> decoder cascade behind MLflow's pyfunc interface.

    The instance MLflow builds holds no weights; `load_context` loads them from the model's
    `models` artifact. A request's rows sample in one batch, each row drawing its noise from
    its own generator seeded by its `seed` (0 when absent), so a prompt, seed and params give
    the same image in any request.

    One thread of the model's own loads the weights and runs every request's sampling, in
    turn. MLflow's scoring server loads on its main thread and calls `predict` from a pool of
    worker threads; on CPU, torch kernels on a thread other than the one that loaded the
    weights ran 1.5-3x slower (benchmarks/serving.py), and concurrent requests sampling at once
    only split the same cores.
    """

    def load_context(self, context: Any) -> None:
        self.sampler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unclip-sampler")
        self.sampler.submit(self._load, context).result()

    def _load(self, context: Any) -> None:
        from dalle2.device import pick_device
        from dalle2.models import load_pipeline
        from dalle2.recipes import evaluate  # imported here, not by the first request

        self.generate, self.non_finite = evaluate.generate, evaluate.NonFiniteOutputError
        self.device = pick_device("auto")
        clip, prior, decoder = load_pipeline(Path(context.artifacts[MODELS]))
        self.clip, self.prior, self.decoder = (
            clip.to(self.device).eval(),
            prior.to(self.device).eval(),
            decoder.to(self.device).eval(),
        )
        self.context_length = int(clip.tokenizer.context_length)

    def _check_prompts(self, model_input: Any) -> list[str]:
        if not isinstance(model_input, pd.DataFrame) or "prompt" not in model_input.columns:
            raise bad_request("send a table with a `prompt` column of strings, one row per image")
        prompts = list(model_input["prompt"])
        if not prompts:
            raise bad_request("send at least one prompt")
        if len(prompts) > MAX_PROMPTS:
            raise bad_request(
                f"send at most {MAX_PROMPTS} prompts per request ({len(prompts)} were sent)"
            )
        most = self.context_length - 2  # CLIP adds start and end tokens
        # open_clip's BPE tokenizer counts tokens; others (Hugging Face's) just truncate
        encode = getattr(self.clip.tokenizer, "encode", None)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise bad_request(f"prompt {i} is not a string (it is {type(prompt).__name__})")
            if not prompt.strip():
                raise bad_request(f"prompt {i} is empty; describe the image to draw")
            size = f"{len(prompt)} characters" if len(prompt) > MAX_CHARS else None
            if size is None and encode is not None and len(encode(prompt)) > most:
                size = f"{len(encode(prompt))} tokens"
            if size is not None:
                raise bad_request(
                    f"prompt {i} is {size} long but this model's CLIP reads at most {most} "
                    "tokens; shorten it"
                )
        return prompts

    @staticmethod
    def _check_seeds(model_input: pd.DataFrame) -> list[int]:
        if "seed" not in model_input.columns:
            return [0] * len(model_input)
        seeds = []
        for i, seed in enumerate(model_input["seed"]):
            if seed is None or (isinstance(seed, float) and math.isnan(seed)):
                seeds.append(0)  # a row without a seed in a table where others have one
            elif isinstance(seed, numbers.Real) and float(seed).is_integer() and seed >= 0:
                seeds.append(int(seed))
            else:
                raise bad_request(f"seed {i} must be a whole number from 0 up, not {seed!r}")
        return seeds

    def _sample_cfgs(self, params: dict[str, Any] | None) -> list[Any] | None:
        """Each decoder stage's SampleConfig, the base stage's with the request's params."""
        from dalle2.config import SampleConfig

        params = {k: v for k, v in (params or {}).items() if v is not None}
        if not params:
            return None
        base = self.decoder.stages[0]
        update = {}
        if "guidance_scale" in params:
            g = params["guidance_scale"]
            if not isinstance(g, numbers.Real) or not 0 <= g <= 100:
                raise bad_request(f"guidance_scale must be a number from 0 to 100, not {g!r}")
            update["guidance_scale"] = float(g)
        if "steps" in params:
            steps, most = params["steps"], base.process.num_steps
            if not isinstance(steps, numbers.Integral) or not 1 <= steps <= most:
                raise bad_request(f"steps must be a whole number from 1 to {most}, not {steps!r}")
            update["steps"] = int(steps)
        cfg = SampleConfig.model_validate({**base.cfg.sample.model_dump(), **update})
        return [cfg] + [None] * (len(self.decoder.stages) - 1)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """One base64 PNG per prompt; `guidance_scale` and `steps` set the base stage's
        sampling (the upsamplers keep theirs)."""
        prompts = self._check_prompts(model_input)
        seeds = self._check_seeds(model_input)
        cfgs = self._sample_cfgs(params)
        images = self.sampler.submit(self._draw, prompts, seeds, cfgs).result()
        return pd.DataFrame({"image": images})

    def _draw(self, prompts: list[str], seeds: list[int], cfgs: list[Any] | None) -> list[str]:
        """The request's rows in one batch (at most MAX_PROMPTS), each from its own seed, as
        PNGs: every torch call on the sampler thread."""
        from dalle2.evaluation import to_uint8

        try:
            drawn, _ = self.generate(
                self.clip,
                self.prior,
                self.decoder,
                prompts,
                device=self.device,
                batch_size=MAX_PROMPTS,
                seeds=seeds,
                decoder_cfgs=cfgs,
            )
        except self.non_finite as err:
            raise MlflowException(str(err), error_code=INTERNAL_ERROR) from None
        return [png_base64(image.permute(1, 2, 0)) for image in to_uint8(drawn)]


def requirements() -> list[str]:
    """The model's pip requirements, pinned to the project's uv.lock: the packages it was
    trained with."""
    try:
        root = find_project_root()
    except VersioningError:  # a model logged outside the project: the installed versions
        root = Path.cwd()
    return lock_pins(root, REQUIREMENTS)


def model_spec(model_dir: Path, card: Path | None = None) -> dict[str, Any]:
    """What mlflow.pyfunc's log_model / save_model take for a folder of model files (clip/,
    prior/, decoder_unet_{i}/): the weights travel as files, the model as this file's code."""
    artifacts = {MODELS: str(model_dir)}
    if card is not None:
        artifacts[CARD] = str(card)
    return {
        "python_model": str(Path(__file__).resolve()),
        "artifacts": artifacts,
        "code_paths": [str(Path(__file__).resolve().parent)],
        "signature": SIGNATURE,
        "input_example": pd.DataFrame({"prompt": [EXAMPLE_PROMPT], "seed": [0]}),
        "pip_requirements": requirements(),
    }


def log_unclip_model(
    model_dir: Path, card: Path | None = None, name: str = "model"
) -> mlflow.models.model.ModelInfo:
    """Log a folder of model files as a pyfunc model on the active MLflow run."""
    return mlflow.pyfunc.log_model(name=name, **model_spec(model_dir, card))


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


# MLflow runs this file as a fresh module to build the model ("models from code"); an
# ordinary import of dalle2.serving builds nothing.
if __name__ != "dalle2.serving":
    set_model(UnclipModel())
