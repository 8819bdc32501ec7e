"""Where a trained model loses prompt fidelity on shapes64: stage isolation and sampling.

For a model the pipeline registered (or any folder with clip/, prior/, decoder_unet_*/),
on prompts of held-out captions (never trained on) and of seen captions, each image read
back by shapes64's pixel reader (`shapes64.prompt_fidelity`):

  1. stages: the cascade decoding the true CLIP image embeddings of the prompts' own
     images (the decoder alone), against the full prior -> decoder path, with the prior's
     mean cosine to the true embeddings. A decoder row below the full row's level says the
     decoder, not the prior, loses the attributes.
  2. sampling: the full path under other settings of the base stage (guidance scale,
     solver steps), without retraining: the ablation rows that cost no training.

Prompts are spread over each split's distinct captions as `evaluate` spreads them, with the
same sampling seed, so the row of the model's own settings equals the run's metrics.

    python benchmarks/composition.py --model models:/unclip@champion
    python benchmarks/composition.py --checkpoint DIR --config zenml_config.yaml --prompts 256
    python benchmarks/composition.py --model models:/unclip/1 --guidance 2 3 --steps 20 40

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

from dalle2.cli import _model_dir
from dalle2.config import parse_config
from dalle2.data import shapes64
from dalle2.evaluation import to_uint8
from dalle2.models import load_pipeline
from dalle2.recipes.evaluate import eval_pairs, generate

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("color", "shape", "size", "background", "all")


def fidelity(images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Percent of images (N, 3, H, W) in [0, 1] whose read attributes match the caption."""
    hwc = list(to_uint8(images).permute(0, 2, 3, 1).numpy())
    return {k: 100 * v for k, v in shapes64.prompt_fidelity(hwc, captions).items()}


def row(name: str, seconds: float, by_split: dict[str, dict[str, float]]) -> str:
    cells = [f"{by_split[s][k]:.1f}" for s in ("holdout", "train") for k in ("color", "all")]
    shapes = f"{by_split['holdout']['shape']:.1f}"
    return f"| {name} | {seconds:.0f} s | {cells[0]} | {shapes} | " + " | ".join(cells[1:]) + " |"


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
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    cfg = parse_config(yaml.safe_load(Path(args.config).read_text())["parameters"]["config"])
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"num_prompts": args.prompts})})
    shard_dir = Path(args.data) if args.data else next((ROOT / "data").glob("*/"))
    with tempfile.TemporaryDirectory() as tmp:
        clip, prior, decoder = load_pipeline(_model_dir(args, Path(tmp)))
    clip.eval(), prior.eval(), decoder.eval()
    cpu = torch.device("cpu")
    sets = {s: eval_pairs(cfg, shard_dir, None, s) for s in ("holdout", "train")}
    print(f"model: {args.model or args.checkpoint or args.run or 'latest run'}; data {shard_dir}")
    print(f"{args.prompts} prompts per split; fidelity in % (held-out = captions never trained on)")
    print()
    print(
        "| path | time | held-out colour | held-out shape | held-out all | seen colour | seen all |"
    )
    print("|---|---|---|---|---|---|---|")

    def full(name: str, cfgs: list | None) -> None:
        t0, res = time.perf_counter(), {}
        for split, pairs in sets.items():
            images, _ = generate(
                clip,
                prior,
                decoder,
                pairs["caption"],
                device=cpu,
                decoder_cfgs=cfgs,
                seed=cfg.eval.seed,
            )
            res[split] = fidelity(images, pairs["caption"])
        print(row(name, time.perf_counter() - t0, res), flush=True)

    own = decoder.stages[0].cfg.sample
    full(
        f"prior -> decoder, as trained (base: guidance {own.guidance_scale}, {own.steps} steps)",
        None,
    )
    t0, res, cos = time.perf_counter(), {}, {}
    for split, pairs in sets.items():
        gen = torch.Generator().manual_seed(cfg.eval.seed)
        with torch.no_grad():
            true = clip.encode_image(pairs["image"]).float()
            enc = clip.encode_text(pairs["caption"], with_tokens=True)
            chunks = [
                decoder.sample(
                    true[i : i + 32],
                    enc.tokens[i : i + 32].float(),
                    enc.mask[i : i + 32],
                    generator=gen,
                )
                for i in range(0, len(true), 32)
            ]
        res[split] = fidelity(torch.cat(chunks), pairs["caption"])
        _, embeds = generate(clip, prior, decoder, pairs["caption"][:64], device=cpu)
        cos[split] = F.cosine_similarity(embeds, true[:64]).mean().item()
    print(row("decoder on the true image embeddings", time.perf_counter() - t0, res))
    for g, steps in itertools.product(args.guidance, args.steps):
        if (g, steps) != (own.guidance_scale, own.steps):
            base = own.model_copy(update={"guidance_scale": g, "steps": steps})
            full(f"base guidance {g}, {steps} steps", [base, *[None] * (len(decoder.stages) - 1)])
    print()
    print(
        f"prior cosine to the true image embedding: held-out {cos['holdout']:.3f}, "
        f"seen {cos['train']:.3f}"
    )


if __name__ == "__main__":
    main()
