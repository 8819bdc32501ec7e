"""Where an emoji model loses quality, stage by stage, judged by the independent judge.

For each prompt set of the run's hold-out (held-out (emoji, style) pairs, each hold-out
rule's set, seen captions) it takes the same prompts as `evaluate` and reads, with the judge
of benchmarks/emoji_judge.py (trained on the real training images only):

  real images                      the judge's ceiling
  CLIP retrieval                   the real image's own caption among CLIP's top 5 (top 1) of
                                   every caption: what CLIP itself tells apart
  base stage, true embedding       the first unet drawing from the CLIP image embedding of
                                   the real image (no prior): is the emoji drawn when the
                                   embedding is right?
  cascade, true embedding          the same through the upsampler(s)
  prior + cascade (text)           text to image, as users draw; with the prior's cosine to
                                   the true image embedding

The first row far below the one above it is the stage that loses the most.

    python benchmarks/emoji_stages.py --run RUN_ID           # or --model URI, --checkpoint DIR
    python benchmarks/emoji_stages.py --run RUN_ID --set decoder.0.best_of=4   # sampling levers
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import emoji_judge as J  # noqa: E402
from withheld_pairs import apply_override  # noqa: E402

from dalle2.config import UnclipConfig, load_config  # noqa: E402
from dalle2.data import shards as D  # noqa: E402
from dalle2.data.download import dataset_key  # noqa: E402
from dalle2.evaluation import caption_ranks, retrieval_summary, to_uint8  # noqa: E402
from dalle2.recipes.evaluate import eval_pairs  # noqa: E402
from dalle2.unclip import UnCLIP  # noqa: E402


@torch.no_grad()
def true_embeddings(clip: Any, images_hwc: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """CLIP image embeddings (N, E), on the CPU, of uint8 (N, H, W, 3) images, as the
    embedding step computes them."""
    rows = [
        clip.encode_image(images_hwc[i : i + batch]).float()
        for i in range(0, len(images_hwc), batch)
    ]
    return torch.cat(rows).cpu()


@torch.no_grad()
def draw_from_embeddings(
    stages: list[Any],
    embed: torch.Tensor,
    tokens: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    seed: int = 0,
    batch: int = 32,
) -> list[torch.Tensor]:
    """uint8 (N, 3, s, s) images on the CPU after each of `stages`, drawn from given image
    embeddings (and caption tokens, for stages that read them) on the stages' device: the
    decoder without the prior."""
    device = next(stages[0].parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    outs: list[list[torch.Tensor]] = [[] for _ in stages]
    for i in range(0, len(embed), batch):
        text = {}
        if tokens is not None:
            text = {
                "text_tokens": tokens[i : i + batch].float().to(device),
                "text_mask": mask[i : i + batch].to(device),
            }
        images = None
        for k, stage in enumerate(stages):
            rows = embed[i : i + batch].float().to(device)
            images = stage.sample(rows, images, generator=gen, **text)
            outs[k].append(to_uint8((images + 1) / 2))
    return [torch.cat(o) for o in outs]


def caption_tokens(clip: Any, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's per-token encodings (N, T, D) and mask (N, T) of captions."""
    with torch.no_grad():
        encs = [
            clip.encode_text(captions[i : i + 256], with_tokens=True)
            for i in range(0, len(captions), 256)
        ]
    return torch.cat([e.tokens.float() for e in encs]), torch.cat([e.mask for e in encs])


def clip_retrieval(
    clip: Any, embed: torch.Tensor, captions: list[str], every: list[str]
) -> dict[str, float]:
    """Top-1/top-5 of each real image's own caption among `every` caption, under CLIP."""
    with torch.no_grad():
        text = torch.cat(
            [
                clip.encode_text(every[i : i + 256]).embed.float().cpu()
                for i in range(0, len(every), 256)
            ]
        )
    index = {c: i for i, c in enumerate(every)}
    ranks = caption_ranks(embed, text, torch.tensor([index[c] for c in captions]))
    return retrieval_summary(ranks)


@dataclass
class SetDraws:
    """One prompt set's draws: the real images and their true CLIP image embeddings, the
    images after each decoder stage drawn from those, and text to image with the prior's
    cosine to the true embedding."""

    name: str
    prompts: list[str]
    real: torch.Tensor  # uint8 (N, H, W, 3)
    embed: torch.Tensor
    drawn: list[torch.Tensor]  # uint8 (N, 3, s, s) per stage
    text: torch.Tensor  # uint8 (N, 3, S, S)
    prior_cos: float


def draw_sets(
    cfg: UnclipConfig,
    unclip: UnCLIP,
    shard_dir: Path,
    progress: Callable[[str], None] = print,
) -> Iterator[SetDraws]:
    """Each prompt set of the hold-out (`evaluate`'s prompts and seed), drawn from the true
    embeddings and from the text, wherever the models are (CPU or GPU): what the emoji
    stage table and the GPU sweep's shapes64 reader both read."""
    clip, decoder = unclip.eval().clip, unclip.decoder
    for split, set_name in D.Holdout.of(cfg.data).sets:
        pairs = eval_pairs(cfg, shard_dir, None, split)
        if not pairs:
            continue
        prompts = list(pairs["caption"])
        progress(f"{set_name}: {len(prompts)} prompts")
        embed = true_embeddings(clip, pairs["image"])
        tokens, mask = caption_tokens(clip, prompts) if decoder.reads_text else (None, None)
        drawn = draw_from_embeddings(list(decoder.stages), embed, tokens, mask, seed=cfg.eval.seed)
        text = unclip.generate(prompts, batch_size=cfg.eval.batch_size, seed=cfg.eval.seed)
        cos = float(F.cosine_similarity(text.embeds, embed.float(), dim=-1).mean())
        yield SetDraws(set_name, prompts, pairs["image"], embed, drawn, to_uint8(text.images), cos)


def stage_rows(
    cfg: UnclipConfig,
    unclip: UnCLIP,
    judge: J.EmojiJudge,
    shard_dir: Path,
    *,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One dict per (prompt set, path): the judge's figures and where they apply, the
    prior's cosine and CLIP's retrieval."""
    every = D.read_captions(shard_dir)
    out = []
    for d in draw_sets(cfg, unclip, shard_dir, progress):
        clip_r = clip_retrieval(unclip.clip, d.embed, d.prompts, every)
        paths = [
            ("real images (judge's ceiling)", d.real, {}),
            (f"base stage, true embedding ({d.drawn[0].shape[-1]} px)", d.drawn[0], {}),
        ]
        if len(d.drawn) > 1:
            paths.append((f"cascade, true embedding ({d.drawn[-1].shape[-1]} px)", d.drawn[-1], {}))
        paths.append(("prior + cascade (text)", d.text, {"prior_cos": d.prior_cos}))
        out.append(
            {
                "set": d.name,
                "path": "CLIP retrieval (caption among all)",
                "prompts": len(d.prompts),
                "top5": clip_r["top5"],
                "top1": clip_r["top1"],
            }
        )
        for name, imgs, extra in paths:
            out.append(
                {"set": d.name, "path": name, **J.summary(judge.score(imgs, d.prompts)), **extra}
            )
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| prompt set | path | prompts | emoji top-5 | top-1 | style | tone (toned) "
        "| prior cos to true |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tone = f"{J.pct(r['tone'])} ({int(r['toned'])})" if r.get("toned") else "-"
        cells = [
            r["set"],
            r["path"],
            str(int(r["prompts"])),
            J.pct(r["top5"]),
            J.pct(r["top1"]),
            J.pct(r.get("style", float("nan"))),
            tone,
            J.pct(r.get("prior_cos", float("nan"))),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_args(parser: argparse.ArgumentParser) -> None:
    """--config, the model's source (as `dalle2 generate` takes it), --prompts and --set."""
    from dalle2.edges.cli import _add_model_source

    parser.add_argument("--config", default=str(ROOT / "configs" / "emoji64.yaml"))
    _add_model_source(parser)
    parser.add_argument("--prompts", type=int, default=128, help="per prompt set")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="a sampling setting of the loaded models: prior.best_of=4, decoder.0.sample.steps=60",
    )


SAMPLING_KEYS = ("sample", "best_of")  # what a trained model may change without training


def set_sampling(unclip: UnCLIP, assignments: list[str]) -> None:
    """Apply `prior.KEY=V` / `decoder.I.KEY=V` to the loaded models' sampling settings."""
    for assignment in assignments:
        path = assignment.partition("=")[0].split(".")
        if path[0] == "prior":
            model, rest = unclip.prior, path[1:]
        elif path[0] == "decoder" and len(path) > 2 and path[1].isdigit():
            model, rest = unclip.decoder.stages[int(path[1])], path[2:]
        else:
            raise SystemExit(f"--set {assignment}: say prior.KEY=V or decoder.I.KEY=V")
        if rest[0] not in SAMPLING_KEYS:
            raise SystemExit(
                f"--set {assignment}: only {', '.join(SAMPLING_KEYS)} change without training"
            )
        raw = model.cfg.model_dump()
        apply_override(raw, ".".join(rest) + "=" + assignment.partition("=")[2])
        model.cfg = type(model.cfg).model_validate(raw)


def load_run(args: argparse.Namespace) -> tuple[UnclipConfig, Path, UnCLIP]:
    """The run config (eval.num_prompts from --prompts), its data folder and its models."""
    from dalle2.edges.cli import _model_dir

    cfg = load_config(Path(args.config))
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"num_prompts": args.prompts})})
    shard_dir = ROOT / cfg.data.data_dir / dataset_key(cfg.data)
    with tempfile.TemporaryDirectory() as tmp:
        unclip = UnCLIP.load(_model_dir(args, Path(tmp)))
    set_sampling(unclip, args.set)
    return cfg, shard_dir, unclip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_args(parser)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    cfg, shard_dir, unclip = load_run(args)
    judge, meta = J.judge_for(shard_dir, D.Holdout.of(cfg.data))
    rows = [{**r, "sampling": args.set} for r in stage_rows(cfg, unclip, judge, shard_dir)]
    print(f"judge {meta['key']} ({len(judge.emoji)} emoji); data {shard_dir}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
