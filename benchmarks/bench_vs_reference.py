"""Side-by-side speed and memory of our unCLIP against lucidrains' dalle2-pytorch 1.15.6.

Why a separate script: the two libraries need different environments (the reference pins
its own dependency set), and memory figures are only comparable when each side runs in a
fresh process. So the parent starts one child per (config, side), each with its own Python,
each child prints one JSON line of figures, and the parent prints a markdown table. Each
child also counts its training FLOPs per sample, so that the table can split a training
speed-up into a smaller network (fewer FLOPs per sample) and faster code (more FLOP/s).

    python benchmarks/bench_vs_reference.py --quick        # smoke run, < 2 minutes
    python benchmarks/bench_vs_reference.py                # the issue's configs
    python benchmarks/bench_vs_reference.py --only decoder --steps 5
    nice -n 19 python benchmarks/bench_vs_reference.py --quick --threads 1   # on a busy box

The reference environment is any Python with `dalle2-pytorch==1.15.6` installed, e.g.
`python -m venv ../refenv && ../refenv/bin/pip install dalle2-pytorch==1.15.6`; point
`--ref-python` at it. Both sides train in fp32 on CPU (CPUs without bf16 instructions
emulate it ~50x slower) and under autocast (bf16, else fp16 with loss scaling) on CUDA.

This module is also imported by the children (see CHILD_BOOT), so its top level uses only
the standard library: torch and the libraries under test are imported inside functions.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import cpu_name, flops, markdown, peak_rss_mib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASES = ("prior", "prior_tokens", "decoder")
SIDES = ("ours", "reference")

# A child imports this very file and runs child_main; argv: [benchmarks dir, project root, spec].
CHILD_BOOT = (
    "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
    "import bench_vs_reference as b; b.child_main(sys.argv[3])"
)

# The configs. Sampling: prior DDIM 64 at batch 16; decoder DDIM 50 at batch 4, and
# ours also with DPM-Solver++(2M) at 25 steps as the "fast solver".
FULL: dict[str, Any] = {
    "prior": {
        "dim": 512,
        "depth": 6,
        "heads": 8,
        "dim_head": 64,
        "timesteps": 1000,
        "batch": 64,
        "text_len": 77,
        "sample_batch": 16,
        "sample_steps": 64,
    },
    "decoder": {
        "dim": 64,
        "dim_mults": [1, 2, 4, 8],
        "cond_dim": 128,
        "embed_dim": 512,
        "image_size": 64,
        "timesteps": 1000,
        "batch": 16,
        "sample_batch": 4,
        "ddim_steps": 50,
        "fast_steps": 25,
    },
    "warmup": 1,
    "steps": 3,
}

# Every size shrunk so that all six children finish in well under two minutes on 2 cores;
# only good for checking that the script works, not for figures.
QUICK: dict[str, Any] = {
    "prior": {
        "dim": 64,
        "depth": 2,
        "heads": 2,
        "dim_head": 32,
        "timesteps": 1000,
        "batch": 8,
        "text_len": 16,
        "sample_batch": 4,
        "sample_steps": 8,
    },
    "decoder": {
        "dim": 16,
        "dim_mults": [1, 2],
        "cond_dim": 32,
        "embed_dim": 64,
        "image_size": 16,
        "timesteps": 1000,
        "batch": 2,
        "sample_batch": 2,
        "ddim_steps": 6,
        "fast_steps": 3,
    },
    "warmup": 1,
    "steps": 2,
}


# ============================================================================ child side


@dataclass
class Workload:
    """What one side exposes to the shared timing loop.

    `loss` runs one forward pass on a fixed batch; `samplers` maps a sampler name to
    (steps, fn) where fn(steps) draws one batch; `denoiser` is the network whose forward
    calls are counted during sampling, so that the table shows each side's real NFE.
    """

    params: int
    batch: int
    loss: Callable[[], Any]
    model: Any
    denoiser: Any
    samplers: dict[str, tuple[int, Callable[[int], Any]]] = field(default_factory=dict)


def _param_count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _ours_prior(spec: dict[str, Any], device: Any, tokens: bool) -> Workload:
    """Our DiffusionPrior; text tokens go in with an all-True mask when `tokens`.

    They enter as the reference's do, leading the causal sequence, unless
    `--prior-text-tokens context` makes them cross-attention keys and values instead.
    """
    import torch

    from dalle2.config import DiffusionConfig, PriorConfig, PriorNetConfig, SampleConfig
    from dalle2.prior import DiffusionPrior

    p = spec["prior"]
    cfg = PriorConfig(
        net=PriorNetConfig(
            dim=p["dim"],
            depth=p["depth"],
            heads=p["heads"],
            dim_head=p["dim_head"],
            embed_dim=p["dim"],
            text_token_dim=p["dim"] if tokens else None,
            max_text_len=p["text_len"],
            text_tokens_as=spec["prior_text_tokens"],
        ),
        diffusion=DiffusionConfig(num_steps=p["timesteps"], prediction="x0"),
        use_text_tokens=tokens,
    )
    prior = DiffusionPrior(cfg).to(device)
    b, sb, d, n = p["batch"], p["sample_batch"], p["dim"], p["text_len"]
    text, image = torch.randn(b, d, device=device), torch.randn(b, d, device=device)
    tok = torch.randn(b, n, d, device=device) if tokens else None
    mask = torch.ones(b, n, dtype=torch.bool, device=device) if tokens else None
    s_text = torch.randn(sb, d, device=device)
    s_tok = torch.randn(sb, n, d, device=device) if tokens else None
    s_mask = torch.ones(sb, n, dtype=torch.bool, device=device) if tokens else None

    def ddim(steps: int) -> Any:
        scfg = SampleConfig(sampler="ddim", steps=steps)
        return prior.sample(s_text, s_tok, s_mask, cfg=scfg, best_of=1)

    return Workload(
        params=_param_count(prior),
        batch=b,
        loss=lambda: prior.loss(text, image, text_tokens=tok, text_mask=mask),
        model=prior,
        denoiser=prior.net,
        samplers={"ddim": (p["sample_steps"], ddim)},
    )


def _ref_prior(spec: dict[str, Any], device: Any, tokens: bool) -> Workload:
    """Reference DiffusionPrior trained on precomputed embeddings (no CLIP attached).

    Its network always pads the text encodings to max_text_len with learned null tokens,
    even when conditioning on them is off, so we give it the same 77 as the token config.
    Sampling calls p_sample_loop directly: `sample()` needs a CLIP to embed raw text.
    """
    import torch
    from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork

    p = spec["prior"]
    net = DiffusionPriorNetwork(
        dim=p["dim"],
        depth=p["depth"],
        heads=p["heads"],
        dim_head=p["dim_head"],
        max_text_len=p["text_len"],
    )
    prior = DiffusionPrior(
        net=net,
        image_embed_dim=p["dim"],
        timesteps=p["timesteps"],
        cond_drop_prob=0.1,  # ours drops the text 10% of the time too
        condition_on_text_encodings=tokens,
    ).to(device)
    b, sb, d, n = p["batch"], p["sample_batch"], p["dim"], p["text_len"]
    text, image = torch.randn(b, d, device=device), torch.randn(b, d, device=device)
    tok = torch.randn(b, n, d, device=device) if tokens else None
    s_cond: dict[str, Any] = {"text_embed": torch.randn(sb, d, device=device)}
    if tokens:
        s_cond["text_encodings"] = torch.randn(sb, n, d, device=device)

    def loss() -> Any:
        # forward() scales image_embed in place, so it must get a fresh copy every step
        return prior(text_embed=text, image_embed=image.clone(), text_encodings=tok)

    def ddim(steps: int) -> Any:
        return prior.p_sample_loop((sb, d), text_cond=s_cond, timesteps=steps)

    return Workload(
        params=_param_count(prior),
        batch=b,
        loss=loss,
        model=prior,
        denoiser=prior.net,
        samplers={"ddim": (p["sample_steps"], ddim)},
    )


def _ours_decoder(spec: dict[str, Any], device: Any) -> Workload:
    """Our first decoder stage, self-attention at the lowest resolution level.

    The unet layout defaults to "efficient", the one the reference's Unet also has (down
    path one level narrower); `--unet-layout classic` measures our other layout.
    """
    import torch

    from dalle2.config import DecoderStageConfig, DiffusionConfig, SampleConfig, UNetConfig
    from dalle2.decoder import DecoderStage

    p = spec["decoder"]
    levels = len(p["dim_mults"])
    stage = DecoderStage(
        DecoderStageConfig(
            image_size=p["image_size"],
            unet=UNetConfig(
                dim=p["dim"],
                dim_mults=tuple(p["dim_mults"]),
                cond_dim=p["cond_dim"],
                image_embed_dim=p["embed_dim"],
                attn_levels=(levels - 1,),
                layout=spec["unet_layout"],
            ),
            diffusion=DiffusionConfig(num_steps=p["timesteps"]),
        )
    ).to(device)
    b, sb, s, e = p["batch"], p["sample_batch"], p["image_size"], p["embed_dim"]
    images = torch.rand(b, 3, s, s, device=device) * 2 - 1  # ours takes [-1, 1]
    embed = torch.randn(b, e, device=device)
    s_embed = torch.randn(sb, e, device=device)

    def sampler(name: str) -> Callable[[int], Any]:
        def run(steps: int) -> Any:
            return stage.sample(s_embed, cfg=SampleConfig(sampler=name, steps=steps))

        return run

    return Workload(
        params=_param_count(stage.unet),
        batch=b,
        loss=lambda: stage.loss(images, embed),
        model=stage,
        denoiser=stage.unet,
        samplers={
            "ddim": (p["ddim_steps"], sampler("ddim")),
            "dpmpp_2m": (p["fast_steps"], sampler("dpmpp_2m")),
        },
    )


def _ref_decoder(spec: dict[str, Any], device: Any) -> Workload:
    """Reference single-unet Decoder with the same widths and attention placement.

    learned_variance is turned off (its default is on for the first unet) so that both
    sides optimise the same simple eps objective; everything else is the reference default.
    """
    import torch
    from dalle2_pytorch import Decoder, Unet

    p = spec["decoder"]
    levels = len(p["dim_mults"])
    unet = Unet(
        dim=p["dim"],
        image_embed_dim=p["embed_dim"],
        cond_dim=p["cond_dim"],
        channels=3,
        dim_mults=tuple(p["dim_mults"]),
        self_attn=tuple(i == levels - 1 for i in range(levels)),
        cond_on_text_encodings=False,
    )
    decoder = Decoder(
        unet=unet,
        image_size=p["image_size"],
        timesteps=p["timesteps"],
        learned_variance=False,
    ).to(device)
    b, sb, s, e = p["batch"], p["sample_batch"], p["image_size"], p["embed_dim"]
    images = torch.rand(b, 3, s, s, device=device)  # the reference takes [0, 1]
    embed = torch.randn(b, e, device=device)
    s_embed = torch.randn(sb, e, device=device)

    def ddim(steps: int) -> Any:
        decoder.sample_timesteps = (steps,)  # fewer than `timesteps` selects its DDIM loop
        return decoder.sample(image_embed=s_embed, one_unet_in_gpu_at_time=False)

    return Workload(
        params=_param_count(decoder.unets[0]),  # Decoder rebuilt the unet we passed
        batch=b,
        loss=lambda: decoder(images, image_embed=embed),
        model=decoder,
        denoiser=decoder.unets[0],
        samplers={"ddim": (p["ddim_steps"], ddim)},
    )


def _count_calls(module: Any) -> list[int]:
    """Count forward calls through an instance-level wrapper: the reference calls
    `self.forward` directly inside forward_with_cond_scale, which skips module hooks."""
    counter = [0]
    inner = module.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return inner(*args, **kwargs)

    module.forward = counted
    return counter


def _mixed_dtype(device: Any) -> Any:
    """None (fp32) on CPU; on CUDA bf16 where supported, else fp16: what both sides'
    own trainers pick (our precision='auto', the reference's accelerate autocast)."""
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _measure(
    work: Workload, spec: dict[str, Any], device: Any, rss_import: float
) -> dict[str, Any]:
    """Time training steps and sampling on the same fixed inputs; data loading is excluded."""
    import contextlib

    import torch

    dtype = _mixed_dtype(device)

    def amp() -> contextlib.AbstractContextManager[Any]:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    params = [p for p in work.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def train_step() -> float:
        with amp():
            loss = work.loss()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    work.model.train()
    for _ in range(spec["warmup"]):
        train_step()
    sync()
    step_s, losses = [], []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        losses.append(train_step())
        sync()
        step_s.append(time.perf_counter() - t0)
    rss_train = peak_rss_mib()
    cuda_train = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None

    work.model.eval()
    calls = _count_calls(work.denoiser)
    sampling: dict[str, Any] = {}
    for name, (steps, fn) in work.samplers.items():
        with amp():
            fn(2)  # warm-up: first-call kernel/allocator setup is not sampling speed
            sync()
            calls[0] = 0
            t0 = time.perf_counter()
            fn(steps)
            sync()
        sampling[name] = {"steps": steps, "seconds": time.perf_counter() - t0, "nfe": calls[0]}

    total = sum(step_s)
    return {
        "params": work.params,
        "batch": work.batch,
        "train_step_s": step_s,
        "train_step_median_s": statistics.median(step_s),
        # median: one slow step (a late allocation, a noisy neighbour) should not set the figure
        "train_samples_per_s": work.batch / statistics.median(step_s),
        "train_samples_per_s_mean": work.batch * len(step_s) / total,
        "final_loss": losses[-1],
        "sampling": sampling,
        "rss_after_train_mib": rss_train,
        "rss_peak_mib": peak_rss_mib(),
        "rss_above_torch_mib": peak_rss_mib() - rss_import,
        "cuda_peak_train_mib": cuda_train,
    }


def _train_flops_per_sample(work: Workload) -> float:
    """FLOPs of one training forward + backward, per sample, as torch counts them (both
    sides under sdpa's math backend, fp32, outside autocast: see _common.flops)."""
    work.model.train()
    total = flops(work.loss)
    work.model.zero_grad(set_to_none=True)
    return total / work.batch


def child_main(spec_json: str) -> None:
    """Entry point of a child process: build one side's model, measure, print one JSON line."""
    spec = json.loads(spec_json)
    t_start = time.perf_counter()
    import torch

    torch.manual_seed(spec["seed"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rss_import = peak_rss_mib()  # baseline: torch alone, before either library is imported
    case, side = spec["case"], spec["side"]
    if side == "ours":
        if case == "decoder":
            work = _ours_decoder(spec, device)
        else:
            work = _ours_prior(spec, device, tokens=case == "prior_tokens")
        library = "dalle2 (this repo)"
    else:
        import importlib.metadata

        if case == "decoder":
            work = _ref_decoder(spec, device)
        else:
            work = _ref_prior(spec, device, tokens=case == "prior_tokens")
        library = f"dalle2-pytorch {importlib.metadata.version('dalle2-pytorch')}"
    out = _measure(work, spec, device, rss_import)
    # counted after the timed and memory figures, so that counting changes none of them
    flops = _train_flops_per_sample(work)
    out["train_gflop_per_sample"] = flops / 1e9
    out["train_gflops"] = flops * out["train_samples_per_s"] / 1e9
    dtype = _mixed_dtype(device)
    out.update(
        case=case,
        side=side,
        library=library,
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        precision="fp32" if dtype is None else str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        rss_after_import_mib=rss_import,
        wall_s=time.perf_counter() - t_start,
    )
    print(json.dumps(out), flush=True)


# ============================================================================ parent side


def _run_child(
    python: str, spec: dict[str, Any], timeout: float | None
) -> tuple[dict[str, Any] | None, str]:
    """Run one child; returns (figures or None, error text)."""
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    cmd = [python, "-c", CHILD_BOOT, str(HERE), str(ROOT), json.dumps(spec)]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    except OSError as err:
        return None, f"could not start {python}: {err}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return None, f"exit code {proc.returncode}:\n{tail}"
    return json.loads(lines[-1]), ""


def _ratio(num: float | None, den: float | None) -> str:
    if not num or not den:
        return "n/a"
    return f"{num / den:.2f}x"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _sample_cell(res: dict[str, Any] | None, name: str) -> tuple[float | None, str]:
    if res is None or name not in res["sampling"]:
        return None, "n/a"
    s = res["sampling"][name]
    return s["seconds"], f"{s['seconds']:.2f} ({s['nfe']} NFE)"


def _get(res: dict[str, Any] | None, key: str) -> float | None:
    return None if res is None else res.get(key)


def _rows(
    case: str, ours: dict[str, Any] | None, ref: dict[str, Any] | None, spec: dict[str, Any]
) -> list[tuple[str, ...]]:
    """Table rows (config, figure, ours, reference, ratio) of one config."""
    sizes = spec["decoder"] if case == "decoder" else spec["prior"]
    rows: list[tuple[str, ...]] = []

    def add(label: str, key: str, digits: int) -> None:
        o, r = _get(ours, key), _get(ref, key)
        rows.append((case, label, _fmt(o, digits), _fmt(r, digits), _ratio(o, r)))

    add(f"train samples/s (batch {sizes['batch']})", "train_samples_per_s", 2)
    sb = sizes["sample_batch"]
    o_s, o_cell = _sample_cell(ours, "ddim")
    r_s, r_cell = _sample_cell(ref, "ddim")
    steps = sizes["ddim_steps"] if case == "decoder" else sizes["sample_steps"]
    rows.append((case, f"sample s, DDIM {steps} (batch {sb})", o_cell, r_cell, _ratio(r_s, o_s)))
    if case == "decoder":
        f_s, f_cell = _sample_cell(ours, "dpmpp_2m")
        label = f"sample s, ours DPM++2M {sizes['fast_steps']} vs ref DDIM {steps}"
        rows.append((case, label, f_cell, r_cell, _ratio(r_s, f_s)))
    # samples/s ratio = GFLOP/s ratio / GFLOP-per-sample ratio: how much of the speed-up is
    # a smaller network (fewer FLOPs per sample) and how much is faster code (FLOP/s)
    add("train GFLOP/sample (fwd + bwd)", "train_gflop_per_sample", 3)
    add("train GFLOP/s achieved", "train_gflops", 2)
    o_f, r_f = _get(ours, "train_gflop_per_sample"), _get(ref, "train_gflop_per_sample")
    o_r, r_r = _get(ours, "train_gflops"), _get(ref, "train_gflops")
    if o_f and r_f and o_r and r_r:
        split = f"{r_f / o_f:.2f} x {o_r / r_r:.2f}"
        rows.append((case, "  train speed-up = fewer FLOPs x more FLOP/s", "", "", split))
    add("peak RSS MiB (train + sample)", "rss_peak_mib", 0)
    # the same minus what `import torch` alone costs: the part the library and model own
    add("  of which above `import torch`", "rss_above_torch_mib", 0)
    if _get(ours, "cuda_peak_train_mib") is not None or _get(ref, "cuda_peak_train_mib"):
        add("peak CUDA MiB (train)", "cuda_peak_train_mib", 0)
    add("parameters", "params", 0)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script")
    parser.add_argument(
        "--only", action="append", choices=CASES, help="run only this config (repeatable)"
    )
    parser.add_argument("--steps", type=int, help="timed training steps per side")
    parser.add_argument("--warmup", type=int, help="untimed training steps before timing")
    default_ours = ROOT / ".venv" / "bin" / "python"
    parser.add_argument(
        "--ours-python",
        default=str(default_ours) if default_ours.exists() else sys.executable,
        help="Python that can import dalle2 (default: the project's .venv)",
    )
    parser.add_argument(
        "--ref-python",
        default=os.environ.get("DALLE2_REF_PYTHON", str(ROOT.parent / "refenv/bin/python")),
        help="Python with dalle2-pytorch==1.15.6 (default: $DALLE2_REF_PYTHON or ../refenv)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads in both children (default: torch's choice, all cores); "
        "1 avoids OpenMP barrier stalls when the machine is busy with other work",
    )
    parser.add_argument(
        "--unet-layout",
        choices=("efficient", "classic"),
        default="efficient",
        help="our decoder unet's layout (the reference's Unet is built like 'efficient')",
    )
    parser.add_argument(
        "--prior-text-tokens",
        choices=("sequence", "context"),
        default="sequence",
        help="how our prior takes text tokens: in its causal sequence as the reference does, "
        "or as cross-attention context",
    )
    parser.add_argument("--timeout", type=float, help="seconds allowed per child")
    parser.add_argument("--json", type=Path, help="also write every child's figures here")
    args = parser.parse_args(argv)
    # SIGTERM (e.g. from `timeout`) becomes SystemExit, so subprocess.run kills the running
    # child on the way out instead of leaving it to burn the CPU on its own
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    spec: dict[str, Any] = json.loads(json.dumps(QUICK if args.quick else FULL))
    spec["seed"] = 0
    spec["threads"] = args.threads
    spec["unet_layout"] = args.unet_layout
    spec["prior_text_tokens"] = args.prior_text_tokens
    if args.steps is not None:
        spec["steps"] = max(1, args.steps)
    if args.warmup is not None:
        spec["warmup"] = max(0, args.warmup)
    cases = [c for c in CASES if not args.only or c in args.only]
    pythons = {"ours": args.ours_python, "reference": args.ref_python}

    print(
        f"# ours vs dalle2-pytorch ({'quick' if args.quick else 'full'} mode): "
        f"{spec['warmup']} warm-up + {spec['steps']} timed training steps per side "
        f"(samples/s from the median step); our unet layout {spec['unet_layout']}, "
        f"prior text tokens as {spec['prior_text_tokens']}; "
        f"CPU {cpu_name()}, {os.cpu_count()} logical cores",
        flush=True,
    )
    results: dict[str, dict[str, Any] | None] = {}
    failed = False
    for case in cases:
        for side in ("reference", "ours"):
            t0 = time.perf_counter()
            res, err = _run_child(pythons[side], {**spec, "case": case, "side": side}, args.timeout)
            took = time.perf_counter() - t0
            if res is None:
                failed = True
                print(f"  {case:<13} {side:<9} FAILED after {took:.0f} s: {err}", flush=True)
            else:
                steps = [round(s, 2) for s in res["train_step_s"]]
                print(
                    f"  {case:<13} {side:<9} {took:6.1f} s  {res['library']}, torch "
                    f"{res['torch']}, {res['device']}, {res['precision']}, "
                    f"{res['threads']} threads, train step s {steps}",
                    flush=True,
                )
            results[f"{case}/{side}"] = res
            if args.json:  # after every child, so a cut-short run still leaves its figures
                args.json.write_text(json.dumps({"spec": spec, "results": results}, indent=2))

    rows = []
    for case in cases:
        rows += _rows(case, results.get(f"{case}/ours"), results.get(f"{case}/reference"), spec)
    print()
    print(markdown(("config", "figure", "ours", "reference", "ratio"), rows))
    print(
        "\nratio: speed rows are ours/reference throughput (= reference/ours time), > 1 means "
        "ours is faster; GFLOP/sample, RSS, CUDA memory and parameter rows are "
        "ours/reference. GFLOP/sample: torch's FlopCounterMode over one training forward + "
        "backward; GFLOP/s: that x train samples/s. The speed-up row splits the train "
        "samples/s ratio into reference/ours FLOPs per sample x ours/reference FLOP/s."
        "\nNFE = denoiser forward calls counted during the timed sampling run."
    )
    if args.quick:
        print("--quick shrinks every size: it checks the script, its figures mean nothing.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
