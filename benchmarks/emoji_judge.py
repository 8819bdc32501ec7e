"""An independent judge of emoji images: which emoji, which style, which skin tone.

The pipeline's own CLIP flatters its own images (it learned from the same pixels and
scores generated style above real style). This judge is none of the pipeline's models: a
small convolutional classifier trained here, only on the real images of the training
split, with three heads read off a caption "{CLDR name}, {style} style":

  emoji  the CLDR name without its skin tones ("thumbs up", "kiss: woman, man"), top-1/top-5
  style  noto, twemoji, fluent, openmoji
  tone   the caption's one skin tone, or none (captions mixing tones train no tone)

It reads 64 px images; smaller ones are upsampled first, and training blurs half the
images through 32 px so a 32 px base stage is judged on the same footing. The held-out real
images, which it never saw, give its ceiling; blank and shuffled images its floor. It is
trained once per data snapshot (the shards' bytes and the hold-out rules) and cached
under .cache/judge/.

    python benchmarks/emoji_judge.py                          # train or load; print ceiling
    python benchmarks/emoji_judge.py --score generated/ other/  # folders with prompts.csv

A folder to score is what `dalle2 generate --prompts-file ... --out DIR` writes: PNGs and a
prompts.csv with columns prompt, image.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dalle2.data import shards as D  # noqa: E402
from dalle2.device import autocast, autocast_dtype, pick_device  # noqa: E402

JUDGE_VERSION = 2  # bump when the network, its training or its inputs change
SIZE = 64  # what the judge reads
STYLES = ("noto", "twemoji", "fluent", "openmoji")
TONES = ("none", "light", "medium-light", "medium", "medium-dark", "dark")
_TONE = re.compile(r"\b(medium-light|medium-dark|medium|light|dark) skin tone")
CACHE = ROOT / ".cache" / "judge"


# ----------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class Label:
    """What a caption asks for. tone: one of TONES, or None where it mixes tones."""

    emoji: str
    style: str
    tone: str | None


def parse(caption: str) -> Label:
    """ "thumbs up: dark skin tone, noto style" -> Label("thumbs up", "noto", "dark")."""
    name, _, style = " ".join(caption.split()).rpartition(", ")
    tones = set(_TONE.findall(name))
    emoji = _TONE.sub("", name)
    emoji = re.sub(r"(,\s*)+", ", ", emoji).replace(": ,", ":").strip(" ,:")
    tone = "none" if not tones else (tones.pop() if len(tones) == 1 else None)
    return Label(emoji, style.removesuffix(" style"), tone)


# ----------------------------------------------------------------------------- network


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class JudgeNet(nn.Module):
    """(B, 3, 64, 64) in [0, 1] -> logits of emoji, style, tone. A 4x4 stride-2 stem reads
    the 64 px detail at the cost of a 32 px network."""

    def __init__(self, num_emoji: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1, bias=False),  # 64 -> 32
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            _block(w, w, 1),
            _block(w, 2 * w, 2),  # 16
            _block(2 * w, 4 * w, 2),  # 8
            _block(4 * w, 8 * w, 2),  # 4
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
        )
        self.emoji = nn.Linear(8 * w, num_emoji)
        self.style = nn.Linear(8 * w, len(STYLES))
        self.tone = nn.Linear(8 * w, len(TONES))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.features((x - 0.5) / 0.5)
        return self.emoji(h), self.style(h), self.tone(h)


def to_input(images: Tensor) -> Tensor:
    """uint8 (N, H, W, 3) or (N, 3, H, W), any square size -> float (N, 3, 64, 64) in [0, 1]."""
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    if x.shape[-1] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear" if x.shape[-1] < SIZE else "area")
    return x.clamp(0, 1)


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Shifts and zooms of a few pixels, half the batch blurred through 32 px (a base
    stage's resolution), a quarter lightly noised (generated images are grainy). No flips:
    some emoji face a side."""
    b = len(x)
    scale = 1 + (torch.rand(b, generator=g) * 0.2 - 0.1)
    shift = (torch.rand(b, 2, generator=g) * 2 - 1) * 0.08
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x - 1, grid, padding_mode="zeros", align_corners=False) + 1  # white
    blur = torch.rand(b, generator=g) < 0.5
    if blur.any():
        low = F.interpolate(x[blur], size=(SIZE // 2, SIZE // 2), mode="area")
        x[blur] = F.interpolate(low, size=(SIZE, SIZE), mode="bilinear")
    noisy = torch.rand(b, generator=g) < 0.25
    if noisy.any():
        sigma = torch.rand(int(noisy.sum()), 1, 1, 1, generator=g) * 0.08
        x[noisy] = x[noisy] + sigma * torch.randn(x[noisy].shape, generator=g)
    return x.clamp(0, 1)


# ----------------------------------------------------------------------------- data


@dataclass
class Split:
    """Real images of one split: uint8 (N, 64, 64, 3) and their captions."""

    images: Tensor
    captions: list[str]


def read_splits(shard_dir: Path, holdout: D.Holdout) -> dict[str, Split]:
    """Every image of the shards by split: "train" and each held-out set's name."""
    out: dict[str, tuple[list[np.ndarray], list[str]]] = {}
    for tar in D.shard_paths(shard_dir):
        for sample in D.tar_samples(tar):
            caption = D.caption_of(sample)
            where = holdout.held_in(sample["__key__"], caption) or "train"
            images, caps = out.setdefault(where, ([], []))
            image = D.decode_image(sample)
            if image.shape[0] != SIZE:
                image = to_input(torch.from_numpy(image)[None]).mul(255).round()
                image = image.byte()[0].permute(1, 2, 0).numpy()
            images.append(image)
            caps.append(caption)
    return {k: Split(torch.from_numpy(np.stack(v[0])), v[1]) for k, v in out.items()}


def _precision() -> str:
    return str(autocast_dtype(pick_device(), "auto") or "fp32").removeprefix("torch.")


def snapshot_key(shard_dir: Path, holdout: D.Holdout, **settings: Any) -> str:
    """Names a judge: the shards' bytes, the split, the training settings and precision (a
    bf16 judge, on a CPU or GPU that runs bf16, differs a little from an fp32 one)."""
    settings = {**settings, "precision": _precision()}
    h = hashlib.sha256(f"judge-v{JUDGE_VERSION}".encode())
    for tar in D.shard_paths(shard_dir):
        h.update(tar.name.encode())
        with tar.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    rules = [r.model_dump() if hasattr(r, "model_dump") else r for r in holdout.rules]
    h.update(json.dumps([holdout.fraction, holdout.by, rules, settings], sort_keys=True).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- the judge


class EmojiJudge:
    """A trained JudgeNet and the emoji names its classes stand for."""

    def __init__(self, net: JudgeNet, emoji: list[str]) -> None:
        self.net = net.eval()
        self.emoji = emoji
        self.index = {e: i for i, e in enumerate(emoji)}

    @classmethod
    def train(
        cls,
        data: Split,
        *,
        epochs: int = 24,
        batch_size: int = 128,
        lr: float = 3e-3,
        width: int = 48,
        seed: int = 0,
        progress: bool = True,
    ) -> EmojiJudge:
        """Fit on `data` (the training split's real images) alone."""
        from tqdm.auto import tqdm

        labels = [parse(c) for c in data.captions]
        emoji = sorted({lab.emoji for lab in labels})
        index = {e: i for i, e in enumerate(emoji)}
        y_emoji = torch.tensor([index[lab.emoji] for lab in labels])
        y_style = torch.tensor(
            [STYLES.index(lab.style) if lab.style in STYLES else -100 for lab in labels]
        )
        y_tone = torch.tensor([TONES.index(lab.tone) if lab.tone else -100 for lab in labels])
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        device = pick_device()
        dtype = autocast_dtype(device, "auto")  # bf16 where the CPU or GPU runs it natively
        net = JudgeNet(len(emoji), width).to(device, memory_format=torch.channels_last)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
        n = len(labels)
        steps = epochs * math.ceil(n / batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.15)
        net.train()
        bar = tqdm(total=steps, desc="judge", disable=not progress)
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                x = _augment(to_input(data.images[idx]), g)
                x = x.to(device, memory_format=torch.channels_last)
                with autocast(device, dtype):
                    e, s, t = (z.float() for z in net(x))
                ye, ys, yt = (y[idx].to(device) for y in (y_emoji, y_style, y_tone))
                loss = (
                    F.cross_entropy(e, ye, label_smoothing=0.1)
                    + F.cross_entropy(s, ys, ignore_index=-100)
                    + F.cross_entropy(t, yt, ignore_index=-100)
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        return cls(net.cpu(), emoji)

    @torch.no_grad()
    def predict(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Logits (emoji, style, tone) of uint8 or [0, 1] images, any square size."""
        device = pick_device()
        net = self.net.to(device, memory_format=torch.channels_last)
        outs = []
        for i in range(0, len(images), 256):
            x = to_input(images[i : i + 256]).to(device, memory_format=torch.channels_last)
            with autocast(device, autocast_dtype(device, "auto")):
                outs.append([z.float().cpu() for z in net(x)])
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))  # type: ignore[return-value]

    def score(self, images: Tensor, prompts: list[str]) -> dict[str, np.ndarray]:
        """Per prompt, 1.0 or 0.0: emoji top-1 and top-5, style, tone (NaN where not asked:
        tone only for captions with one skin tone; emoji where the judge never saw it)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        e, s, t = self.predict(images)
        top5 = e.topk(min(5, e.shape[1]), dim=1).indices
        toned = t[:, 1:].argmax(1) + 1  # asked a tone: which of the five it shows
        out: dict[str, list[float]] = {"top1": [], "top5": [], "style": [], "tone": []}
        for i, prompt in enumerate(prompts):
            lab = parse(prompt)
            k = self.index.get(lab.emoji)
            out["top1"].append(math.nan if k is None else float(top5[i, 0] == k))
            out["top5"].append(math.nan if k is None else float(k in top5[i].tolist()))
            ok = lab.style in STYLES
            out["style"].append(float(s[i].argmax() == STYLES.index(lab.style)) if ok else math.nan)
            asked = lab.tone not in (None, "none")
            out["tone"].append(float(TONES[int(toned[i])] == lab.tone) if asked else math.nan)
        return {k: np.array(v) for k, v in out.items()}

    def save(self, folder: Path, meta: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        weights = {k: v.contiguous() for k, v in self.net.state_dict().items()}  # channels_last
        save_file(weights, str(folder / "judge.safetensors"))
        meta = {**meta, "emoji": self.emoji, "width": self.net.features[0].out_channels}
        (folder / "judge.json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path) -> tuple[EmojiJudge, dict[str, Any]]:
        from safetensors.torch import load_file

        meta = json.loads((folder / "judge.json").read_text())
        net = JudgeNet(len(meta["emoji"]), meta["width"])
        net.load_state_dict(load_file(str(folder / "judge.safetensors")))
        return cls(net, meta["emoji"]), meta


def summary(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean of each column over the prompts it applies to, and how many those are."""
    out: dict[str, float] = {"prompts": float(len(scores["top5"]))}
    for k, v in scores.items():
        v = v[~np.isnan(v)]
        out[k] = float(v.mean()) if len(v) else math.nan
    out["toned"] = float((~np.isnan(scores["tone"])).sum())
    return out


def controls(judge: EmojiJudge, split: Split, seed: int = 0) -> dict[str, dict[str, float]]:
    """The judge on real images of a split (its ceiling), on the same images under shuffled
    prompts and on blank white canvases (its floor: chance)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(split.captions), generator=g).tolist()
    shuffled = [split.captions[i] for i in perm]
    blank = torch.full_like(split.images, 255)
    return {
        "real": summary(judge.score(split.images, split.captions)),
        "shuffled prompts": summary(judge.score(split.images, shuffled)),
        "blank": summary(judge.score(blank, split.captions)),
    }


def judge_for(
    shard_dir: Path, holdout: D.Holdout, *, progress: bool = True, **settings: Any
) -> tuple[EmojiJudge, dict[str, Any]]:
    """The judge of this data snapshot: from the cache, else trained (a few CPU-minutes)
    and its ceiling measured on every held-out set, then cached."""
    key = snapshot_key(shard_dir, holdout, **settings)
    folder = CACHE / key
    if (folder / "judge.json").is_file():
        return EmojiJudge.load(folder)
    splits = read_splits(shard_dir, holdout)
    if "train" not in splits:
        raise SystemExit(f"{shard_dir} has no training images under this hold-out")
    t0 = time.perf_counter()
    judge = EmojiJudge.train(splits["train"], progress=progress, **settings)
    minutes = (time.perf_counter() - t0) / 60
    sets = {k: controls(judge, v) for k, v in splits.items() if k != "train"}
    meta = {
        "key": key,
        "shard_dir": str(shard_dir),
        "train_images": len(splits["train"].captions),
        "train_minutes": round(minutes, 2),
        "torch_threads": torch.get_num_threads(),
        "device": f"{pick_device().type}, {_precision()}",
        "settings": settings,
        "ceiling": sets,
    }
    judge.save(folder, meta)
    return judge, meta


# ----------------------------------------------------------------------------- reports


def pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


HEADER = "| images | prompts | emoji top-5 | top-1 | style | tone (toned prompts) |"
RULE = "|---|---|---|---|---|---|"


def row(name: str, s: dict[str, float]) -> str:
    tone = f"{pct(s['tone'])} ({int(s['toned'])})" if s["toned"] else "-"
    return (
        f"| {name} | {int(s['prompts'])} | {pct(s['top5'])} | {pct(s['top1'])} | "
        f"{pct(s['style'])} | {tone} |"
    )


def ceiling_table(meta: dict[str, Any]) -> str:
    lines = [HEADER, RULE]
    for split, figures in meta["ceiling"].items():
        for control, s in figures.items():
            lines.append(row(f"{split}: {control}", s))
    return "\n".join(lines)


def read_folder(folder: Path) -> tuple[Tensor, list[str]]:
    """A folder `dalle2 generate` wrote: its images and their prompts."""
    import pandas as pd
    from PIL import Image

    table = folder / "prompts.csv"
    if not table.is_file():
        raise SystemExit(f"{folder} has no prompts.csv (columns prompt, image); nothing to score")
    frame = pd.read_csv(table)
    images = []
    for path in frame["image"].astype(str):
        p = Path(path)
        p = p if p.is_file() else folder / p.name
        images.append(np.asarray(Image.open(p).convert("RGB")))
    return torch.from_numpy(np.stack(images)), frame["prompt"].astype(str).tolist()


def shard_dir_of(config: Path) -> tuple[Path, D.Holdout]:
    """The data folder and hold-out a run config names."""
    from dalle2.config import load_config
    from dalle2.data.download import dataset_key

    cfg = load_config(config)
    return ROOT / cfg.data.data_dir / dataset_key(cfg.data), D.Holdout.of(cfg.data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "emoji64.yaml"))
    parser.add_argument("--score", nargs="*", default=[], metavar="FOLDER")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    shard_dir, holdout = shard_dir_of(Path(args.config))
    if not shard_dir.is_dir():
        raise SystemExit(f"no data at {shard_dir}: run the pipeline's download step first")
    judge, meta = judge_for(shard_dir, holdout, progress=not args.no_progress)
    print(
        f"judge {meta['key']}: {len(judge.emoji)} emoji, trained on {meta['train_images']} "
        f"real training images in {meta['train_minutes']} min ({meta['device']}, "
        f"{meta['torch_threads']} threads)"
    )
    print(ceiling_table(meta))
    if args.score:
        print()
        print(HEADER)
        print(RULE)
        for folder in args.score:
            images, prompts = read_folder(Path(folder))
            print(row(folder, summary(judge.score(images, prompts))))


if __name__ == "__main__":
    main()
