"""Trainer, schedule and device tests on tiny CPU regression problems."""

from __future__ import annotations

import itertools
import math
from collections import namedtuple
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dalle2.config import TrainConfig
from dalle2.device import autocast, autocast_dtype, cpu_has_native_bf16, pick_device
from dalle2.training.trainer import Trainer, _to_device, lr_at, param_groups

W_TRUE = torch.tensor([[1.5], [-2.0], [0.5], [1.0]])


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny MLPs run fastest single-threaded; extra threads only contend on busy CI."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "steps": 20,
        "batch_size": 8,
        "lr": 1e-2,
        "warmup_steps": 2,
        "precision": "fp32",
        "log_every": 5,
        "ema_decay": 0.9,
    }
    return TrainConfig(**{**base, **kw})


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 1))


def make_batches(n: int, bs: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, bs, 4, generator=g)
    return [(x[i], x[i] @ W_TRUE) for i in range(n)]


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def eval_loss(model: nn.Module) -> float:
    x, y = make_batches(1, bs=256, seed=123)[0]
    with torch.no_grad():
        return F.mse_loss(model(x), y).item()


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


# ----------------------------------------------------------------------------- schedule


def test_lr_at_warmup_peak_and_cosine_end() -> None:
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(4, cfg) == pytest.approx(0.5)
    assert lr_at(9, cfg) == pytest.approx(1.0)  # peak at the end of warmup
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)  # held after cfg.steps
    decay = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(decay))


def test_lr_at_without_warmup_starts_at_peak() -> None:
    cfg = TrainConfig(steps=10, warmup_steps=0, lr=2.0, min_lr_ratio=0.0)
    assert lr_at(0, cfg) == pytest.approx(2.0)
    assert lr_at(10, cfg) == pytest.approx(0.0)


def test_lr_at_follows_the_clock_when_it_is_further_along() -> None:
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(10, cfg, time_fraction=0.5) == pytest.approx(0.55)  # clock half-way: mid-cosine
    assert lr_at(55, cfg, time_fraction=0.1) == pytest.approx(0.55)  # steps further along
    assert lr_at(20, cfg, time_fraction=1.0) == pytest.approx(0.1)
    assert lr_at(5, cfg, time_fraction=0.9) == pytest.approx(0.6)  # warmup stays step-based


def test_time_capped_fit_decays_the_lr_within_the_cap() -> None:
    cfg = make_cfg(steps=1_000_000, warmup_steps=0, max_minutes=0.5 / 60, log_every=1)
    lrs: list[float] = []
    trainer = Trainer(
        tiny_model(), cfg, mse, progress=False, callback=lambda s, m: lrs.append(m["lr"])
    )
    result = trainer.fit(itertools.cycle(make_batches(4)))
    assert result.stopped_early and result.steps == len(lrs) > 10
    assert lrs[-1] < cfg.lr * (cfg.min_lr_ratio + 0.1)  # ended near the floor, not at the peak
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_param_groups_skip_decay_on_biases_and_norms() -> None:
    model = tiny_model()
    groups = param_groups(model, weight_decay=0.05)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(decay) == {id(model[0].weight), id(model[3].weight)}
    assert ids(no_decay) == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
        id(model[3].bias),
    }


# ----------------------------------------------------------------------------- device


def test_device_and_precision_choices() -> None:
    cpu = torch.device("cpu")
    assert pick_device("cpu") == cpu
    native = torch.bfloat16 if cpu_has_native_bf16() else None
    assert autocast_dtype(cpu, "auto") == native
    assert autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "fp16") == torch.float16
    with autocast(cpu, None):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            pick_device("cuda")


def test_batches_move_to_device_recursively() -> None:
    Pair = namedtuple("Pair", "a b")
    batch = {"x": [torch.ones(2), (torch.zeros(3), "caption")], "p": Pair(torch.ones(1), 3)}
    moved = _to_device(batch, torch.device("meta"))
    assert moved["x"][0].is_meta and moved["x"][1][0].is_meta
    assert moved["x"][1][1] == "caption"
    assert isinstance(moved["p"], Pair) and moved["p"].a.is_meta and moved["p"].b == 3


# ----------------------------------------------------------------------------- fit


def test_fit_reduces_regression_loss() -> None:
    model = tiny_model()
    before = eval_loss(model)
    trainer = Trainer(model, make_cfg(steps=60), mse, progress=False)
    result = trainer.fit(make_batches(60))
    assert result.steps == 60 and trainer.step == 60 and not result.stopped_early
    assert eval_loss(trainer.model) < 0.2 * before
    assert math.isfinite(result.final_loss) and result.samples_per_s > 0


def test_callback_reports_mean_loss_every_log_every() -> None:
    per_step: dict[int, dict[str, float]] = {}
    Trainer(
        tiny_model(),
        make_cfg(steps=12, log_every=1),
        mse,
        progress=False,
        callback=lambda s, m: per_step.__setitem__(s, m),
    ).fit(make_batches(12))
    reports: dict[int, dict[str, float]] = {}
    cfg = make_cfg(steps=12, log_every=5)
    Trainer(
        tiny_model(), cfg, mse, progress=False, callback=lambda s, m: reports.__setitem__(s, m)
    ).fit(make_batches(12))
    assert sorted(reports) == [5, 10, 12]  # every log_every steps and at the last step
    for step, first in [(5, 1), (10, 6), (12, 11)]:
        m = reports[step]
        assert set(m) == {"loss", "lr", "grad_norm", "samples_per_s"}
        window = [per_step[s] for s in range(first, step + 1)]
        assert m["loss"] == pytest.approx(sum(w["loss"] for w in window) / len(window))
        assert m["grad_norm"] == pytest.approx(sum(w["grad_norm"] for w in window) / len(window))
        assert m["lr"] == pytest.approx(lr_at(step - 1, cfg))
        assert m["grad_norm"] > 0 and m["samples_per_s"] > 0


def test_grad_accumulation_matches_big_batch() -> None:
    small = make_batches(2, bs=4)
    big = [(torch.cat([small[0][0], small[1][0]]), torch.cat([small[0][1], small[1][1]]))]
    a = Trainer(tiny_model(), make_cfg(grad_accum=2), mse, progress=False)
    b = Trainer(tiny_model(), make_cfg(grad_accum=1), mse, progress=False)
    ra, rb = a.fit(small, steps=1), b.fit(big, steps=1)
    assert a.step == b.step == 1
    assert ra.final_loss == pytest.approx(rb.final_loss, abs=1e-6)
    assert not torch.equal(flat(a.model), flat(tiny_model()))
    torch.testing.assert_close(flat(a.model), flat(b.model), atol=1e-6, rtol=1e-5)


def test_ema_lags_behind_and_moves_toward_model() -> None:
    init = flat(tiny_model())
    trainer = Trainer(tiny_model(), make_cfg(steps=20, ema_decay=0.9), mse, progress=False)
    torch.testing.assert_close(flat(trainer.ema), init)
    trainer.fit(make_batches(20))
    ema, model = flat(trainer.ema), flat(trainer.model)
    assert all(p.dtype == torch.float32 for p in trainer.ema.parameters())
    assert not torch.allclose(ema, model)
    assert (ema - model).norm() < (init - model).norm()


def test_max_minutes_stops_early() -> None:
    trainer = Trainer(tiny_model(), make_cfg(steps=10_000, max_minutes=1e-6), mse, progress=False)
    result = trainer.fit(itertools.cycle(make_batches(4)))
    assert result.stopped_early and 1 <= result.steps < 10_000


def test_fit_ends_when_batches_run_out() -> None:
    trainer = Trainer(tiny_model(), make_cfg(steps=10, grad_accum=2), mse, progress=False)
    result = trainer.fit(make_batches(5))  # the fifth batch is half a step: dropped
    assert result.steps == 2 and result.stopped_early
    assert all(p.grad is None for p in trainer.model.parameters())


def test_non_finite_loss_raises_without_touching_weights() -> None:
    trainer = Trainer(tiny_model(), make_cfg(), lambda m, b: mse(m, b) * math.nan, progress=False)
    before = flat(trainer.model).clone()
    with pytest.raises(FloatingPointError, match="step 1"):
        trainer.fit(make_batches(3))
    assert torch.equal(flat(trainer.model), before) and trainer.step == 0


def test_bf16_autocast_runs_on_cpu() -> None:
    seen: list[tuple[bool, torch.dtype]] = []

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        x, _ = batch
        out = model[0](x)  # a plain Linear: bf16 under autocast
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return mse(model, batch)

    trainer = Trainer(tiny_model(), make_cfg(precision="bf16", steps=3), loss_fn, progress=False)
    result = trainer.fit(make_batches(3))
    assert result.steps == 3 and math.isfinite(result.final_loss)
    assert seen and all(on and dt == torch.bfloat16 for on, dt in seen)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_fp16_uses_grad_scaler() -> None:
    trainer = Trainer(tiny_model(), make_cfg(precision="fp16", steps=3), mse, progress=False)
    assert trainer._scaler is not None
    try:
        result = trainer.fit(make_batches(3))
    except RuntimeError as err:  # some CPU builds lack fp16 kernels
        pytest.skip(f"fp16 autocast unsupported on this CPU build: {err}")
    assert result.steps == 3 and math.isfinite(result.final_loss)


# ----------------------------------------------------------------------------- train.compile


def test_compiled_training_matches_eager_and_saves_plain_weights(tmp_path: Any) -> None:
    """train.compile: on trains the same model as off (to float rounding), and what it saves
    and resumes is the plain network's state, not torch.compile's wrapper."""
    batches = make_batches(12)
    eager = Trainer(tiny_model(), make_cfg(steps=12, compile="off"), mse, progress=False)
    eager.fit(batches)
    compiled = Trainer(tiny_model(), make_cfg(steps=12, compile="on"), mse, progress=False)
    assert compiled._forward is not compiled._net
    compiled.fit(batches)
    for a, b in zip(eager.model.parameters(), compiled.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    compiled.save(tmp_path / "ckpt")
    again = Trainer(tiny_model(1), make_cfg(steps=12, compile="on"), mse, progress=False)
    again.load(tmp_path / "ckpt")
    for a, b in zip(
        again.model.state_dict().values(), compiled.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(monkeypatch: Any) -> None:
    """No usable C++ compiler for inductor on CPU: one warning, and training goes on."""
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    trainer = Trainer(tiny_model(), make_cfg(steps=3, compile="on"), mse, progress=False)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        result = trainer.fit(make_batches(3))
    assert result.steps == 3 and trainer._forward is trainer._net
    torch._dynamo.reset()


def test_auto_compiles_on_cuda_only() -> None:
    from dalle2.training.trainer import compile_on

    assert compile_on("auto", torch.device("cuda")) and not compile_on("auto", torch.device("cpu"))
    assert compile_on("on", torch.device("cpu")) and not compile_on("off", torch.device("cuda"))
