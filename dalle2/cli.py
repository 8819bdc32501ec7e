"""`dalle2` console commands: the user-facing edge of the library.

    dalle2 generate "a large red circle on a white background" --run latest --out generated/
    dalle2 check-config zenml_config.yaml

Errors a user can cause end in one sentence on stderr and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from dalle2.config import ConfigError, load_config

MODEL_DIRS = ("clip", "prior")


class UserError(Exception):
    """Something the user can fix; printed as one sentence."""


def _default_tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from dalle2.versioning import VersioningError, find_project_root

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


def _download_run(run_id: str, tracking_uri: str, dst: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="models", dst_path=str(dst)
    )
    return Path(path)


def load_pipeline_models(model_dir: Path):
    """(clip, prior, decoder) from a directory with clip/, prior/, decoder_unet_{i}/."""
    from dalle2.decoder import Decoder
    from dalle2.models import ModelArtifact, unpack_clip, unpack_prior, unpack_stage

    missing = [d for d in (*MODEL_DIRS, "decoder_unet_0") if not (model_dir / d).is_dir()]
    if missing:
        raise UserError(f"{model_dir} lacks the model folder(s) {missing}")
    clip = unpack_clip(ModelArtifact.from_dir(model_dir / "clip"))
    prior = unpack_prior(ModelArtifact.from_dir(model_dir / "prior"))
    stage_dirs = sorted(model_dir.glob("decoder_unet_*"), key=lambda p: int(p.name.rsplit("_")[-1]))
    stages = [unpack_stage(ModelArtifact.from_dir(d)) for d in stage_dirs]
    return clip, prior, Decoder([s for _, s in sorted(stages, key=lambda x: x[0])])


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
    from dalle2.recipes.evaluate import generate

    prompts = _read_prompts(args)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            model_dir = Path(args.checkpoint)
            if not model_dir.is_dir():
                raise UserError(f"checkpoint directory {model_dir} does not exist")
        else:
            uri = args.tracking_uri or _default_tracking_uri()
            model_dir = _download_run(_find_run(args.run, uri), uri, Path(tmp))
        clip, prior, decoder = load_pipeline_models(model_dir)
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


def cmd_check_config(args: argparse.Namespace) -> None:
    cfg = load_config(args.path)
    print(f"{args.path}: valid ({len(cfg.decoder)} decoder stages)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dalle2", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="turn prompts into PNGs with a trained pipeline run")
    g.add_argument("prompts", nargs="*", help="text prompts")
    g.add_argument("--prompts-file", help="a file with one prompt per line")
    g.add_argument("--run", default="latest", help="MLflow run id, or 'latest' (default)")
    g.add_argument("--checkpoint", help="a directory with clip/, prior/, decoder_unet_*/")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: this project's)")
    g.add_argument("--out", default="generated", help="output directory (default: generated)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("check-config", help="validate a pipeline config YAML")
    c.add_argument("path")
    c.set_defaults(func=cmd_check_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dalle2.clip import ClipWeightsError

    try:
        args.func(args)
    except (UserError, ConfigError, ClipWeightsError, FileNotFoundError, RuntimeError) as err:
        print(f"dalle2: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
