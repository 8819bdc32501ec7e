"""The first figures a GPU owner asks for, in one command and under 8 minutes on one GPU.

- bf16 training samples/s and share of the bf16 matmul peak (measured in the same run) for
  the real-data preset's base unet, upsampler and prior at their real sizes, one process's
  share of the batch, through the project's Trainer (train.compile as the preset says);
- the embedding step's images/s with a ViT-B-32-sized open_clip tower (random weights);
- the base unet's sampling images/s with the preset's sampler;
- a 1-process torchrun run of a tiny prior, through the pipeline's own launcher.

Everything printed is also written to `--json`. Without a GPU it stops in one sentence;
`--smoke` runs the same code on CPU with the default config's small models (the suite
does). Each part past `--budget-s` is skipped and marked so, rather than overrunning.

    .venv/bin/python benchmarks/gpu_check.py                 # on a GPU machine
    .venv/bin/python benchmarks/gpu_check.py --smoke         # CPU, about a minute
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from _common import (
    ROOT,
    default_config,
    flops_per_sample,
    machine,
    markdown,
    matmul_peak,
    sync,
    time_training,
    training_case,
    write_json,
)

from dalle2.config import DataConfig, PriorConfig, UnclipConfig
from dalle2.training.trainer import compile_on


def _training(cfg: UnclipConfig, device: torch.device, smoke: bool, peak: float) -> list[dict]:
    rows = []
    stages = [f"decoder.{i}" for i in range(len(cfg.decoder))] + ["prior"]
    for which in stages:
        train_of = cfg.prior.train if which == "prior" else cfg.decoder[int(which[-1])].train
        per_process = 4 if smoke else train_of.batch_size // train_of.num_processes
        model, loss_fn, batch, train = training_case(cfg, which, per_process)
        per_sample = flops_per_sample(model, loss_fn, batch)
        precision = "fp32" if smoke else "bf16"
        train = train.model_copy(update={"precision": precision, "num_processes": 1})
        got = time_training(model, loss_fn, batch, train, device, steps=3 if smoke else 30)
        gflops = per_sample * got["samples_per_s"] / 1e9
        rows.append(
            {
                "model": which,
                "batch": per_process,
                "compiled": compile_on(train.compile, device),
                "samples_per_s": got["samples_per_s"],
                "warmup_s": got["warmup_s"],
                "gflop_per_sample": per_sample / 1e9,
                "of_peak": gflops / peak,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _embedding(device: torch.device, smoke: bool) -> dict:
    """compute_clip_embeddings' image side: a ViT-B-32 of random weights, 224 px, bf16."""
    import open_clip

    name, size, batch = "ViT-B-32", 224, 2 if smoke else 256
    model = open_clip.create_model(name, pretrained=None).to(device).eval()
    images = torch.rand(batch, 3, size, size, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=not smoke):
        model.encode_image(images)  # warm-up
        sync(device)
        t0, rounds = time.perf_counter(), 2 if smoke else 10
        for _ in range(rounds):
            model.encode_image(images)
        sync(device)
    return {
        "model": name,
        "image_size": size,
        "images_per_s": batch * rounds / (time.perf_counter() - t0),
    }


def _sampling(cfg: UnclipConfig, device: torch.device, smoke: bool) -> dict:
    """The base unet sampling from image embeddings with the preset's sampler and steps,
    timed after a 2-step warm-up."""
    from dalle2.decoder import DecoderStage

    s = cfg.decoder[0]
    stage = DecoderStage(s).to(device).eval()
    b = 2 if smoke else 32
    embed = torch.randn(b, s.unet.image_embed_dim, device=device)
    sample = s.sample.model_copy(update={"steps": 2}) if smoke else s.sample
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=not smoke):
        # warm-up: cuDNN's algorithm search and the allocator's first blocks, not sampling
        stage.sample(embed, cfg=sample.model_copy(update={"steps": 2}))
        sync(device)
        t0 = time.perf_counter()
        stage.sample(embed, cfg=sample)
        sync(device)
    seconds = time.perf_counter() - t0
    return {
        "sampler": sample.sampler,
        "steps": sample.steps,
        "batch": b,
        "images_per_s": b / seconds,
    }


def _torchrun(device: torch.device, timeout: float) -> dict:
    """A tiny prior on 1 torchrun process through dalle2.recipes.launch's worker."""
    from dalle2.data.shards import write_embedding_shard
    from dalle2.recipes.launch import torchrun_command, write_job
    from dalle2.recipes.prior import RECIPE
    from dalle2.recipes.stage import StageInputs

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        job, emb = Path(tmp) / "job", Path(tmp) / "emb"
        job.mkdir()
        rng = np.random.default_rng(0)
        for s in range(2):
            keys = [f"{s:05d}{i:04d}" for i in range(64)]
            rows = rng.standard_normal((64, 16)).astype(np.float16)
            arrays = {"image_embed": rows, "text_embed": rows}
            write_embedding_shard(emb, f"{s:05d}", keys, [f"c{k}" for k in keys], arrays)
        prior = PriorConfig.model_validate(
            {
                "net": {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "embed_dim": 16},
                "train": {"steps": 20, "batch_size": 16, "warmup_steps": 2},
            }
        )
        data = DataConfig(holdout_fraction=0.0, loader_workers=0)
        write_job(job, RECIPE, prior, data, StageInputs(emb_dir=emb), device, progress=False)
        t0 = time.perf_counter()
        done = subprocess.run(
            torchrun_command(1, job), cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
        ok = done.returncode == 0 and (job / "result.json").is_file()
        result = json.loads((job / "result.json").read_text()) if ok else {}
        return {
            "ok": ok,
            "seconds": time.perf_counter() - t0,
            "steps": result.get("steps"),
            "error": "" if ok else done.stderr.strip().splitlines()[-1:],
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/real-vitb32.yaml")
    parser.add_argument("--smoke", action="store_true", help="CPU, the default's small models")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--json", default=".cache/bench/gpu_check.json")
    args = parser.parse_args(argv)
    if args.smoke:
        device, cfg = torch.device("cpu"), default_config()
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible here; run it on a GPU machine, or --smoke")
        return 2
    else:
        device, cfg = torch.device("cuda"), default_config(ROOT / args.config)
    start = time.perf_counter()
    dtype = torch.float32 if args.smoke else torch.bfloat16
    peak = matmul_peak(device, dtype, seconds=0.3 if args.smoke else 3.0)
    figures: dict = {
        "machine": machine(device),
        "torch": torch.__version__,
        "config": "zenml_config.yaml" if args.smoke else args.config,
        "peak_gflops": peak,
        "peak_dtype": str(dtype),
    }
    print(f"{figures['machine']}: {dtype} matmul peak {peak:.0f} GFLOP/s", flush=True)
    parts = {
        "training": lambda: _training(cfg, device, args.smoke, peak),
        "embedding": lambda: _embedding(device, args.smoke),
        "sampling": lambda: _sampling(cfg, device, args.smoke),
        "torchrun": lambda: _torchrun(device, timeout=max(60.0, args.budget_s / 3)),
    }
    for name, part in parts.items():
        if time.perf_counter() - start > args.budget_s:
            figures[name] = "skipped: over --budget-s"
            continue
        figures[name] = part()
        print(f"{name}: {json.dumps(figures[name])}", flush=True)
    figures["seconds"] = time.perf_counter() - start
    rows = (
        [
            (r["model"], r["batch"], f"{r['samples_per_s']:.1f}", f"{100 * r['of_peak']:.0f}%")
            for r in figures["training"]
        ]
        if isinstance(figures["training"], list)
        else []
    )
    print(markdown(("model", "batch / process", "train samples/s", "of peak"), rows))
    write_json(args.json, figures)
    ok = isinstance(figures["torchrun"], dict) and figures["torchrun"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
