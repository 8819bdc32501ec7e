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

OPERATIONS = ("generate", "edit", "interpolate", "textdiff")
MAX_FRAMES = 16  # images an interpolation or text diff answers with
MAX_IMAGE_CHARS = 8_000_000  # a base64 image field, refused before decoding

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec(DataType.string, "prompt", False),  # generate, edit; textdiff's target
            ColSpec(DataType.long, "seed", False),
            ColSpec(DataType.string, "image", False),  # base64 PNG: edit, interpolate, textdiff
            ColSpec(DataType.string, "mask", False),  # edit: white = redraw
            ColSpec(DataType.string, "image_b", False),  # interpolate's end, edit's reference
            ColSpec(DataType.string, "source_prompt", False),  # textdiff: the image's caption
        ]
    ),
    outputs=Schema([ColSpec(DataType.string, "image")]),
    # None keeps the base decoder stage's own sampling settings (its config in the model)
    params=ParamSchema(
        [
            ParamSpec("guidance_scale", DataType.double, None),
            ParamSpec("steps", DataType.long, None),
            ParamSpec("operation", DataType.string, "generate"),
            ParamSpec("num", DataType.long, None),  # interpolate (8), textdiff (5)
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

    def _check_prompts(self, model_input: Any, operation: str = "generate") -> list[str]:
        if not isinstance(model_input, pd.DataFrame) or "prompt" not in model_input.columns:
            raise bad_request(
                f"send a table with a `prompt` column of strings for {operation}, one per row"
            )
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

        sampling = ("guidance_scale", "steps")
        params = {k: v for k, v in (params or {}).items() if k in sampling and v is not None}
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
        """Base64 PNGs. `operation` (param, default generate): generate draws one image per
        prompt, `guidance_scale` and `steps` setting the base stage's sampling (the upsamplers
        keep theirs); edit redraws each row's `image` where its `mask` is white, from its
        `prompt` or the `image_b` reference; interpolate answers `num` images between one
        row's `image` and `image_b`; textdiff moves one row's `image` from `source_prompt`
        towards `prompt` in `num` images. Every row draws from its own `seed`."""
        operation = (params or {}).get("operation") or "generate"
        if operation not in OPERATIONS:
            known = ", ".join(OPERATIONS)
            raise bad_request(f"operation must be one of {known}, not {operation!r}")
        if operation != "generate":
            job = self._check_job(operation, model_input, params or {})
            return pd.DataFrame({"image": self.sampler.submit(self.apply, job).result()})
        prompts = self._check_prompts(model_input)
        seeds = self._check_seeds(model_input)
        cfgs = self._sample_cfgs(params)
        images = self.sampler.submit(self.draw, prompts, seeds, cfgs).result()
        return pd.DataFrame({"image": images})

    def _image_field(self, frame: pd.DataFrame, column: str, row: int, op: str) -> bytes:
        """A row's base64 image field as bytes, or a one-sentence refusal."""
        value = frame[column].iloc[row] if column in frame.columns else None
        if not isinstance(value, str) or not value:
            raise bad_request(f"{op} needs a base64 PNG in `{column}` (row {row} has none)")
        if len(value) > MAX_IMAGE_CHARS:
            raise bad_request(f"`{column}` of row {row} is over {MAX_IMAGE_CHARS} characters")
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise bad_request(f"`{column}` of row {row} is not base64") from None

    def _check_job(self, op: str, frame: Any, params: dict[str, Any]) -> dict[str, Any]:
        """Decode and check an edit, interpolation or text diff before any sampling."""
        from dalle2.edges.images import ImageInputError, read_image, read_mask

        if not isinstance(frame, pd.DataFrame) or frame.empty:
            raise bad_request(f"send a table with one row per {op}")
        rows = len(frame)
        if op != "edit" and rows != 1:
            raise bad_request(f"{op} takes one row (an image), not {rows}")
        if rows > MAX_PROMPTS:
            raise bad_request(f"send at most {MAX_PROMPTS} edits per request ({rows} were sent)")
        num = params.get("num")
        if op == "edit" and num is not None:
            raise bad_request("edit draws one image a row; send more rows, not `num`")
        num = {"interpolate": 8, "textdiff": 5}.get(op) if num is None else num
        if op != "edit" and (not isinstance(num, numbers.Integral) or not 2 <= num <= MAX_FRAMES):
            raise bad_request(f"num must be a whole number from 2 to {MAX_FRAMES}, not {num!r}")
        unclip = self.unclip
        size, clip_size = unclip.output_size, unclip.image_size
        job: dict[str, Any] = {"op": op, "num": num, "seeds": self._check_seeds(frame)}
        try:
            image = [self._image_field(frame, "image", i, op) for i in range(rows)]
            if op == "edit":
                masks = [self._image_field(frame, "mask", i, op) for i in range(rows)]
                job["images"] = [
                    read_image(b, size, f"row {i}'s image") for i, b in enumerate(image)
                ]
                job["masks"] = [
                    read_mask(m, b, size, f"row {i}'s mask", f"row {i}'s image")
                    for i, (m, b) in enumerate(zip(masks, image, strict=True))
                ]
                if "prompt" in frame.columns and frame["prompt"].notna().all():
                    job["prompts"] = self._check_prompts(frame, op)
                elif "image_b" in frame.columns:
                    refs = [self._image_field(frame, "image_b", i, op) for i in range(rows)]
                    job["references"] = [
                        read_image(b, clip_size, f"row {i}'s image_b") for i, b in enumerate(refs)
                    ]
                else:
                    raise bad_request("edit needs a `prompt` or an `image_b` reference each row")
            else:
                job["image"] = read_image(image[0], clip_size, "the image")
                if op == "interpolate":
                    other = self._image_field(frame, "image_b", 0, op)
                    job["image_b"] = read_image(other, clip_size, "image_b")
                else:
                    job["target"] = self._check_prompts(frame, op)[0]
                    source = frame.get("source_prompt")
                    if source is None or not isinstance(source.iloc[0], str):
                        raise bad_request("textdiff needs the image's caption in `source_prompt`")
                    job["source"] = self._check_prompts(
                        pd.DataFrame({"prompt": [source.iloc[0]]}), op
                    )[0]
        except ImageInputError as err:
            raise bad_request(str(err)) from None
        return job

    def apply(self, job: dict[str, Any]) -> list[str]:
        """An edit, interpolation or text diff checked by _check_job, as PNGs; on the sampler
        thread, like draw."""
        import torch

        from dalle2.evaluation import to_uint8

        unclip, op, seeds = self.unclip, job["op"], job["seeds"]
        try:
            if op == "edit":
                out = []
                for i, seed in enumerate(seeds):
                    prompts = [job["prompts"][i]] if "prompts" in job else None
                    refs = job["references"][i][None] if "references" in job else None
                    edited = unclip.edit(
                        job["images"][i][None],
                        job["masks"][i][None],
                        prompts,
                        references=refs,
                        seed=seed,
                    )
                    out.append(edited)
                images = torch.cat(out)
            elif op == "interpolate":
                images = unclip.interpolate(
                    job["image"], job["image_b"], num=job["num"], seed=seeds[0]
                )
            else:
                images = unclip.textdiff(
                    job["image"], job["source"], job["target"], num=job["num"], seed=seeds[0]
                )
        except self.non_finite as err:
            raise MlflowException(str(err), error_code=INTERNAL_ERROR) from None
        return [png_base64(image.permute(1, 2, 0)) for image in to_uint8(images)]

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
