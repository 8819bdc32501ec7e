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
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from dalle2.config import ConfigError, load_config

if TYPE_CHECKING:
    from dalle2.unclip import UnCLIP


class UserError(Exception):
    """Something the user can fix; printed as one sentence."""


def _model_dir(args: argparse.Namespace, tmp: Path) -> Path:
    """The folder of model files that --checkpoint, --model or --run (default: latest) names."""
    from dalle2.edges.runs import model_folder

    return model_folder(
        tmp,
        checkpoint=args.checkpoint,
        model=args.model,
        run=args.run,
        tracking_uri=args.tracking_uri,
    )


def _load(args: argparse.Namespace) -> UnCLIP:
    from dalle2.device import pick_device
    from dalle2.unclip import UnCLIP

    with tempfile.TemporaryDirectory() as tmp:
        return UnCLIP.load(_model_dir(args, Path(tmp))).to(pick_device(args.device))


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

    from dalle2.evaluation import to_uint8

    prompts = _read_prompts(args)
    drawn = _load(args).generate(
        prompts, seed=args.seed, batch_size=args.batch_size, progress=not args.quiet
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (prompt, img) in enumerate(zip(prompts, to_uint8(drawn.images), strict=True)):
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

    from dalle2.evaluation import to_uint8

    if args.num < 1 or args.batch_size < 1:
        raise UserError("--num and --batch-size must be at least 1")
    unclip = _load(args)
    sources = [Path(p) for p in args.images]
    inputs = torch.stack([_read_image(p, unclip.image_size) for p in sources])
    images = unclip.vary(
        inputs, num=args.num, seed=args.seed, batch_size=args.batch_size, progress=not args.quiet
    )
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
    from dalle2.preflight import check_resources

    cfg = load_config(args.path)
    check_resources(cfg)
    print(f"{args.path}: valid ({len(cfg.decoder)} decoder stages)")


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Exit code 0 when the reproduction equals the original run, 1 when anything differs."""
    from dalle2.edges.runs import default_tracking_uri, find_run
    from dalle2.edges.tracking.reproduce import reproduce

    uri = args.tracking_uri or default_tracking_uri()
    workdir = Path(args.workdir) if args.workdir else None
    same = reproduce(find_run(args.run_id, uri), uri, workdir, args.experiment, args.other_env)
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
    from dalle2.edges.runs import SourceError
    from dalle2.edges.tracking.reproduce import ReproduceError
    from dalle2.models import ModelFileError

    user_errors = (UserError, SourceError, ReproduceError, ConfigError, ModelFileError)
    try:  # RuntimeError: dalle2.clip.ClipWeightsError among others
        code = args.func(args)
    except (*user_errors, FileNotFoundError, RuntimeError) as err:
        print(f"dalle2: error: {err}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
