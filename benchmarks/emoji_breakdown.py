"""A second opinion on an emoji model, from its own CLIP: the emoji, its style, its tone.

The independent measure is benchmarks/emoji_judge.py (a classifier that is none of the
pipeline's models). This script reads the same things with the run's own CLIP, which
learned from the same images and flatters its own pictures (generated style scores above
real style): a retrieval figure, named for what it is.

The library's metrics know no caption grammar; this benchmark knows the emoji source's
("{CLDR name}, {style} style", tones as "...: dark skin tone"). For each prompt set of the
run's hold-out (held-out (emoji, style) captions, each holdout rule's set, seen captions)
it samples prompts as `evaluate` does (same pairs, same seed) and scores every generated
image, and the prompt's real image as the ceiling, under the run's own CLIP:

  emoji top-5  the asked emoji is among the 5 emoji whose best caption (over styles and
               tones) is closest to the image
  style        of the asked emoji's captions in each style, the asked style's is closest
  tone         (prompts with a skin tone) of the captions of the same emoji and style that
               differ only in tone (no tone included), the asked one is closest

The pipeline's CLIP reads style and tone as well as the real images' column says, and no
better.

    python benchmarks/emoji_breakdown.py --config configs/emoji64.yaml --run RUN_ID
    python benchmarks/emoji_breakdown.py --model models:/unclip-emoji64@champion \
        --grid docs/emoji64-samples.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dalle2.data import shards as D
from dalle2.evaluation import captioned_grid, to_uint8
from dalle2.recipes.evaluate import eval_pairs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import emoji_judge as J  # noqa: E402
from emoji_stages import load_run, model_args  # noqa: E402


def parse(caption: str) -> tuple[str, str, str]:
    """(emoji name with its tones, style, tone family): the caption grammar is emoji_judge's."""
    label = J.parse(caption)
    return caption.rpartition(", ")[0], label.style, label.emoji


@torch.no_grad()
def embed_images(clip: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> normalised CLIP image embeddings."""
    out = [
        clip.encode_image(images[i : i + 64].permute(0, 2, 3, 1).contiguous()).float()
        for i in range(0, len(images), 64)
    ]
    return F.normalize(torch.cat(out), dim=-1)


class Judge:
    """Scores images against every caption of the dataset, grouped by emoji, style, tone."""

    def __init__(self, clip: torch.nn.Module, captions: list[str]) -> None:
        self.captions = captions
        self.index = {c: i for i, c in enumerate(captions)}
        with torch.no_grad():
            text = [
                clip.encode_text(captions[i : i + 256]).embed.float()
                for i in range(0, len(captions), 256)
            ]
        self.text = F.normalize(torch.cat(text), dim=-1)
        parsed = [parse(c) for c in captions]
        names = sorted({p[0] for p in parsed})
        self.name_of = torch.tensor([names.index(p[0]) for p in parsed])
        self.names = names
        self.parsed = parsed

    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, np.ndarray]:
        """Per prompt: emoji in top 5, style right, tone right (NaN where no tone asked)."""
        sims = images @ self.text.T  # (N, C) cosines: `images` are normalised embeddings
        best = torch.full((len(prompts), len(self.names)), -2.0).scatter_reduce(
            1, self.name_of.expand(len(prompts), -1), sims, "amax"
        )
        top5 = best.topk(5, dim=1).indices
        emoji, style, tone = [], [], []
        for i, prompt in enumerate(prompts):
            name, st, family = parse(prompt)
            emoji.append(float(self.names.index(name) in top5[i].tolist()))
            rivals = [j for j, p in enumerate(self.parsed) if p[0] == name]
            style.append(float(self.parsed[max(rivals, key=lambda j: sims[i, j])][1] == st))
            if J.parse(prompt).tone != "none":
                tones = [j for j, p in enumerate(self.parsed) if p[2] == family and p[1] == st]
                tone.append(float(max(tones, key=lambda j: sims[i, j]) == self.index[prompt]))
            else:
                tone.append(float("nan"))
        return {"emoji top-5": np.array(emoji), "style": np.array(style), "tone": np.array(tone)}


def pct(values: np.ndarray) -> str:
    values = values[~np.isnan(values)]
    return f"{100 * values.mean():.1f}" if len(values) else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_args(parser)
    parser.add_argument("--grid", help="write the first held-out set's captioned grid here")
    args = parser.parse_args()
    cfg, shard_dir, unclip = load_run(args)
    clip = unclip.clip
    judge = Judge(clip, sorted(set(D.read_captions(shard_dir))))
    print(f"data {shard_dir}: {len(judge.captions)} captions, {len(judge.names)} emoji names")
    print(
        "| prompt set | prompts | emoji top-5 | style | tone | real: emoji top-5 | style | tone |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for split, set_name in D.Holdout.of(cfg.data).sets:
        pairs = eval_pairs(cfg, shard_dir, None, split)
        if not pairs:
            continue
        prompts = list(pairs["caption"])
        drawn = unclip.generate(prompts, batch_size=cfg.eval.batch_size, seed=cfg.eval.seed)
        gen_u8 = to_uint8(drawn.images)
        real = pairs["image"].permute(0, 3, 1, 2)
        if real.shape[-1] != gen_u8.shape[-1]:
            real = to_uint8(
                F.interpolate(
                    real.float() / 255, size=gen_u8.shape[-1], mode="bilinear", antialias=True
                )
            )
        got = judge.score(embed_images(clip, gen_u8), prompts)
        ceiling = judge.score(embed_images(clip, real), prompts)
        keys = ("emoji top-5", "style", "tone")
        cells = [pct(got[k]) for k in keys] + [pct(ceiling[k]) for k in keys]
        print(f"| {set_name} | {len(prompts)} | " + " | ".join(cells) + " |")
        styles = np.array([parse(p)[1] for p in prompts])
        for st in sorted(set(styles)):
            m = styles == st
            cells = [pct(got[k][m]) for k in keys] + [pct(ceiling[k][m]) for k in keys]
            print(f"| {set_name}, {st} | {int(m.sum())} | " + " | ".join(cells) + " |")
        if args.grid and split != "train":
            k = cfg.eval.grid_size
            gen_hwc, real_hwc = (x[:k].permute(0, 2, 3, 1).numpy() for x in (gen_u8, real))
            captioned_grid(gen_hwc, real_hwc, prompts[:k]).save(args.grid)
            print(f"grid of {k} {set_name} prompts: {args.grid}")
            args.grid = None


if __name__ == "__main__":
    main()
