"""train.compile off against on, per model of a config, in one run.

For the base unet, the prior and CLIP of the default config (or `--config`), on random
batches of the pipeline's shapes, through the project's Trainer: samples/s with
torch.compile off and on, GFLOP/s and its share of the fp32 (CPU) or bf16 (CUDA) matmul
peak measured in the same run, and the compile time (the first steps' extra seconds). Off
and on alternate over `--rounds`, best of each kept, so a host's drift hits both alike.

    .venv/bin/python benchmarks/compile.py                 # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/compile.py --quick         # a smoke run in about a minute
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import (
    default_config,
    flops_per_sample,
    machine,
    markdown,
    matmul_peak,
    time_training,
    training_case,
    write_json,
)

MODELS = {"decoder.0": "base unet", "prior": "prior", "clip": "CLIP"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="zenml_config.yaml")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", action="append", choices=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="tiny batches, few steps")
    parser.add_argument("--json", default=".cache/bench/compile.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = default_config(args.config)
    steps, rounds = (4, 1) if args.quick else (args.steps, args.rounds)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(device, dtype, seconds=0.5 if args.quick else 3.0)
    print(f"{machine(device)}; {dtype} matmul peak {peak:.0f} GFLOP/s", flush=True)

    figures: dict = {"machine": machine(device), "peak_gflops": peak, "models": {}}
    rows = []
    for which in args.only or list(MODELS):
        model, loss_fn, batch, train = training_case(cfg, which)
        if args.quick:
            batch = {k: v[:4] for k, v in batch.items()}
        b = next(iter(batch.values())).shape[0]
        per_sample = flops_per_sample(model, loss_fn, batch)
        best: dict[str, dict[str, float]] = {}
        for _ in range(rounds):
            for setting in ("off", "on"):
                torch._dynamo.reset()
                model, loss_fn, batch, train = training_case(cfg, which, b)
                train = train.model_copy(update={"compile": setting, "warmup_steps": 0})
                got = time_training(model, loss_fn, batch, train, device, steps)
                print(f"{which} compile={setting}: {got}", flush=True)
                cold = best.get(setting, got)["warmup_s"]  # the first round's: no compile cache
                if got["samples_per_s"] > best.get(setting, {}).get("samples_per_s", 0):
                    best[setting] = got
                best[setting]["warmup_s"] = cold
        off, on = best["off"], best["on"]
        for setting, got in best.items():
            gflops = per_sample * got["samples_per_s"] / 1e9
            rows.append(
                (
                    MODELS[which],
                    setting,
                    f"{got['samples_per_s']:.1f}",
                    f"{gflops:.1f}",
                    f"{100 * gflops / peak:.0f}%",
                    f"{got['warmup_s'] - off['warmup_s']:.1f}" if setting == "on" else "-",
                )
            )
        ratio = on["samples_per_s"] / off["samples_per_s"]
        figures["models"][which] = {"gflop_per_sample": per_sample / 1e9, "on_over_off": ratio}
        figures["models"][which] |= best
        print(f"{which}: compiled / eager samples/s = {ratio:.2f}x", flush=True)
    header = ("model", "compile", "samples/s", "GFLOP/s", "of peak", "compile s")
    print(markdown(header, rows))
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
