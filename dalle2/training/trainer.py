"""One training loop for every model in the pipeline (CLIP, prior, decoder stages).

The loop knows nothing of diffusion: it is handed `loss_fn(model, batch) -> scalar`, so the
same code trains a contrastive CLIP and a denoising unet. Metrics leave through a callback
(the pipeline steps forward them to the experiment tracker); the loop itself logs nothing.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dalle2.config import TrainConfig
from dalle2.device import autocast, autocast_dtype, pick_device
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

if TYPE_CHECKING:
    from accelerate import Accelerator

MetricsCallback = Callable[[int, dict[str, float]], None]
LossFn = Callable[[nn.Module, Any], torch.Tensor]

BETAS = (0.9, 0.99)  # beta2 below 0.999 tracks the fast-changing diffusion loss scale better


@dataclass
class TrainResult:
    """What one call to Trainer.fit did."""

    steps: int  # optimizer steps taken in this call
    seconds: float
    samples_per_s: float
    final_loss: float  # loss of the last optimizer step (mean over its micro-batches)
    stopped_early: bool  # the target step was not reached (time cap, batches ran out, signal)
    resumed_from: int = 0  # the step this call started from (a resumed checkpoint's)

    @property
    def final_step(self) -> int:
        """The optimizer steps the model has taken in all, over resumed calls."""
        return self.resumed_from + self.steps


# ----------------------------------------------------------------------------- schedule


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable params into AdamW groups; 1-D params (biases, norm gains) get no decay.

    Decaying a norm gain or a bias towards zero fights the normalisation instead of
    regularising anything, so only matrices and kernels (ndim >= 2) are decayed.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def lr_at(step: int, cfg: TrainConfig, time_fraction: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Linear warmup reaching cfg.lr at step warmup_steps - 1, then a half cosine from cfg.lr at
    step warmup_steps down to cfg.lr * min_lr_ratio at step cfg.steps (held after that).
    `time_fraction` (the share of cfg.max_minutes used so far) moves the cosine on when the
    clock runs out before the steps do, so a time-capped run still ends at a low LR.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    lr_min = cfg.lr * cfg.min_lr_ratio
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, progress, time_fraction))
    return lr_min + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - lr_min)


# ----------------------------------------------------------------------------- helpers


def _to_device(x: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples, lists and dicts to `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(_to_device(v, device) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    values = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _batch_size(batch: Any, default: int) -> int:
    """Samples in a batch, read from its first tensor; only used for throughput numbers."""
    t = _first_tensor(batch)
    return int(t.shape[0]) if t is not None and t.ndim > 0 else default


def compile_on(setting: str, device: torch.device) -> bool:
    """Whether train.compile compiles here. `auto` compiles on CUDA only: on a 2-core CPU
    compiled training ran 1.2-1.4x faster, but its first compile (25-100 s) ate most of
    that on the default's short runs (docs/benchmarks.md, compile.py)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


class TrainingInterruptedError(RuntimeError):
    """SIGTERM stopped training after a checkpoint (raised where the signal did not end it)."""


class _Preemption:
    """SIGTERM while training: finish the step, checkpoint, then let the signal act as it
    would have (ZenML's handler fails the step; without a handler the process ends).

    Only the main thread can own a signal handler; elsewhere training ignores the signal.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: Any = None

    def __enter__(self) -> _Preemption:
        if self.enabled:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            signal.signal(signal.SIGTERM, self._previous)

    def redeliver(self) -> None:
        if self.signum is not None:
            signal.raise_signal(self.signum)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (Trainer.checkpoint's layout), if any."""
    done = sorted(p for p in Path(root).glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


@dataclass
class _Window:
    """Sums since the last metrics report."""

    t0: float
    steps: int = 0
    loss: float = 0.0
    norm: float = 0.0
    norm_steps: int = 0
    samples: int = 0

    def add(self, loss: float, norm: float, samples: int) -> None:
        self.steps += 1
        self.loss += loss
        self.samples += samples
        if math.isfinite(norm):  # fp16 overflow steps are skipped by the scaler
            self.norm += norm
            self.norm_steps += 1


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """AdamW + cosine schedule + EMA + grad accumulation + mixed precision, resumable.

    Args:
        model: the network to train; moved to the device here.
        cfg: optimisation settings.
        loss_fn: `loss_fn(model, batch) -> scalar`; with an accelerator, `model` may be the
            DDP-wrapped network, so call it rather than reading its attributes.
        device: where to train; default pick_device("auto"). Ignored with an accelerator.
        callback: receives `(step, {"loss", "lr", "grad_norm", "samples_per_s"})`.
        progress: show a tqdm bar.
        desc: the bar's label.
        accelerator: an `accelerate.Accelerator` for multi-GPU (DDP). Its own
            `mixed_precision` then applies and cfg.precision is ignored; accumulate with
            cfg.grad_accum, not with the accelerator's gradient_accumulation_steps.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        loss_fn: LossFn,
        *,
        device: torch.device | None = None,
        callback: MetricsCallback | None = None,
        progress: bool = True,
        desc: str = "train",
        accelerator: Accelerator | None = None,
    ) -> None:
        self.cfg = cfg
        self.loss_fn = loss_fn
        self.callback = callback
        self.progress = progress
        self.desc = desc
        self.accelerator = accelerator
        self.step = 0
        if accelerator is not None:
            if accelerator.gradient_accumulation_steps != 1:
                raise ValueError(
                    "set gradient accumulation through cfg.grad_accum and leave the "
                    "Accelerator's gradient_accumulation_steps at 1"
                )
            self.device = accelerator.device
        else:
            self.device = torch.device(device) if device is not None else pick_device("auto")

        self.model = model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=BETAS
        )
        # The EMA is kept in fp32 so tiny per-step updates are not rounded away.
        self.ema = copy.deepcopy(model).float().requires_grad_(False).eval()
        self._ema_params = list(self.ema.parameters())
        self._model_params = list(self.model.parameters())
        self._ema_buffers = list(self.ema.buffers())
        self._model_buffers = list(self.model.buffers())

        self._scaler: torch.amp.GradScaler | None = None
        if accelerator is not None:
            self._net, self._opt = accelerator.prepare(self.model, self.optimizer)
            self._dtype = None
        else:
            self._net, self._opt = self.model, self.optimizer
            self._dtype = autocast_dtype(self.device, cfg.precision)
            if self._dtype == torch.float16:
                self._scaler = torch.amp.GradScaler(self.device.type)
        # The loss is computed through `_forward`: torch.compile's wrapper of the (DDP) net,
        # or the net itself; DDP's no_sync and gradient clipping keep using `_net`.
        self._forward: nn.Module = self._net
        if compile_on(cfg.compile, self.device):
            self._forward = torch.compile(self._net)

    # ------------------------------------------------------------------ small pieces

    @property
    def _is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def _rank(self) -> int:
        return 0 if self.accelerator is None else self.accelerator.process_index

    @property
    def _world(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes

    @property
    def _active_scaler(self) -> Any:
        if self.accelerator is not None:
            return self.accelerator.scaler
        return self._scaler

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.accelerator is not None:
            return self.accelerator.autocast()
        return autocast(self.device, self._dtype)

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager[object]:
        """Skip the DDP all-reduce on all but the last micro-batch of an optimizer step."""
        if self.accelerator is None or last:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self._net)

    def _loss(self, batch: Any) -> torch.Tensor:
        if self._forward is self._net:
            return self.loss_fn(self._net, batch)
        try:
            return self.loss_fn(self._forward, batch)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            # e.g. no C++ compiler for inductor on CPU: the step is the same without it
            why = str(err).strip().splitlines()[-1][:200]
            warnings.warn(
                f"{self.desc}: torch.compile failed ({why}); training without it "
                "(set train.compile: off to skip the attempt)",
                stacklevel=2,
            )
            self._forward = self._net
            return self.loss_fn(self._net, batch)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        elif self._scaler is not None:
            self._scaler.scale(loss).backward()
        else:
            loss.backward()

    def _clip(self) -> torch.Tensor:
        """Unscale (fp16) and clip gradients; returns the pre-clip global norm."""
        if self.accelerator is not None:
            return self.accelerator.clip_grad_norm_(self._net.parameters(), self.cfg.grad_clip)
        if self._scaler is not None:
            self._scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(self._model_params, self.cfg.grad_clip)

    def _optimizer_step(self) -> None:
        if self.accelerator is None and self._scaler is not None:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            self._opt.step()  # an AcceleratedOptimizer applies its scaler itself
        self._opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * model, with decay ramped up over early steps."""
        decay = self.cfg.ema_decay
        if self.cfg.ema_warmup:
            decay = min(decay, (1 + self.step) / (10 + self.step))
        src = [p.detach().float() for p in self._model_params]
        torch._foreach_lerp_(self._ema_params, src, 1.0 - decay)
        for e, b in zip(self._ema_buffers, self._model_buffers, strict=True):
            e.copy_(b)

    def _check(
        self, loss: torch.Tensor, norm: torch.Tensor, stop: bool
    ) -> tuple[float, float, bool]:
        """One host sync per step: fetch loss and grad norm, refuse to step on NaN/inf.

        `stop` (this process got SIGTERM) travels in the loss's all-reduce, so every process
        stops after the same step and they checkpoint together.
        """
        flag = torch.tensor(float(stop), device=loss.device)
        if self._world > 1:
            loss, flag = self.accelerator.reduce(
                torch.stack([loss.float(), flag]), reduction="mean"
            ).unbind()
        loss_val, norm_val, flag_val = torch.stack(
            [loss.float(), norm.float().to(loss.device), flag]
        ).tolist()
        if not math.isfinite(loss_val):
            raise FloatingPointError(
                f"loss became {loss_val} at step {self.step + 1}; lower the learning rate "
                "or check the batch for NaNs (weights were not updated)"
            )
        if not math.isfinite(norm_val) and self._active_scaler is None:
            raise FloatingPointError(
                f"gradient norm became {norm_val} at step {self.step + 1}; lower the "
                "learning rate or use bf16/fp32 (weights were not updated)"
            )
        return loss_val, norm_val, flag_val > 0

    def _report(self, window: _Window, lr: float, bar: tqdm) -> None:
        now = time.perf_counter()
        metrics = {
            "loss": window.loss / window.steps,
            "lr": lr,
            "grad_norm": window.norm / window.norm_steps if window.norm_steps else math.nan,
            "samples_per_s": window.samples * self._world / max(now - window.t0, 1e-9),
        }
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        if self.callback is not None and self._is_main:
            self.callback(self.step, metrics)

    # ------------------------------------------------------------------ public

    def fit(
        self,
        batches: Iterable[Any],
        steps: int | None = None,
        checkpoint_dir: Path | None = None,
    ) -> TrainResult:
        """Train until self.step reaches `steps` (default cfg.steps), the batches run out,
        cfg.max_minutes pass, or SIGTERM arrives.

        With `checkpoint_dir`, a checkpoint is written there every cfg.checkpoint_every
        steps, at the last step and on SIGTERM (see checkpoint); `resume` continues from it.

        Each optimizer step consumes cfg.grad_accum batches; a partial group left when the
        batches run out is discarded. The LR follows lr_at(self.step) whatever `steps` is,
        so a run split over several fit calls follows one schedule; under cfg.max_minutes the
        cosine also follows the clock of this call, whichever is further along.
        """
        cfg = self.cfg
        target = cfg.steps if steps is None else steps
        start = time.perf_counter()
        first_step, total_samples = self.step, 0
        last_loss, lr = math.nan, lr_at(self.step, cfg)
        window = _Window(t0=start)
        batch_iter = iter(batches)

        self._net.train()
        self._opt.zero_grad(set_to_none=True)
        preemption = _Preemption(checkpoint_dir is not None)
        stop = False
        with preemption, contextlib.closing(self._bar(target)) as bar:
            while self.step < target:
                accumulated = self._accumulate(batch_iter)
                if accumulated is None:
                    break
                loss_sum, samples = accumulated
                time_fraction = self._time_fraction(start)
                lr = lr_at(self.step, cfg, time_fraction)
                last_loss, norm, stop = self._update(loss_sum, lr, preemption.signum is not None)
                if checkpoint_dir is not None and (
                    stop or self.step % cfg.checkpoint_every == 0 or self.step == target
                ):
                    self.checkpoint(checkpoint_dir)

                total_samples += samples
                window.add(last_loss, norm, samples)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == target:
                    self._report(window, lr, bar)
                    window = _Window(t0=time.perf_counter())
                if stop or time_fraction >= 1.0:  # SIGTERM, or the clock cap (0 without one)
                    break
            if window.steps:  # stopped before a report was due
                self._report(window, lr, bar)
        if stop:
            preemption.redeliver()
            raise TrainingInterruptedError(
                f"{self.desc} stopped by SIGTERM after step {self.step}; its checkpoint in "
                f"{checkpoint_dir} resumes it"
            )

        seconds = time.perf_counter() - start
        return TrainResult(
            steps=self.step - first_step,
            seconds=seconds,
            samples_per_s=total_samples * self._world / max(seconds, 1e-9),
            final_loss=last_loss,
            stopped_early=self.step < target,
            resumed_from=first_step,
        )

    def _bar(self, target: int) -> tqdm:
        # a capped run usually ends on the clock: say so, or the ETA over `target` misleads
        cap = self.cfg.max_minutes
        return tqdm(
            total=target,
            initial=min(self.step, target),
            desc=self.desc if cap is None else f"{self.desc} (<= {cap:g} min)",
            disable=not (self.progress and self._is_main),
            dynamic_ncols=True,
        )

    def _accumulate(self, batch_iter: Iterator[Any]) -> tuple[torch.Tensor, int] | None:
        """Forward and backward over one optimizer step's cfg.grad_accum batches: the summed
        loss and the samples seen, or None (that group's gradients dropped) when the batches
        run out part-way."""
        accum = self.cfg.grad_accum
        loss_sum = torch.zeros((), device=self.device)
        samples = 0
        for micro in range(accum):
            batch = next(batch_iter, _END)
            if batch is _END:
                self._opt.zero_grad(set_to_none=True)
                return None
            samples += _batch_size(batch, self.cfg.batch_size)
            batch = _to_device(batch, self.device)
            with self._no_sync(last=micro == accum - 1):
                with self._autocast():
                    loss = self._loss(batch)
                loss_sum += loss.detach().float()
                self._backward(loss / accum)
        return loss_sum, samples

    def _update(self, loss_sum: torch.Tensor, lr: float, stop: bool) -> tuple[float, float, bool]:
        """One optimizer step at `lr`: gradients clipped and checked (see _check), then the
        weights, the EMA and self.step. Returns (loss, grad norm, stop)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        norm = self._clip()
        loss, norm_val, stop = self._check(loss_sum / self.cfg.grad_accum, norm, stop)
        self._optimizer_step()
        self._update_ema()
        self.step += 1
        return loss, norm_val, stop

    def _time_fraction(self, start: float) -> float:
        """Share of cfg.max_minutes spent since `start` (0 without a cap).

        With several processes the slowest clock wins, so every rank uses the same LR and
        stops at the same step (a rank that stopped alone would hang the others' all-reduce).
        """
        if self.cfg.max_minutes is None:
            return 0.0
        fraction = (time.perf_counter() - start) / (self.cfg.max_minutes * 60)
        if self._world > 1:
            t = torch.tensor(fraction, device=self.device)
            fraction = float(self.accelerator.reduce(t, reduction="max"))
        return fraction

    def _rng_file(self, out_dir: Path, rank: int) -> Path:
        return out_dir / ("rng.safetensors" if rank == 0 else f"rng_rank{rank}.safetensors")

    def save(self, out_dir: Path, extra: dict[str, Any] | None = None) -> None:
        """Write a resumable checkpoint: weights, EMA, optimizer, RNG and trainer state.

        Only safetensors and JSON files are written; trainer_state.json goes last, so its
        presence marks a complete checkpoint. `extra` must be JSON-serialisable.
        """
        out_dir = Path(out_dir)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        out_dir.mkdir(parents=True, exist_ok=True)
        save_rng(self._rng_file(out_dir, self._rank))  # every process has its own streams
        if self._is_main:
            save_weights(self.model, out_dir / "model.safetensors")
            save_weights(self.ema, out_dir / "ema.safetensors")
            save_optimizer(self.optimizer, out_dir / "optimizer")
            scaler = self._active_scaler
            state = {
                "step": self.step,
                "cfg": self.cfg.model_dump(mode="json"),
                "extra": extra or {},
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": [self._rng_file(out_dir, r).name for r in range(self._world)],
            }
            save_json(state, out_dir / "trainer_state.json")
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def load(self, out_dir: Path) -> dict[str, Any]:
        """Restore a checkpoint written by save() so fit() continues the same loss curve.

        Returns:
            The `extra` dict given to save().
        """
        out_dir = Path(out_dir)
        state = load_json(out_dir / "trainer_state.json")
        load_weights(self.model, out_dir / "model.safetensors")
        load_weights(self.ema, out_dir / "ema.safetensors")
        load_optimizer(self.optimizer, out_dir / "optimizer")
        self.step = int(state["step"])
        scaler = self._active_scaler
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rng = self._rng_file(out_dir, self._rank)
        if rng.is_file() or self._rank == 0:
            load_rng(rng)
        else:  # resuming on more processes than saved: fresh but distinct streams
            warnings.warn(
                f"no RNG state for process {self._rank} in {out_dir}; reseeding", stacklevel=2
            )
            torch.manual_seed(self.cfg.seed + 1000 * self.step + self._rank)
        return dict(state.get("extra") or {})

    def checkpoint(self, root: Path) -> Path:
        """save() into `root/step-NNNNNNNNN`, atomically: written under a temporary name and
        renamed, then older checkpoints are removed, so a kill at any moment leaves the last
        complete one. Every process calls it (each writes its RNG state)."""
        root = Path(root)
        final = root / f"step-{self.step:09d}"
        tmp = root / f".{final.name}.tmp"
        if self._is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a save that a kill interrupted
        self.save(tmp)  # its barriers hold the other processes until the folder is ready
        if self._is_main:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in root.glob("step-*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        return final

    def resume(self, root: Path) -> int:
        """Load the newest checkpoint under `root`, if there is one; returns its step."""
        latest = latest_checkpoint(root)
        if latest is not None:
            self.load(latest)
        return self.step


_END = object()
