"""How the streaming training path scales: memory against dataset size, speed against
in-memory batches, and samples/s on 1 and 2 processes against the machine's matmul peak.

Every figure times the project's own `Trainer.fit`, reached through `fit_decoder_stage`
(streaming) and `dalle2.recipes.launch.train_stage` (1 or 2 processes), on the default base unet
(decoder[0] of zenml_config.yaml) on CPU in fp32, over shapes64 shard sets written here:

  a. peak RSS training a fixed number of steps on 4,000 vs 40,000 images, each case in a
     fresh process; the pre-streaming path (every image decoded into one tensor) for contrast.
  b. samples/s streaming from shards vs drawing batches from tensors already in memory (the
     pre-streaming path), alternated over rounds.
  c. samples/s on 1 process (all threads, then 1 thread) and on 2 processes (DDP over gloo,
     the same global batch), with FLOPs per sample x samples/s against a timed sgemm.

Absolute times on a shared 2-core machine drift from minute to minute, so each figure is a
ratio inside one run. samples/s come from Trainer.fit's own metrics windows after the first
(warm-up) windows: the loader's start and the first slow steps are left out, and so is
torchrun's start-up.

    python benchmarks/bench_scale.py --quick         # checks the script, ~30 s on 2 cores
    python benchmarks/bench_scale.py                 # the figures, ~8 min on 2 idle cores
    python benchmarks/bench_scale.py --only b --only c --rounds 3 --workdir /tmp/bench-cache

On a machine where other work keeps a core busy, 2 OpenMP threads stall at every barrier
and the 2-thread runs slow down many times over: measure on an idle machine, or compare
with `--threads 1`.

Shard sets are cached under --workdir (default ../bench-cache, outside the repository), so
only the first run pays for rendering 44,000 images (~20 s). The parent runs one child
process per measurement (`--child`, not for users) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _common import cpu_name, flops, markdown, matmul_peak, peak_rss_mib

if TYPE_CHECKING:
    import torch

    from dalle2.config import DataConfig, UnclipConfig
    from dalle2.training.trainer import TrainResult

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS = ("a", "b", "c")

# The sizes. Steps are log_every x (warm-up windows + measured windows).
FULL: dict[str, Any] = {
    "images": (4000, 40000),  # a: the two shard sets; b and c train on the first
    "shard_size": 1000,  # img2dataset's default
    "batch": None,  # None: as configured (32)
    "rss_steps": 60,
    "rss_contrast": True,  # a. also the pre-streaming path, in two more processes
    "log_every": 10,
    "warmup_windows": 2,  # the first steps of a fresh process run several times slower
    "windows": 8,
    "rounds": 2,  # b and c alternate their runs this many times, reversing the order
    "gemm_n": 2048,
    "gemm_s": 2.0,
}

# Tiny sets, batch and step counts: checks that every path runs, its figures mean nothing.
QUICK: dict[str, Any] = {
    "images": (200, 800),
    "shard_size": 100,
    "batch": 8,
    "rss_steps": 4,
    "rss_contrast": False,  # b. runs the same in-memory code; a minute is the budget here
    "log_every": 2,
    "warmup_windows": 1,
    "windows": 1,
    "rounds": 1,
    "gemm_n": 512,
    "gemm_s": 0.2,
}


# ============================================================================ shard sets


def build_shard_set(
    root: Path,
    images: int,
    shard_size: int,
    embed_dim: int,
    image_size: int,
    tokens: tuple[int, int] | None = None,
) -> tuple[Path, Path]:
    """shapes64 as img2dataset lays it out (tars of {key}.png + {key}.txt) plus aligned
    embedding shards of random float16 rows (and, with `tokens` = (length, width), caption
    token encodings for a unet that reads them); reused when a complete copy is cached.

    Embedding values do not matter for memory or speed, so no CLIP is run. complete.json is
    written last: a set without it was cut short and is rebuilt.
    """
    import io
    import shutil
    import tarfile

    import numpy as np
    from PIL import Image

    from dalle2.data.shapes64 import all_specs, render
    from dalle2.data.shards import write_embedding_shard

    tag = f"-t{tokens[0]}x{tokens[1]}" if tokens else ""
    out = root / f"shapes64-{images}-{image_size}px-per{shard_size}-e{embed_dim}{tag}"
    shard_dir, emb_dir = out / "shards", out / "embeddings"
    if (out / "complete.json").is_file():
        return shard_dir, emb_dir
    shutil.rmtree(out, ignore_errors=True)
    shard_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    specs, rng, order = all_specs(), np.random.default_rng(0), []
    for s, first in enumerate(range(0, images, shard_size)):
        keys, captions = [], []
        with tarfile.open(shard_dir / f"{s:05d}.tar", "w") as tar:
            for i in range(min(shard_size, images - first)):
                if not order:  # every caption equally often, as synthetic.generate does
                    order = rng.permutation(len(specs)).tolist()
                spec = specs[order.pop()]
                png = io.BytesIO()
                Image.fromarray(render(spec, rng, image_size)).save(png, format="PNG")
                key = f"{s:05d}{i:04d}"  # img2dataset's key: shard and index in shard
                for ext, blob in (("png", png.getvalue()), ("txt", spec.caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
                keys.append(key)
                captions.append(spec.caption)
        rows = {
            name: rng.standard_normal((len(keys), embed_dim)).astype(np.float16)
            for name in ("image_embed", "text_embed")
        }
        if tokens:
            shape = (len(keys), *tokens)
            rows["text_tokens"] = rng.standard_normal(shape).astype(np.float16)
            rows["text_mask"] = np.ones(shape[:2], bool)
        write_embedding_shard(emb_dir, f"{s:05d}", keys, captions, rows)
    (out / "complete.json").write_text(json.dumps({"images": images, "shard_size": shard_size}))
    print(f"  built {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return shard_dir, emb_dir


# ============================================================================ child side


@dataclass
class Windows:
    """A metrics callback keeping the samples/s of each window Trainer.fit reports.

    `rate()` skips the first `skip` windows (loader start, first slow steps). Windows hold
    equal step counts, so the harmonic mean of their rates is total samples / total time.
    """

    skip: int
    rates: list[float] = field(default_factory=list)

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.rates.append(metrics["samples_per_s"])

    def rate(self) -> float:
        kept = self.rates[self.skip :]
        return len(kept) / sum(1 / r for r in kept) if kept else float("nan")


def _bench_config(spec: dict[str, Any], steps: int, processes: int = 1) -> UnclipConfig:
    """The configured run with the base unet set to `steps` steps, no clock cap, on CPU."""
    from dalle2.config import load_config, parse_config

    raw = load_config(spec["config"]).model_dump(mode="json")
    raw.update(device="cpu", progress=False)
    train = raw["decoder"][0]["train"]
    train.update(
        steps=steps, log_every=spec["log_every"], max_minutes=None, num_processes=processes
    )
    if spec["batch"]:
        train["batch_size"] = spec["batch"]
    return parse_config(raw)


def _timed_steps(spec: dict[str, Any]) -> int:
    return spec["log_every"] * (spec["warmup_windows"] + spec["windows"])


def _children() -> list[int]:
    pids = []
    for f in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        with contextlib.suppress(OSError):  # the thread ended
            pids += [int(p) for p in f.read_text().split()]
    return pids


def _hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):  # gone, or a zombie
        pass
    return 0


class ChildPeak:
    """Peak RSS (VmHWM) of this process's children, here the DataLoader worker, read from
    /proc by a thread while they run (Linux only; elsewhere None).

    RUSAGE_CHILDREN would not do: it also counts helpers started at import (ctypes runs
    ldconfig, forked from a ~430 MiB process), and that would hide the worker's figure.
    """

    def __init__(self, every_s: float = 0.1) -> None:
        self.every_s = every_s
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while True:
            for pid in _children():
                self.peak_kib = max(self.peak_kib, _hwm_kib(pid))
            if self._stop.wait(self.every_s):
                return

    def __enter__(self) -> ChildPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mib(self) -> float | None:
        return self.peak_kib / 1024 or None


def _load_in_memory(
    shard_dir: Path, emb_dir: Path, data: DataConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-streaming path's data: every training image decoded into one uint8
    (N, H, W, 3) tensor, and its image embedding into an (N, E) tensor."""
    import numpy as np
    import torch

    from dalle2.data import shards as D

    images, embeds = [], []
    holdout = D.Holdout.of(data)
    for tar in D.shard_paths(shard_dir):
        _, _, arrays = D.read_embedding_shard(emb_dir, tar.stem)
        for i, raw in enumerate(D.tar_samples(tar)):
            if holdout.keeps("train", raw["__key__"], D.caption_of(raw)):
                images.append(D.decode_image(raw))
                embeds.append(arrays["image_embed"][i])
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(embeds))


def _fit_in_memory(
    cfg: UnclipConfig, images: torch.Tensor, embeds: torch.Tensor, callback: Windows | None
) -> TrainResult:
    """Trainer.fit on random index batches of in-memory tensors, in this process, as before
    streaming; same seed, model, loss and input conversion as fit_decoder_stage."""
    import numpy as np
    import torch

    from dalle2.decoder import DecoderStage
    from dalle2.recipes.decoder import model_inputs  # the very conversion the stream applies
    from dalle2.training.fit import seed_everything
    from dalle2.training.trainer import Trainer

    s = cfg.decoder[0]
    seed_everything(s.train.seed)
    stage = DecoderStage(s)
    rng = np.random.default_rng(s.train.seed)
    size = s.train.batch_size
    gen = torch.Generator().manual_seed(s.train.seed)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        while True:  # shuffled epochs; the last short batch of each is dropped
            order = torch.from_numpy(rng.permutation(len(images)))
            for start in range(0, len(order) - size + 1, size):
                i = order[start : start + size]
                yield model_inputs({"image": images[i], "image_embed": embeds[i]}, gen)

    def loss_fn(model: torch.nn.Module, b: dict[str, Any]) -> torch.Tensor:
        return model(b["image"], b["image_embed"])

    trainer = Trainer(
        stage, s.train, loss_fn, device=torch.device("cpu"), callback=callback, progress=False
    )
    return trainer.fit(batches())


def _fit_streaming(
    cfg: UnclipConfig, shard_dir: Path, emb_dir: Path, callback: Windows | None
) -> TrainResult:
    """The streaming path: the stage's own recipe, in this process."""
    import torch

    from dalle2.recipes.decoder import fit_decoder_stage
    from dalle2.training.fit import Run

    run = Run(torch.device("cpu"), None, callback, False)
    _, result = fit_decoder_stage(cfg.decoder[0], 0, cfg.data, shard_dir, emb_dir, run)
    return result


def _child_rss(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of one fresh process training `rss_steps` steps on one shard set."""
    cfg = _bench_config(spec, spec["rss_steps"])
    shard_dir, emb_dir = Path(spec["shard_dir"]), Path(spec["emb_dir"])
    load_s = 0.0
    with ChildPeak() as workers:
        if spec["path"] == "stream":
            result = _fit_streaming(cfg, shard_dir, emb_dir, None)
        else:
            t0 = time.perf_counter()
            images, embeds = _load_in_memory(shard_dir, emb_dir, cfg.data)
            load_s = time.perf_counter() - t0
            result = _fit_in_memory(cfg, images, embeds, None)
    return {
        "peak_mib": peak_rss_mib(),
        "worker_peak_mib": workers.mib,  # None: no loader worker
        "steps": result.steps,
        "load_s": load_s,
    }


def _flops_per_sample(cfg: UnclipConfig) -> float:
    """FLOPs of one training forward + backward of the base unet's loss, per sample."""
    import torch

    from dalle2.decoder import DecoderStage

    s = cfg.decoder[0]
    b, size = s.train.batch_size, cfg.data.image_size
    stage = DecoderStage(s).train()
    images = torch.rand(b, 3, size, size) * 2 - 1  # loaded size: the loss resizes
    embed = torch.randn(b, s.unet.image_embed_dim)
    return flops(lambda: stage(images, embed)) / b


def _sgemm_gflops(threads: int, n: int, seconds: float) -> float:
    """The fp32 matmul peak on `threads` threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return matmul_peak(torch.device("cpu"), torch.float32, seconds, n)
    finally:
        torch.set_num_threads(before)


def _log(text: str) -> None:
    print(f"    {text}", file=sys.stderr, flush=True)


def _speed_b(spec: dict[str, Any], shard_dir: Path, emb_dir: Path) -> dict[str, list[float]]:
    """samples/s streaming vs in-memory, alternating (S M, M S, ...) so drift cancels."""
    cfg = _bench_config(spec, _timed_steps(spec))
    images, embeds = _load_in_memory(shard_dir, emb_dir, cfg.data)
    rates: dict[str, list[float]] = {"stream": [], "memory": []}
    for r in range(spec["rounds"]):
        for path in ("stream", "memory") if r % 2 == 0 else ("memory", "stream"):
            windows = Windows(skip=spec["warmup_windows"])
            if path == "stream":
                _fit_streaming(cfg, shard_dir, emb_dir, windows)
            else:
                _fit_in_memory(cfg, images, embeds, windows)
            rates[path].append(windows.rate())
            _log(f"b round {r + 1} {path:<6} {windows.rate():7.2f} samples/s")
    return rates


def _speed_c(spec: dict[str, Any], shard_dir: Path, emb_dir: Path) -> dict[str, Any]:
    """samples/s through train_stage on 1 process (all threads, 1 thread) and 2 processes."""
    import torch

    from dalle2.recipes.decoder import RECIPE
    from dalle2.recipes.launch import train_stage
    from dalle2.recipes.stage import StageInputs

    cores = torch.get_num_threads()
    half = max(1, cores // 2)  # 2 processes x half the threads use what 1 process does
    runs = list(dict.fromkeys([(1, cores), (1, 1), (2, half)]))
    inputs = StageInputs(Path(shard_dir), Path(emb_dir), 0)
    out: dict[str, Any] = {"runs": {}, "cores": cores}
    for r in range(spec["rounds"]):
        for procs, threads in runs if r % 2 == 0 else runs[::-1]:
            cfg = _bench_config(spec, _timed_steps(spec), processes=procs)
            windows = Windows(skip=spec["warmup_windows"])
            if procs == 1:
                torch.set_num_threads(threads)
            else:  # torchrun passes it on to its processes
                os.environ["OMP_NUM_THREADS"] = str(threads)
            try:
                _, result = train_stage(
                    RECIPE,
                    cfg.decoder[0],
                    cfg.data,
                    inputs,
                    device=torch.device("cpu"),
                    callback=windows,
                    progress=False,
                )
            finally:
                torch.set_num_threads(cores)
                os.environ.pop("OMP_NUM_THREADS", None)
            run = out["runs"].setdefault(f"{procs}x{threads}", {"rate": [], "fit_rate": []})
            run["rate"].append(windows.rate())
            run["fit_rate"].append(result.samples_per_s)  # whole fit, warm-up included
            _log(f"c round {r + 1} {procs} proc x {threads} thr {windows.rate():7.2f} samples/s")
    cfg = _bench_config(spec, 1)
    out["flops_per_sample"] = _flops_per_sample(cfg)
    out["peak_gflops"] = {
        t: _sgemm_gflops(t, spec["gemm_n"], spec["gemm_s"]) for t in sorted({1, half, cores})
    }
    return out


def _child_speed(spec: dict[str, Any]) -> dict[str, Any]:
    shard_dir, emb_dir = Path(spec["shard_dir"]), Path(spec["emb_dir"])
    out: dict[str, Any] = {}
    if "b" in spec["parts"]:
        out["b"] = _speed_b(spec, shard_dir, emb_dir)
    if "c" in spec["parts"]:
        out["c"] = _speed_c(spec, shard_dir, emb_dir)
    return out


def child_main(spec_json: str) -> None:
    """One measurement in a fresh process; prints one JSON line."""
    spec = json.loads(spec_json)
    sys.path.insert(0, str(ROOT))
    import torch

    torch.manual_seed(0)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    out = _child_rss(spec) if spec["kind"] == "rss" else _child_speed(spec)
    out.update(torch=torch.__version__, threads=torch.get_num_threads())
    print(json.dumps(out), flush=True)


# ============================================================================ parent side


def _run_child(spec: dict[str, Any], timeout: float | None) -> tuple[dict[str, Any] | None, str]:
    """Run one child in its own process group (torchrun's processes included), so that a
    timeout or Ctrl-C ends all of them; its stderr (progress lines) passes through."""
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except BaseException as err:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if isinstance(err, subprocess.TimeoutExpired):
            return None, f"timed out after {timeout:.0f} s"
        raise
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return None, f"exit code {proc.returncode} (its errors are printed above)"
    return json.loads(lines[-1]), ""


def _ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}x" if num and den else "n/a"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _rows_a(results: dict[str, Any], sizes: tuple[int, int]) -> list[tuple[str, ...]]:
    """Rows: (figure, value(s), ratio, % of peak, target)."""
    small, large = (f"{n:,}" for n in sizes)
    rows: list[tuple[str, ...]] = []
    cases: list[tuple[str, str, str, str]] = [
        ("stream", "peak_mib", "training process, streaming", "<= 1.15"),
        ("stream", "worker_peak_mib", "largest loader worker, streaming", "<= 1.15"),
        ("memory", "peak_mib", "in-memory batches (pre-streaming path)", "contrast"),
    ]
    for path, key, label, target in cases:
        lo, hi = (results.get(f"{path}/{n}") for n in sizes)
        if lo is None and hi is None:
            continue
        a, b = (None if r is None else r[key] for r in (lo, hi))
        if a is None and b is None:  # no loader workers: reading is in the training process
            continue
        value = f"{_mib(a)} -> {_mib(b)}"
        label = f"a. peak RSS MiB, {label}, {small} -> {large} images"
        rows.append((label, value, _ratio(b, a), "", target))
    return rows


def _rows_b(res: dict[str, list[float]]) -> list[tuple[str, ...]]:
    stream, memory = _mean(res["stream"]), _mean(res["memory"])
    value = f"{stream:.2f} vs {memory:.2f}"
    label = "b. train samples/s, streaming vs in-memory batches"
    return [(label, value, _ratio(stream, memory), "", ">= 0.95")]


def _rows_c(res: dict[str, Any]) -> list[tuple[str, ...]]:
    flops, peaks = res["flops_per_sample"], {int(k): v for k, v in res["peak_gflops"].items()}
    cores = res["cores"]
    base = _mean(res["runs"][f"1x{cores}"]["rate"])
    rows: list[tuple[str, ...]] = []
    for name, run in res["runs"].items():
        procs, threads = (int(x) for x in name.split("x"))
        rate, fit_rate = _mean(run["rate"]), _mean(run["fit_rate"])
        gflops = rate * flops / 1e9
        # the most these processes could do: each at the sgemm rate of its thread count
        peak = procs * peaks[threads]
        label = f"c. train samples/s, {procs} process{'es' if procs > 1 else ''} x {threads} thr"
        value = f"{rate:.2f} ({fit_rate:.2f} whole fit) = {gflops:.1f} GFLOP/s"
        share = f"{100 * gflops / peak:.0f}% of {peak:.0f}"
        rows.append((label, value, _ratio(rate, base), share, "vs 1 process x all threads"))
    rows.append(("c. GFLOP per sample (train fwd + bwd)", f"{flops / 1e9:.3f}", "", "", ""))
    peak = "; ".join(f"{t} thr {g:.1f}" for t, g in sorted(peaks.items()))
    rows.append(("c. fp32 sgemm peak GFLOP/s", peak, "", "", ""))
    return rows


def _machine() -> str:
    torch, python = importlib.metadata.version("torch"), platform.python_version()
    return f"CPU {cpu_name()}, {os.cpu_count()} logical cores, torch {torch}, Python {python}"


def _report_child(label: str, spec: dict[str, Any], timeout: float | None) -> dict[str, Any] | None:
    """Run one child and print one line on how it went."""
    t0 = time.perf_counter()
    print(f"  {label} ...", flush=True)
    res, err = _run_child(spec, timeout)
    took = time.perf_counter() - t0
    print(f"  {label}: {'done' if res else 'FAILED: ' + err} in {took:.0f} s", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script")
    parser.add_argument(
        "--only", action="append", choices=PARTS, help="run only this part (repeatable)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=ROOT.parent / "bench-cache",
        help="where shard sets are built and cached (default ../bench-cache)",
    )
    parser.add_argument(
        "--config", type=Path, default=ROOT / "zenml_config.yaml", help="run config to read"
    )
    parser.add_argument("--rounds", type=int, help="times b and c alternate their runs")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads per training process (default: torch's choice, one per core; c "
        "then compares 1 process on these, on 1, and 2 processes on half); 1 avoids "
        "OpenMP barrier stalls when other work keeps a core busy",
    )
    parser.add_argument("--timeout", type=float, help="seconds allowed per child process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    # SIGTERM becomes SystemExit, so _run_child ends the running child's process group
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    sys.path.insert(0, str(ROOT))
    from dalle2.config import load_config

    sizes: dict[str, Any] = QUICK if args.quick else FULL
    parts = [p for p in PARTS if not args.only or p in args.only]
    cfg = load_config(args.config)
    base = cfg.decoder[0]
    print(
        f"# bench_scale ({'quick' if args.quick else 'full'}): base unet decoder[0] of "
        f"{args.config.name} ({base.image_size} px, dim {base.unet.dim}, batch "
        f"{sizes['batch'] or base.train.batch_size}), fp32 on CPU; {_machine()}",
        flush=True,
    )
    needed = sizes["images"] if "a" in parts else sizes["images"][:1]
    sets = {
        n: build_shard_set(
            args.workdir,
            n,
            sizes["shard_size"],
            base.unet.image_embed_dim,
            cfg.data.image_size,
            (cfg.clip.tower.context_length, base.unet.text_token_dim)
            if base.unet.text_token_dim
            else None,
        )
        for n in needed
    }
    common = {k: v for k, v in sizes.items() if k != "images"}
    common.update(config=str(args.config.resolve()), threads=args.threads)
    if args.rounds is not None:
        common["rounds"] = max(1, args.rounds)

    def on(n: int) -> dict[str, str]:
        return {"shard_dir": str(sets[n][0]), "emb_dir": str(sets[n][1])}

    rows: list[tuple[str, ...]] = []
    failed = False
    if "a" in parts:
        rss: dict[str, Any] = {}
        for path in ("stream", "memory") if sizes["rss_contrast"] else ("stream",):
            for n in sizes["images"]:
                spec = {**common, **on(n), "kind": "rss", "path": path}
                res = _report_child(f"a {path} {n:,} images", spec, args.timeout)
                rss[f"{path}/{n}"] = res
                failed |= res is None
        rows += _rows_a(rss, sizes["images"])
    speed_parts = [p for p in parts if p in ("b", "c")]
    if speed_parts:
        spec = {**common, **on(sizes["images"][0]), "kind": "speed", "parts": speed_parts}
        res = _report_child(f"{' and '.join(speed_parts)}", spec, args.timeout)
        failed |= res is None
        if res and "b" in res:
            rows += _rows_b(res["b"])
        if res and "c" in res:
            rows += _rows_c(res["c"])

    print()
    print(markdown(("figure", "value(s)", "ratio", "% of peak", "target"), rows))
    print(
        "\nratio: a. 40k / 4k peak RSS (large / small set); b. streaming / in-memory; "
        "c. samples/s / that of 1 process on all threads. samples/s: Trainer.fit's metrics "
        "windows after the warm-up ones (in brackets: its whole-fit figure); GFLOP/s: FLOPs "
        "per sample (FlopCounterMode) x samples/s; % of peak: against processes x the best fp32 "
        f"sgemm GFLOP/s of one process on that many threads.\n{_machine()}"
    )
    if args.quick:
        print("--quick shrinks every size: it checks the script, its figures mean nothing.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
