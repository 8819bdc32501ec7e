"""Checkpoint tests: safe formats only, bit-exact round trips, exact resume."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from dalle2.config import TrainConfig
from dalle2.training.checkpoint import (
    load_json,
    load_optimizer,
    load_rng,
    load_weights,
    save_json,
    save_optimizer,
    save_rng,
    save_weights,
)
from dalle2.training.trainer import Trainer


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
        "warmup_steps": 3,
        "precision": "fp32",
        "log_every": 5,
        "ema_decay": 0.95,
        "weight_decay": 0.01,
    }
    return TrainConfig(**{**base, **kw})


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 1))


def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch number `step` of a deterministic stream, independent of global RNG."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 4, generator=g)
    return x, x.sum(dim=1, keepdim=True)


def noisy_mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Noise from torch's global RNG, as diffusion losses draw it: resume must restore it."""
    x, y = batch
    x = x + 0.1 * torch.randn_like(x)
    return F.mse_loss(model(x), y)


def assert_same(a: Any, b: Any) -> None:
    """Recursive exact equality of (nested) state dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


# ----------------------------------------------------------------------------- files


def test_load_weights_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_weights(tiny_model(), missing)


def test_load_weights_rejects_wrong_model_and_non_safetensors(tmp_path: Path) -> None:
    save_weights(tiny_model(), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="do not fit"):
        load_weights(nn.Linear(4, 2), tmp_path / "m.safetensors")
    load_weights(nn.Linear(4, 16), tmp_path / "m.safetensors", strict=False)  # tolerated
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_weights(tiny_model(), tmp_path / "bad.safetensors")


def test_tied_weights_round_trip(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.out = nn.Linear(6, 10, bias=False)
            self.out.weight = self.emb.weight

    src, dst = Tied(), Tied()
    save_weights(src, tmp_path / "tied.safetensors")
    load_weights(dst, tmp_path / "tied.safetensors")
    assert torch.equal(dst.emb.weight, src.emb.weight)
    assert dst.out.weight is dst.emb.weight  # still tied after loading


def test_json_and_rng_round_trip(tmp_path: Path) -> None:
    save_json({"a": 1, "b": [1.5, "x"]}, tmp_path / "x.json")
    assert load_json(tmp_path / "x.json") == {"a": 1, "b": [1.5, "x"]}
    save_rng(tmp_path / "rng.safetensors")
    first = (torch.rand(3), np.random.rand(3), random.random())
    load_rng(tmp_path / "rng.safetensors")
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def test_optimizer_round_trip_keeps_types(tmp_path: Path) -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    save_optimizer(opt, tmp_path / "opt.v1" / "optimizer")
    fresh = torch.optim.AdamW(tiny_model().parameters(), lr=5.0)
    load_optimizer(fresh, tmp_path / "opt.v1" / "optimizer")
    assert_same(fresh.state_dict(), opt.state_dict())
    assert fresh.param_groups[0]["betas"] == (0.9, 0.99)
    with pytest.raises(ValueError, match="SGD"):
        load_optimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "opt.v1" / "optimizer"
        )


# ----------------------------------------------------------------------------- trainer


def test_trainer_checkpoint_round_trip_is_bit_exact(tmp_path: Path, monkeypatch: Any) -> None:
    def no_pickle(*a: Any, **k: Any) -> None:
        raise AssertionError("torch.save (pickle) must not be used")

    monkeypatch.setattr(torch, "save", no_pickle)
    trainer = Trainer(tiny_model(), make_cfg(), noisy_mse, progress=False)
    trainer.fit([batch_at(i) for i in range(3)])
    trainer.save(tmp_path / "ckpt", extra={"stage": "prior"})

    files = sorted(p for p in (tmp_path / "ckpt").iterdir())
    assert {p.name for p in files} == {
        "model.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "trainer_state.json",
        "rng.safetensors",
    }
    for p in files:  # every file parses as safetensors or JSON: nothing is a pickle
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                assert list(f.keys())
        else:
            json.loads(p.read_text())

    fresh = Trainer(tiny_model(seed=1), make_cfg(), noisy_mse, progress=False)
    assert fresh.load(tmp_path / "ckpt") == {"stage": "prior"}
    assert fresh.step == 3
    assert_same(fresh.model.state_dict(), trainer.model.state_dict())
    assert_same(fresh.ema.state_dict(), trainer.ema.state_dict())
    assert_same(fresh.optimizer.state_dict(), trainer.optimizer.state_dict())
    assert load_json(tmp_path / "ckpt" / "trainer_state.json")["cfg"]["steps"] == 20


def test_resume_continues_the_same_loss_curve(tmp_path: Path) -> None:
    batches = [batch_at(i) for i in range(20)]
    torch.manual_seed(7)
    straight = Trainer(tiny_model(), make_cfg(), noisy_mse, progress=False)
    full = straight.fit(batches)

    torch.manual_seed(7)
    first = Trainer(tiny_model(), make_cfg(), noisy_mse, progress=False)
    first.fit(batches[:10], steps=10)
    first.save(tmp_path / "half")
    torch.manual_seed(999)  # whatever happens in between must not matter
    second = Trainer(tiny_model(seed=3), make_cfg(), noisy_mse, progress=False)
    second.load(tmp_path / "half")
    rest = second.fit(batches[10:])

    assert second.step == straight.step == 20 and rest.steps == 10
    assert rest.final_loss == pytest.approx(full.final_loss, abs=1e-5)
    for a, b in [(second.model, straight.model), (second.ema, straight.ema)]:
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert ka == kb
            torch.testing.assert_close(va, vb, atol=1e-5, rtol=0)


def test_accelerate_one_step_and_save(tmp_path: Path) -> None:
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    seen: list[int] = []
    trainer = Trainer(
        tiny_model(),
        make_cfg(steps=1, log_every=1),
        noisy_mse,
        progress=False,
        accelerator=accelerator,
        callback=lambda s, m: seen.append(s),
    )
    result = trainer.fit([batch_at(0)])
    assert result.steps == 1 and seen == [1]
    trainer.save(tmp_path / "acc")
    assert {p.suffix for p in (tmp_path / "acc").iterdir()} == {".safetensors", ".json"}
    again = Trainer(
        tiny_model(seed=2), make_cfg(steps=1), noisy_mse, progress=False, accelerator=accelerator
    )
    again.load(tmp_path / "acc")
    assert_same(again.model.state_dict(), trainer.model.state_dict())
