"""The short emoji protocol: screen a decoder lever in minutes, judged independently.

Most of the emoji preset's quality is lost in the decoder (benchmarks/emoji_stages.py), so
the protocol trains the base unet alone, at its 32 px, on the training split with the CLIP
embeddings a full run already computed, for a fixed number of steps; then draws from the
*true* CLIP image embeddings (and caption tokens) of fixed held-out and seen images, and the
independent judge (benchmarks/emoji_judge.py) reads the 32 px images. No CLIP, prior or
upsampler trains, so a row takes minutes, not the preset's hour. Winners are confirmed with
the full preset. A row that changes CLIP (`--set clip.train.steps=3000`) first trains that
CLIP and embeds the data with it (about 6 more minutes), so the base unet trains on, and is
judged from, that CLIP's embeddings.

    python benchmarks/emoji_screen.py --name "preset"                 # today's base unet
    python benchmarks/emoji_screen.py --name "v-pred" --set decoder.0.diffusion.prediction=v
    python benchmarks/emoji_screen.py --name "CLIP 64 px" --set clip.tower.image_size=64

Every row is appended to benchmarks/results/emoji_screen.jsonl (committed: a session that
stops mid-experiment loses only the row in flight) and the table of all rows is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import emoji_judge as J  # noqa: E402
from emoji_stages import draw_from_embeddings  # noqa: E402
from withheld_pairs import apply_override  # noqa: E402

from dalle2.config import UnclipConfig, parse_config  # noqa: E402
from dalle2.data import shards as D  # noqa: E402
from dalle2.data.download import dataset_key  # noqa: E402
from dalle2.device import pick_device  # noqa: E402
from dalle2.recipes.clip import fit_clip  # noqa: E402
from dalle2.recipes.decoder import fit_decoder_stage  # noqa: E402
from dalle2.recipes.embeddings import compute_embeddings  # noqa: E402
from dalle2.recipes.evaluate import eval_pairs  # noqa: E402
from dalle2.training.fit import Run  # noqa: E402
from dalle2.training.trainer import TrainResult  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "emoji_screen.jsonl"
CLIP_EMBEDDINGS = ROOT / ".cache" / "embeddings-screen"  # never where find_embeddings looks
STEPS = 2500  # the protocol's base unet steps: about 6 passes over the 13,000 training images


def find_embeddings(data_md5: str | None = None) -> Path:
    """The newest embeddings folder with caption tokens a pipeline run left in .cache/."""
    found = sorted(
        (
            p
            for p in (ROOT / ".cache" / "embeddings").glob("*-1")
            if not data_md5 or p.name.startswith(data_md5)
        ),
        key=lambda p: p.stat().st_mtime,
    )
    if not found:
        raise SystemExit(
            "no embeddings with caption tokens in .cache/embeddings: "
            "run the emoji preset once first"
        )
    return found[-1]


def clip_embeddings(cfg: UnclipConfig, shard_dir: Path, progress: bool) -> tuple[Path, float]:
    """Embeddings (with caption tokens) of a CLIP trained as `cfg.clip` says, kept in
    CLIP_EMBEDDINGS by the CLIP config's hash, and the seconds CLIP trained (0 if reused)."""
    key = hashlib.sha256(cfg.clip.model_dump_json().encode()).hexdigest()[:16]
    out = CLIP_EMBEDDINGS / f"{shard_dir.name}-{key}"
    if (out / "done").exists():
        return out, 0.0
    run = Run(pick_device(cfg.device), progress=progress)
    clip, result = fit_clip(cfg.clip, cfg.data, shard_dir, run)
    compute_embeddings(
        clip,
        shard_dir,
        out,
        with_tokens=True,
        batch_size=cfg.clip.embed_batch_size,
        device=run.device,
        progress=progress,
    )
    (out / "done").write_text(f"{result.seconds:.1f}\n")
    return out, result.seconds


def train(
    cfg: UnclipConfig, shard_dir: Path, emb_dir: Path, progress: bool
) -> tuple[Any, TrainResult]:
    """The base unet trained as the config says (its steps, or its max_minutes), on the
    config's device; returned on the CPU, where the judge's images are drawn."""
    run = Run(pick_device(cfg.device), progress=progress)
    stage, result = fit_decoder_stage(cfg.decoder[0], 0, cfg.data, shard_dir, emb_dir, run)
    return stage.cpu().eval(), result


def judge_stage(
    stage: Any,
    cfg: UnclipConfig,
    shard_dir: Path,
    emb_dir: Path,
    judge: J.EmojiJudge,
    guidance: float | None = None,
) -> dict[str, dict[str, float]]:
    """The judge's figures per prompt set for images the stage draws from true embeddings
    (at `guidance`, or the stage's own sampling settings)."""
    if guidance is not None:
        sample = stage.cfg.sample.model_copy(update={"guidance_scale": guidance})
        stage.cfg = stage.cfg.model_copy(update={"sample": sample})
    figures = {}
    for split, set_name in D.Holdout.of(cfg.data).sets:
        pairs = eval_pairs(cfg, shard_dir, emb_dir, split, text_tokens=stage.reads_text)
        if pairs:
            tokens, mask = (
                (pairs["text_tokens"], pairs["text_mask"]) if stage.reads_text else (None, None)
            )
            images = draw_from_embeddings(
                [stage], pairs["image_embed"], tokens, mask, seed=cfg.eval.seed
            )[0]
            figures[set_name] = J.summary(judge.score(images, list(pairs["caption"])))
    return figures


def table(rows: list[dict[str, Any]]) -> str:
    sets = list(dict.fromkeys(k for r in rows for k in r["figures"]))
    head = (
        "| row | steps | train min | "
        + " | ".join(f"{s} top-5 / style / tone" for s in sets)
        + " |"
    )
    lines = [head, "|---" * (len(sets) + 3) + "|"]
    for r in rows:
        cells = []
        for s in sets:
            f = r["figures"].get(s)
            cells.append(
                "-"
                if f is None
                else f"{J.pct(f['top5'])} / {J.pct(f['style'])} / {J.pct(f['tone'])}"
            )
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['train_s'] / 60:.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "emoji64.yaml"))
    p.add_argument("--name", default="preset", help="the row's label")
    p.add_argument("--set", action="append", default=[], help="KEY.PATH=VALUE into the config")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--prompts", type=int, default=64, help="per prompt set")
    p.add_argument(
        "--guidance", type=float, nargs="*", default=[], help="judge at these guidance scales too"
    )
    p.add_argument("--embeddings", help="embeddings folder (default: the newest with tokens)")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    raw = yaml.safe_load(Path(args.config).read_text())["parameters"]["config"]
    for assignment in [*args.set, f"decoder.0.train.steps={args.steps}"]:
        apply_override(raw, assignment)
    cfg = parse_config(raw)
    shard_dir = ROOT / cfg.data.data_dir / dataset_key(cfg.data)
    judge, meta = J.judge_for(shard_dir, D.Holdout.of(cfg.data), progress=not args.no_progress)
    clip_s = None
    if any(a.startswith("clip.") for a in args.set):
        emb_dir, clip_s = clip_embeddings(cfg, shard_dir, progress=not args.no_progress)
    else:
        emb_dir = Path(args.embeddings) if args.embeddings else find_embeddings()
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"num_prompts": args.prompts})})
    stage, result = train(cfg, shard_dir, emb_dir, progress=not args.no_progress)
    rows = []
    for g in args.guidance or [None]:
        rows.append(
            {
                "name": args.name if g is None else f"{args.name}, guidance {g:g}",
                "set": args.set,
                "steps": result.final_step,
                "prompts": args.prompts,
                "date": time.strftime("%Y-%m-%d"),
                "threads": torch.get_num_threads(),
                "judge": meta["key"],
                "embeddings": emb_dir.name,
                "train_s": round(result.seconds, 1),
                **({"clip_train_s": round(clip_s, 1)} if clip_s is not None else {}),
                "figures": judge_stage(stage, cfg, shard_dir, emb_dir, judge, g),
            }
        )
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(table([json.loads(line) for line in results.read_text().splitlines() if line]))


if __name__ == "__main__":
    main()
