"""Where a trained model loses prompt fidelity on shapes64: stage isolation and sampling.

For a model the pipeline registered (or any folder with clip/, prior/, decoder_unet_*/),
on prompts of an unseen split (held-out captions by default, or withheld_pairs.py's
withheld colour-shape pairs) and of seen captions, each image read
back by shapes64's pixel reader (`shapes64.prompt_fidelity`):

  1. stages: the cascade decoding the true CLIP image embeddings of the prompts' own
     images (the decoder alone), against the full prior -> decoder path, with the prior's
     mean cosine to the true embeddings. A decoder row below the full row's level says the
     decoder, not the prior, loses the attributes; its base stage's own images (before the
     upsamplers) say which stage of the decoder does, empty canvases included.
  2. sampling: the full path under other settings of the base stage (guidance scale,
     solver steps, images drawn per caption for CLIP to pick from: --best-of) and of the
     prior (--prior-best-of, --prior-guidance), without retraining: the ablation rows
     that cost no training.

Prompts are spread over each split's distinct captions as `evaluate` spreads them, with the
same sampling seed, so the row of the model's own settings equals the run's metrics.

    python benchmarks/composition.py --model models:/unclip@champion
    python benchmarks/composition.py --checkpoint DIR --config zenml_config.yaml --prompts 256
    python benchmarks/composition.py --model models:/unclip/1 --guidance 2 3 --steps 20 40
    python benchmarks/composition.py --model models:/unclip-withheld-bench/1 \
        --config .cache/bench/withheld_pairs/RUN.yaml --splits holdout:colour_shape train
    python benchmarks/composition.py --model models:/unclip-withheld-bench/1 --best-of 4 \
        --guidance --steps --config .cache/bench/withheld_pairs/RUN.yaml \
        --splits holdout:colour_shape train

About 30 s per row on 2 CPU cores at 128 prompts per split.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from dalle2.config import parse_config
from dalle2.data import shapes64
from dalle2.edges.cli import _model_dir
from dalle2.evaluation import empty_canvas, to_uint8
from dalle2.recipes.evaluate import eval_pairs
from dalle2.unclip import UnCLIP

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("color", "shape", "size", "background", "all")


def fidelity(images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Percent of images (N, 3, H, W) in [0, 1] whose read attributes match the caption."""
    u8 = to_uint8(images)
    hwc = list(u8.permute(0, 2, 3, 1).numpy())
    scores = {k: 100 * v for k, v in shapes64.prompt_fidelity(hwc, captions).items()}
    return {**scores, "empty": float(empty_canvas(u8).sum())}


def row(name: str, seconds: float, by_split: dict[str, dict[str, float]]) -> str:
    """The unseen split's colour, shape, all-four and empty canvases, then the seen split's
    all-four (the splits in --splits order)."""
    unseen, seen = by_split.values()
    cells = [unseen["color"], unseen["shape"], unseen["all"], unseen["empty"], seen["all"]]
    return f"| {name} | {seconds:.0f} s | " + " | ".join(f"{c:.1f}" for c in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="MLflow model URI (default: the latest run's models)")
    parser.add_argument("--run", help="MLflow run id")
    parser.add_argument("--checkpoint", help="a folder with clip/, prior/, decoder_unet_*/")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlruns.db'}")
    parser.add_argument("--config", default=str(ROOT / "zenml_config.yaml"))
    parser.add_argument("--data", help="shard folder (default: the only one under data/)")
    parser.add_argument("--prompts", type=int, default=128, help="per split")
    parser.add_argument("--guidance", type=float, nargs="*", default=[1.0, 2.0, 3.0, 4.0])
    parser.add_argument("--steps", type=int, nargs="*", default=[20, 40])
    parser.add_argument("--prior-best-of", type=int, nargs="*", default=[], metavar="N")
    parser.add_argument("--prior-guidance", type=float, nargs="*", default=[], metavar="G")
    parser.add_argument(
        "--best-of",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="the base stage draws N images a caption, each from its own prior draw, and CLIP "
        "keeps the closest",
    )
    parser.add_argument(
        "--splits",
        nargs=2,
        default=["holdout", "train"],
        metavar=("UNSEEN", "SEEN"),
        help="the two splits to prompt with, e.g. holdout:colour_shape train for a "
        "withheld_pairs.py run (with that run's --config)",
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    cfg = parse_config(yaml.safe_load(Path(args.config).read_text())["parameters"]["config"])
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"num_prompts": args.prompts})})
    shard_dir = Path(args.data) if args.data else next((ROOT / "data").glob("*/"))
    with tempfile.TemporaryDirectory() as tmp:
        unclip = UnCLIP.load(_model_dir(args, Path(tmp)))
    clip, prior, decoder = unclip.clip, unclip.prior, unclip.decoder
    sets = {s: eval_pairs(cfg, shard_dir, None, s) for s in args.splits}
    print(f"model: {args.model or args.checkpoint or args.run or 'latest run'}; data {shard_dir}")
    print(f"{args.prompts} prompts per split; fidelity in %; unseen = {args.splits[0]}")
    print()
    print("| path | time | unseen colour | unseen shape | unseen all | unseen empty | seen all |")
    print("|---|---|---|---|---|---|---|")

    def full(name: str, cfgs: list | None) -> None:
        t0, res = time.perf_counter(), {}
        for split, pairs in sets.items():
            images = unclip.generate(pairs["caption"], decoder_cfgs=cfgs, seed=cfg.eval.seed).images
            res[split] = fidelity(images, pairs["caption"])
        print(row(name, time.perf_counter() - t0, res), flush=True)

    own = decoder.stages[0].cfg.sample
    full(
        f"prior -> decoder, as trained (base: guidance {own.guidance_scale}, {own.steps} steps)",
        None,
    )
    t0, res, base_res, cos = time.perf_counter(), {}, {}, {}
    base, *upsamplers = decoder.stages
    for split, pairs in sets.items():
        gen = torch.Generator().manual_seed(cfg.eval.seed)
        lows, finals = [], []
        with torch.no_grad():
            true = clip.encode_image(pairs["image"]).float()
            enc = clip.encode_text(pairs["caption"], with_tokens=True)
            for i in range(0, len(true), 32):
                text = {
                    "text_tokens": enc.tokens[i : i + 32].float(),
                    "text_mask": enc.mask[i : i + 32],
                }
                x = base.sample(true[i : i + 32], generator=gen, **text)
                lows.append(x)
                for stage in upsamplers:
                    x = stage.sample(true[i : i + 32], x, generator=gen, **text)
                finals.append(x)
        size = finals[0].shape[-1]
        low = F.interpolate(torch.cat(lows), size=size, mode="nearest")
        base_res[split] = fidelity((low + 1) / 2, pairs["caption"])
        res[split] = fidelity((torch.cat(finals) + 1) / 2, pairs["caption"])
        embeds = unclip.generate(pairs["caption"][:64]).embeds
        cos[split] = F.cosine_similarity(embeds, true[:64]).mean().item()
    seconds = time.perf_counter() - t0
    print(row("decoder on the true image embeddings", seconds, res))
    print(row("its base stage alone (nearest-upsampled; the same pass)", seconds, base_res))
    for g, steps in itertools.product(args.guidance, args.steps):
        if (g, steps) != (own.guidance_scale, own.steps):
            base = own.model_copy(update={"guidance_scale": g, "steps": steps})
            full(f"base guidance {g}, {steps} steps", [base, *[None] * (len(decoder.stages) - 1)])
    trained = prior.cfg
    for n in args.prior_best_of:
        prior.cfg = trained.model_copy(update={"best_of": n})
        full(f"prior best_of {n} (trained with {trained.best_of})", None)
    for g in args.prior_guidance:
        sample_cfg = trained.sample.model_copy(update={"guidance_scale": g})
        prior.cfg = trained.model_copy(update={"sample": sample_cfg})
        full(f"prior guidance {g} ({trained.sample.guidance_scale} as trained)", None)
    prior.cfg = trained
    stage, trained_stage = decoder.stages[0], decoder.stages[0].cfg
    for n in args.best_of:
        stage.cfg = trained_stage.model_copy(update={"best_of": n})
        full(f"base stage best_of {n} (trained with {trained_stage.best_of})", None)
    stage.cfg = trained_stage
    print()
    print(
        "prior cosine to the true image embedding: "
        + ", ".join(f"{s} {c:.3f}" for s, c in cos.items())
    )


if __name__ == "__main__":
    main()
