"""The trained text-to-image system as an MLflow model: prompts in, base64 PNGs out.

    mlflow models serve -m models:/unclip@champion --env-manager local --port 5001
    mlflow.pyfunc.load_model("models:/unclip@champion").predict(pd.DataFrame({"prompt": [...]}))

MLflow logs this file as the model's code ("models from code"), so nothing is pickled: the
logged model holds this file, a copy of the dalle2 package (the code that wrote the weights)
and the run's model folders (safetensors + JSON configs + sha256 manifests), which
`load_context` loads with the project's own checked loaders (UnCLIP.load).
"""

from __future__ import annotations

import base64
import io
import math
import numbers
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, set_model
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from dalle2.data.versioning import VersioningError, find_project_root
from dalle2.edges.tracking.environment import lock_pins

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
        from dalle2.unclip import NonFiniteOutputError, UnCLIP

        self.non_finite = NonFiniteOutputError
        self.unclip = UnCLIP.load(Path(context.artifacts[MODELS])).to(pick_device("auto"))
        self.context_length = int(self.unclip.clip.tokenizer.context_length)

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
        encode = getattr(self.unclip.clip.tokenizer, "encode", None)
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
        base = self.unclip.decoder.stages[0]
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
        return [cfg] + [None] * (len(self.unclip.decoder.stages) - 1)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """One base64 PNG per prompt; `guidance_scale` and `steps` set the base stage's
        sampling (the upsamplers keep theirs)."""
        prompts = self._check_prompts(model_input)
        seeds = self._check_seeds(model_input)
        cfgs = self._sample_cfgs(params)
        images = self.sampler.submit(self.draw, prompts, seeds, cfgs).result()
        return pd.DataFrame({"image": images})

    def draw(
        self, prompts: list[str], seeds: list[int], cfgs: list[Any] | None = None
    ) -> list[str]:
        """Checked rows in one batch (at most MAX_PROMPTS), each from its own seed, as PNGs.
        Called on the sampler thread (`self.sampler`), where every torch call runs."""
        from dalle2.evaluation import to_uint8

        try:
            drawn = self.unclip.generate(
                prompts, seeds=seeds, batch_size=MAX_PROMPTS, decoder_cfgs=cfgs
            )
        except self.non_finite as err:
            raise MlflowException(str(err), error_code=INTERNAL_ERROR) from None
        return [png_base64(image.permute(1, 2, 0)) for image in to_uint8(drawn.images)]


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
        "code_paths": [str(Path(__file__).resolve().parents[1])],  # the dalle2 package
        "signature": SIGNATURE,
        "input_example": pd.DataFrame({"prompt": [EXAMPLE_PROMPT], "seed": [0]}),
        "pip_requirements": requirements(),
    }


def log_unclip_model(
    model_dir: Path, card: Path | None = None, name: str = "model"
) -> mlflow.models.model.ModelInfo:
    """Log a folder of model files as a pyfunc model on the active MLflow run."""
    return mlflow.pyfunc.log_model(name=name, **model_spec(model_dir, card))


# MLflow runs this file as a fresh module to build the model ("models from code"); an
# ordinary import of dalle2.edges.serving builds nothing.
if __name__ != "dalle2.edges.serving":
    set_model(UnclipModel())
