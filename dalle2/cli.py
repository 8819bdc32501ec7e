"""`dalle2` console commands: the user-facing edge of the library.

    dalle2 generate "a large red circle on a white background" --run latest --out generated/
    dalle2 generate "a small blue square on a black background" --model models:/unclip@champion
    dalle2 vary photo.png --model models:/unclip@champion --num 4 --out variations/
    dalle2 check-config zenml_config.yaml
    dalle2 reproduce latest

Errors a user can cause end in one sentence on stderr and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

from dalle2.config import ConfigError, check_resources, load_config


class UserError(Exception):
    """Something the user can fix; printed as one sentence."""


def _default_tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from dalle2.data.versioning import VersioningError, find_project_root

    try:
        root = find_project_root()
    except VersioningError:
        root = Path.cwd()
    return f"sqlite:///{root / 'mlruns.db'}"


def _find_run(run: str, tracking_uri: str) -> str:
    """Resolve 'latest' (the newest finished run that holds a prior) or check a run id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    if run != "latest":
        try:
            return client.get_run(run).info.run_id
        except MlflowException:
            raise UserError(f"MLflow run {run} was not found at {tracking_uri}") from None
    experiments = [e.experiment_id for e in client.search_experiments()]
    if experiments:
        for r in client.search_runs(experiments, order_by=["attributes.start_time DESC"]):
            names = {a.path for a in client.list_artifacts(r.info.run_id, "models")}
            if {"models/clip", "models/prior", "models/decoder_unet_0"} <= names:
                return r.info.run_id
    raise UserError(
        f"no finished pipeline run with trained models at {tracking_uri}; "
        "run the pipeline first or pass --checkpoint"
    )


def _check_run_models(run_id: str, tracking_uri: str) -> None:
    """Refuse, before any download, a run whose models/ lacks a model of its config's
    cascade: runs logged before register_model completed the folder hold no model of a step
    ZenML served from its cache, and loaded anyway draw with fewer stages, smaller images.
    The stage count comes from the config download_images logs as params (`decoder.{i}.*`)."""
    import mlflow

    from dalle2.models import check_complete

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    stages = {int(m[1]) for k in run.data.params if (m := re.match(r"decoder\.(\d+)\.", k))}
    held = [Path(a.path).name for a in client.list_artifacts(run_id, "models") if a.is_dir]
    name, version = run.data.tags.get("registry.model"), run.data.tags.get("registry.version")
    hint = (
        f"; its registered model holds them all: pass --model models:/{name}/{version}"
        if name and version
        else "; run the pipeline again, which logs every model into its run"
    )
    where = f"MLflow run {run_id}'s models/"
    check_complete(held, max(stages) + 1 if stages else None, where, hint)


def _download_run(run_id: str, tracking_uri: str, dst: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="models", dst_path=str(dst)
    )
    return Path(path)


def _download_model(uri: str, tracking_uri: str, dst: Path) -> Path:
    """The model folders inside an MLflow model (models:/unclip@champion, runs:/..., a path)
    logged by the register_model step: its `models` artifact."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from dalle2.serving import MODELS

    mlflow.set_tracking_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
        artifacts = Model.load(local).flavors["python_function"].get("artifacts") or {}
    except (MlflowException, OSError) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"MLflow model {uri} could not be read at {tracking_uri} ({why})") from None
    if MODELS not in artifacts:
        raise UserError(f"MLflow model {uri} is not an unCLIP model (no `{MODELS}` artifact)")
    return local / artifacts[MODELS]["path"]


def _model_dir(args: argparse.Namespace, tmp: Path) -> Path:
    """The folder of model files that --checkpoint, --model or --run (default: latest) names."""
    given = [f for f in ("checkpoint", "model", "run") if getattr(args, f)]
    if len(given) > 1:
        raise UserError(f"give one of --checkpoint, --model or --run, not {given}")
    if args.checkpoint:
        model_dir = Path(args.checkpoint)
        if not model_dir.is_dir():
            raise UserError(f"checkpoint directory {model_dir} does not exist")
        return model_dir
    uri = args.tracking_uri or _default_tracking_uri()
    if args.model:
        return _download_model(args.model, uri, tmp)
    run_id = _find_run(args.run or "latest", uri)
    _check_run_models(run_id, uri)
    return _download_run(run_id, uri, tmp)


def _add_model_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="MLflow run id, or 'latest' (the default source)")
    parser.add_argument(
        "--model", help="MLflow model URI, e.g. models:/unclip@champion or models:/unclip/3"
    )
    parser.add_argument("--checkpoint", help="a directory with clip/, prior/, decoder_unet_*/")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: this project's)")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        f = Path(args.prompts_file)
        if not f.is_file():
            raise UserError(f"prompts file {f} does not exist")
        prompts += [line.strip() for line in f.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError("give at least one prompt, or --prompts-file")
    return prompts


def cmd_generate(args: argparse.Namespace) -> None:
    import pandas as pd
    from PIL import Image

    from dalle2.device import pick_device
    from dalle2.evaluation import to_uint8
    from dalle2.models import load_pipeline
    from dalle2.recipes.evaluate import generate

    prompts = _read_prompts(args)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        clip, prior, decoder = load_pipeline(_model_dir(args, Path(tmp)))
    images, _ = generate(
        clip,
        prior,
        decoder,
        prompts,
        device=device,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.quiet,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (prompt, img) in enumerate(zip(prompts, to_uint8(images), strict=True)):
        path = out / f"{i:04d}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
        rows.append({"prompt": prompt, "image": str(path)})
    pd.DataFrame(rows, columns=["prompt", "image"]).to_csv(out / "prompts.csv", index=False)
    print(f"wrote {len(rows)} images and {out / 'prompts.csv'}")


def _read_image(path: Path, size: int):
    """An image file as (3, size, size) floats in [0, 1], centre-cropped to a square."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        raise UserError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            rgb = ImageOps.fit(im.convert("RGB"), (size, size), Image.Resampling.BICUBIC)
    except (UnidentifiedImageError, OSError):
        raise UserError(f"{path} is not an image file that can be read") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 255


def cmd_vary(args: argparse.Namespace) -> None:
    """New images from each input's CLIP image embedding, decoded by the cascade (unCLIP's
    variations: the prior is not used)."""
    import pandas as pd
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from dalle2.decoder import image_variations
    from dalle2.device import pick_device
    from dalle2.evaluation import to_uint8
    from dalle2.models import load_pipeline

    if args.num < 1 or args.batch_size < 1:
        raise UserError("--num and --batch-size must be at least 1")
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        clip, _, decoder = load_pipeline(_model_dir(args, Path(tmp)))
    clip, decoder = clip.to(device).eval(), decoder.to(device)
    sources = [Path(p) for p in args.images]
    inputs = torch.stack([_read_image(p, clip.image_size) for p in sources])
    inputs = inputs.repeat_interleave(args.num, dim=0)  # (N * num, 3, S, S)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    chunks = range(0, len(inputs), args.batch_size)
    images = torch.cat(
        [
            image_variations(clip, decoder, inputs[i : i + args.batch_size].to(device), gen).cpu()
            for i in tqdm(chunks, desc="vary", disable=args.quiet)
        ]
    )
    if not bool(torch.isfinite(images).all()):
        raise UserError("sampling produced NaN or infinite values; no images were written")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, img in enumerate(to_uint8(images)):
        i, j = divmod(k, args.num)
        path = out / f"{i:04d}-{j}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
        rows.append({"source": str(sources[i]), "image": str(path)})
    pd.DataFrame(rows, columns=["source", "image"]).to_csv(out / "variations.csv", index=False)
    print(f"wrote {len(rows)} images and {out / 'variations.csv'}")


def cmd_check_config(args: argparse.Namespace) -> None:
    cfg = load_config(args.path)
    check_resources(cfg)
    print(f"{args.path}: valid ({len(cfg.decoder)} decoder stages)")


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Exit code 0 when the reproduction equals the original run, 1 when anything differs."""
    from dalle2.tracking.reproduce import reproduce

    uri = args.tracking_uri or _default_tracking_uri()
    workdir = Path(args.workdir) if args.workdir else None
    same = reproduce(_find_run(args.run_id, uri), uri, workdir, args.experiment, args.other_env)
    return 0 if same else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dalle2", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="turn prompts into PNGs with a trained pipeline run")
    g.add_argument("prompts", nargs="*", help="text prompts")
    g.add_argument("--prompts-file", help="a file with one prompt per line")
    _add_model_source(g)
    g.add_argument("--out", default="generated", help="output directory (default: generated)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)
    v = sub.add_parser("vary", help="new images that share each input image's CLIP embedding")
    v.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    _add_model_source(v)
    v.add_argument("--num", type=int, default=4, help="variations per image (default: 4)")
    v.add_argument("--out", default="variations", help="output directory (default: variations)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_vary)
    c = sub.add_parser("check-config", help="validate a pipeline config YAML")
    c.add_argument("path")
    c.set_defaults(func=cmd_check_config)
    r = sub.add_parser(
        "reproduce",
        help="train a past pipeline run again from its commit, config and data, and compare",
    )
    r.add_argument("run_id", help="MLflow run id, or 'latest'")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default: this project's)")
    r.add_argument(
        "--workdir", help="where to check the commit out (default: .cache/reproduce/<run id>)"
    )
    r.add_argument("--experiment", help="MLflow experiment of the new run (default: the run's)")
    r.add_argument(
        "--other-env",
        action="store_true",
        help="train and compare even when this environment's uv.lock differs from the run's "
        "(the verdict then never says reproduced)",
    )
    r.set_defaults(func=cmd_reproduce)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dalle2.models import ModelFileError
    from dalle2.tracking.reproduce import ReproduceError

    user_errors = (UserError, ReproduceError, ConfigError, ModelFileError)
    try:  # RuntimeError: dalle2.clip.ClipWeightsError among others
        code = args.func(args)
    except (*user_errors, FileNotFoundError, RuntimeError) as err:
        print(f"dalle2: error: {err}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
