"""What the benchmark scripts share: the machine's matmul peak, FLOP counts, synthetic
training batches of a config's models, timing through the project's own Trainer, and the
markdown table they print. Figures are ratios inside one run: the hosts are shared."""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# torch and dalle2 are imported where they are used: scripts set thread counts before torch
# loads, and bench_vs_reference's children run in the reference's venv, without dalle2
if TYPE_CHECKING:
    import torch

    from dalle2.config import UnclipConfig


def default_config(path: str | Path = ROOT / "zenml_config.yaml") -> UnclipConfig:
    from dalle2.config import load_config

    return load_config(Path(path))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """The hardware a figure was measured on, for its table."""
    import torch

    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    device: torch.device, dtype: torch.dtype, seconds: float = 2.0, n: int | None = None
) -> float:
    """The best n x n matmul rate (GFLOP/s) over `seconds`: this machine's peak for `dtype`
    on torch's current threads, measured in the same run as the figures held against it."""
    import torch

    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.mm(a, b)  # warm-up: thread pool, packing buffers, cuBLAS handles
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def flops_per_sample(
    model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], batch: dict
) -> float:
    """Training FLOPs per sample, counted on a one-row batch (on the CPU, where the model
    is built): a per-sample count does not need the whole batch."""
    return flops(lambda: loss_fn(model, {k: v[:1] for k, v in batch.items()}))


def flops(fn: Callable[[], torch.Tensor]) -> float:
    """FLOPs of `fn()` and its backward. sdpa runs its math backend while counting: torch's
    counter has no formula for the fused attention kernels and would count them as zero."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn().backward()
    return float(counter.get_total_flops())


def training_case(
    cfg: UnclipConfig, which: str, batch_size: int | None = None
) -> tuple[torch.nn.Module, Callable[[torch.nn.Module, Any], torch.Tensor], dict, Any]:
    """(model, loss_fn, batch, train config) of one model of `cfg` ('clip', 'prior' or
    'decoder.I'), with a random batch of the shapes the pipeline feeds it, so a benchmark
    needs no data; the loss functions are the recipes'."""
    import open_clip
    import torch

    from dalle2.clip import build_scratch_clip
    from dalle2.data import shapes64
    from dalle2.decoder import DecoderStage
    from dalle2.prior import DiffusionPrior

    g = torch.Generator().manual_seed(0)
    tokens = cfg.prior.net.max_text_len  # CLIP's context length, as the embeddings store it

    def text(b: int, width: int) -> dict[str, torch.Tensor]:
        return {
            "text_tokens": torch.randn(b, tokens, width, generator=g),
            "text_mask": torch.ones(b, tokens, dtype=torch.bool),
        }

    if which == "clip":
        train = cfg.clip.train
        b = batch_size or train.batch_size
        captions = [s.caption for s in shapes64.all_specs()]
        model = build_scratch_clip(cfg.clip.tower, captions)
        size = cfg.clip.tower.image_size
        loss_core = open_clip.ClipLoss()
        picked = [captions[i % len(captions)] for i in range(b)]
        batch = {"image": torch.rand(b, 3, size, size, generator=g) * 2 - 1}
        batch["tokens"] = model.tokenize(picked)

        def clip_loss(net: torch.nn.Module, x: dict) -> torch.Tensor:
            img, txt, scale = net(x["image"], x["tokens"])
            return loss_core(img.float(), txt.float(), scale.float())

        return model, clip_loss, batch, train
    if which == "prior":
        train = cfg.prior.train
        b = batch_size or train.batch_size
        dim = cfg.prior.net.embed_dim
        batch = {
            "text_embed": torch.randn(b, dim, generator=g),
            "image_embed": torch.randn(b, dim, generator=g),
        }
        if cfg.prior.use_text_tokens:
            batch |= text(b, cfg.prior.net.text_token_dim)

        def prior_loss(net: torch.nn.Module, x: dict) -> torch.Tensor:
            return net(x["text_embed"], x["image_embed"], x.get("text_tokens"), x.get("text_mask"))

        return DiffusionPrior(cfg.prior), prior_loss, batch, train
    stage_cfg = cfg.decoder[int(which.split(".")[1])]
    train = stage_cfg.train
    b = batch_size or train.batch_size
    size = cfg.data.image_size
    batch = {
        "image": torch.rand(b, 3, size, size, generator=g) * 2 - 1,
        "image_embed": torch.randn(b, stage_cfg.unet.image_embed_dim, generator=g),
    }
    stage = DecoderStage(stage_cfg)
    if stage.reads_text:
        batch |= text(b, stage_cfg.unet.text_token_dim)

    def stage_loss(net: torch.nn.Module, x: dict) -> torch.Tensor:
        return net(x["image"], x["image_embed"], x.get("text_tokens"), x.get("text_mask"))

    return stage, stage_loss, batch, train


def repeat(batch: dict) -> Iterator[dict]:
    while True:
        yield batch


def time_training(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batch: dict,
    train: Any,
    device: torch.device,
    steps: int,
    warmup: int = 3,
) -> dict[str, float]:
    """Train through the project's Trainer: the first `warmup` steps (compile time, when
    compiling) timed apart from the next `steps` (samples/s)."""

    from dalle2.training.trainer import Trainer

    trainer = Trainer(model, train, loss_fn, device=device, progress=False)
    batch = {k: v.to(device) for k, v in batch.items()}
    sync(device)
    t0 = time.perf_counter()
    trainer.fit(repeat(batch), steps=warmup)
    sync(device)
    first = time.perf_counter() - t0
    result = trainer.fit(repeat(batch), steps=warmup + steps)
    sync(device)
    return {"warmup_s": first, "samples_per_s": result.samples_per_s}


def markdown(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """A markdown table, columns padded so it reads in a terminal too."""
    cells = [tuple(str(c) for c in row) for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def write_json(path: str | Path, figures: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(figures, indent=2) + "\n")
