"""`dalle2` console commands: the user-facing edge of the library.

    dalle2 generate "a large red circle on a white background" --run latest --out generated/
    dalle2 generate "a small blue square on a black background" --model models:/unclip@champion
    dalle2 vary photo.png --model models:/unclip@champion --num 4 --out variations/
    dalle2 edit photo.png --mask mask.png "a small blue square" --model models:/unclip@champion
    dalle2 interpolate a.png b.png --num 8 --model models:/unclip@champion
    dalle2 textdiff photo.png --from "a red circle" --to "a blue circle" --num 5
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


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


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


def _write_images(images, out: Path, what: str) -> None:
    """PNGs out/0000.png, 0001.png, ... of (N, 3, H, W) images in [0, 1]."""
    from PIL import Image

    from dalle2.evaluation import to_uint8

    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(to_uint8(images)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(out / f"{i:04d}.png")
    print(f"wrote {len(images)} {what} to {out}/")


def cmd_vary(args: argparse.Namespace) -> None:
    """New images from each input's CLIP image embedding, decoded by the cascade (unCLIP's
    variations: the prior is not used)."""
    import pandas as pd
    import torch
    from PIL import Image

    from dalle2.edges.images import read_image
    from dalle2.evaluation import to_uint8

    if args.num < 1 or args.batch_size < 1:
        raise UserError("--num and --batch-size must be at least 1")
    unclip = _load(args)
    sources = [Path(p) for p in args.images]
    inputs = torch.stack([read_image(p, unclip.image_size, f"image file {p}") for p in sources])
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


def cmd_edit(args: argparse.Namespace) -> None:
    """Redraw the white region of --mask in IMAGE from a prompt (through the prior) or from
    --reference's CLIP embedding; the black region keeps its pixels."""
    from dalle2.edges.images import read_image, read_mask

    if (args.prompt is None) == (args.reference is None):
        raise UserError("give a prompt or --reference IMAGE, one of the two")
    if args.num < 1 or args.resample < 1:
        raise UserError("--num and --resample must be at least 1")
    unclip = _load(args)
    size = unclip.output_size
    source, mask_file = Path(args.image), Path(args.mask)
    image = read_image(source, size, f"image file {source}")
    mask = read_mask(mask_file, source, size, f"mask file {mask_file}", f"image file {source}")
    references = None
    if args.reference:
        ref = Path(args.reference)
        references = read_image(ref, unclip.image_size, f"image file {ref}")[None]
        references = references.repeat(args.num, 1, 1, 1)
    prompts = None if args.prompt is None else [args.prompt] * args.num
    edited = unclip.edit(
        image[None].repeat(args.num, 1, 1, 1),
        mask[None].repeat(args.num, 1, 1, 1),
        prompts,
        references=references,
        seed=args.seed,
        resample=args.resample,
        progress=not args.quiet,
    )
    _write_images(edited, Path(args.out), "edits")


def cmd_interpolate(args: argparse.Namespace) -> None:
    """A row of images between A and B: their CLIP image embeddings slerped, the noise fixed."""
    from dalle2.edges.images import read_image

    if args.num < 2:
        raise UserError("--num must be at least 2 (the two ends)")
    unclip = _load(args)
    a, b = (read_image(Path(p), unclip.image_size, f"image file {p}") for p in (args.a, args.b))
    _write_images(unclip.interpolate(a, b, num=args.num, seed=args.seed), Path(args.out), "images")


def cmd_textdiff(args: argparse.Namespace) -> None:
    """IMAGE moved along the difference of two captions' text embeddings, the noise fixed."""
    from dalle2.edges.images import read_image

    if args.num < 2:
        raise UserError("--num must be at least 2 (the image and one step)")
    if not 0 < args.max_angle <= 1:
        raise UserError("--max-angle must be above 0 and at most 1")
    unclip = _load(args)
    image = read_image(Path(args.image), unclip.image_size, f"image file {args.image}")
    frames = unclip.textdiff(
        image, args.source, args.target, num=args.num, max_angle=args.max_angle, seed=args.seed
    )
    _write_images(frames, Path(args.out), "images")


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
    e = sub.add_parser("edit", help="redraw a masked region of an image (inpainting)")
    e.add_argument("image", help="the image to edit")
    e.add_argument("prompt", nargs="?", help="what to draw in the masked region")
    e.add_argument("--mask", required=True, help="same size as the image: white = redraw")
    e.add_argument("--reference", help="draw this image's CLIP embedding instead of a prompt")
    _add_model_source(e)
    e.add_argument("--num", type=int, default=1, help="edits to draw (default: 1)")
    e.add_argument("--resample", type=int, default=4, help="RePaint passes a step (default: 4)")
    e.add_argument("--out", default="edits", help="output directory (default: edits)")
    _add_sampling(e)
    i = sub.add_parser("interpolate", help="images between two images (slerp of embeddings)")
    i.add_argument("a", help="the first image")
    i.add_argument("b", help="the last image")
    _add_model_source(i)
    i.add_argument("--num", type=int, default=8, help="images in the row (default: 8)")
    i.add_argument("--out", default="interpolation", help="output directory")
    _add_sampling(i)
    t = sub.add_parser("textdiff", help="move an image along the difference of two captions")
    t.add_argument("image", help="the image to move")
    t.add_argument("--from", dest="source", required=True, help="a caption of the image")
    t.add_argument("--to", dest="target", required=True, help="the caption to move towards")
    _add_model_source(t)
    t.add_argument("--num", type=int, default=5, help="images in the row (default: 5)")
    t.add_argument("--max-angle", type=float, default=0.5, help="slerp fraction at the end")
    t.add_argument("--out", default="textdiff", help="output directory")
    _add_sampling(t)
    e.set_defaults(func=cmd_edit)
    i.set_defaults(func=cmd_interpolate)
    t.set_defaults(func=cmd_textdiff)
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
    from dalle2.edges.images import ImageInputError
    from dalle2.edges.runs import SourceError
    from dalle2.edges.tracking.reproduce import ReproduceError
    from dalle2.models import ModelFileError

    user_errors = (UserError, SourceError, ImageInputError, ReproduceError, ConfigError)
    user_errors += (ModelFileError,)
    try:  # RuntimeError: dalle2.clip.ClipWeightsError among others
        code = args.func(args)
    except (*user_errors, FileNotFoundError, RuntimeError) as err:
        print(f"dalle2: error: {err}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
