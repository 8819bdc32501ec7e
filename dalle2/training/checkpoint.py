"""Checkpoints in safe formats only: safetensors for tensors, JSON for everything else.

Nothing here pickles, so loading a checkpoint downloaded from elsewhere can never run code.
Every write goes to a temporary file first and is renamed into place, so a run killed
mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_VERSION = 1

# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` and move it over `path` once written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _require(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist; check the checkpoint path")


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with its own storage; safetensors refuses shared storage."""
    return t.detach().to("cpu", copy=True).contiguous()


def _save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, Any] | None = None
) -> None:
    metadata = {"format": str(FORMAT_VERSION)}
    if meta is not None:
        metadata["json"] = json.dumps(meta)
    with _atomic(path) as tmp:
        save_file({k: _cpu_copy(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _load_tensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    _require(path, what)
    try:
        tensors = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{what} file {path} is not a valid safetensors file ({err})") from None
    meta = json.loads(metadata["json"]) if "json" in metadata else None
    return tensors, meta


def _encode(value: Any, sink: dict[str, torch.Tensor], key: str) -> Any:
    """JSON-encode `value`, moving tensors into `sink` and keeping tuples distinct from lists."""
    if isinstance(value, torch.Tensor):
        sink[key] = value
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, sink, f"{key}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, sink, f"{key}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"cannot store a dict with non-string keys at {key!r} as JSON")
        return {k: _encode(v, sink, f"{key}.{k}") for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} at {key!r} in a safe checkpoint")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def _prefixed(prefix: Path, suffix: str) -> Path:
    # Not with_suffix: a prefix such as "run.v2/optimizer" must keep its dots.
    return prefix.parent / f"{prefix.name}{suffix}"


# ----------------------------------------------------------------------------- weights


def save_weights(module: nn.Module, path: Path) -> None:
    """Write a module's state_dict as safetensors; tied weights are stored once per name."""
    _save_tensors(dict(module.state_dict()), Path(path))


def load_weights(module: nn.Module, path: Path, strict: bool = True) -> None:
    """Load safetensors weights into `module` in place (onto the module's own device).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is not safetensors, or (strict) its keys or shapes do not fit.
    """
    path = Path(path)
    tensors, _ = _load_tensors(path, "weights")
    try:
        module.load_state_dict(tensors, strict=strict)
    except RuntimeError as err:
        raise ValueError(
            f"weights in {path} do not fit {type(module).__name__} "
            f"(was the model built from the same config?): {err}"
        ) from None


# ----------------------------------------------------------------------------- json


def save_json(obj: dict[str, Any], path: Path) -> None:
    """Write a dict as indented JSON (readable in a diff, safe to load)."""
    with _atomic(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def load_json(path: Path) -> dict[str, Any]:
    """Read a JSON object written by save_json."""
    path = Path(path)
    _require(path, "JSON")
    obj = json.loads(path.read_text())
    if not isinstance(obj, dict):
        raise ValueError(f"JSON file {path} must hold an object")
    return obj


# ----------------------------------------------------------------------------- optimizer


def save_optimizer(opt: torch.optim.Optimizer, path_prefix: Path) -> None:
    """Write `prefix.safetensors` (moment buffers, step counts) and `prefix.json` (the rest)."""
    path_prefix = Path(path_prefix)
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state = {
        str(idx): _encode(dict(pstate), tensors, f"state.{idx}")
        for idx, pstate in sd["state"].items()
    }
    groups = [_encode(dict(g), tensors, f"group.{i}") for i, g in enumerate(sd["param_groups"])]
    _save_tensors(tensors, _prefixed(path_prefix, ".safetensors"))
    save_json(
        {
            "format": FORMAT_VERSION,
            "type": type(opt).__name__,
            "state": state,
            "param_groups": groups,
        },
        _prefixed(path_prefix, ".json"),
    )


def load_optimizer(opt: torch.optim.Optimizer, path_prefix: Path) -> None:
    """Restore an optimizer saved by save_optimizer; it must be built over the same params."""
    path_prefix = Path(path_prefix)
    meta = load_json(_prefixed(path_prefix, ".json"))
    tensors, _ = _load_tensors(_prefixed(path_prefix, ".safetensors"), "optimizer")
    if meta.get("type") != type(opt).__name__:
        raise ValueError(
            f"optimizer state at {path_prefix} is for {meta.get('type')}, not {type(opt).__name__}"
        )
    state = {int(k): _decode(v, tensors) for k, v in meta["state"].items()}
    groups = [_decode(g, tensors) for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------- rng


def save_rng(path: Path) -> None:
    """Store torch (CPU and initialised CUDA), numpy and Python RNG states as safetensors."""
    tensors: dict[str, torch.Tensor] = {"torch": torch.get_rng_state()}
    # Only read CUDA states that exist already: querying them would initialise CUDA.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(py_state), py_gauss],
    }
    _save_tensors(tensors, Path(path), meta)


def load_rng(path: Path) -> None:
    """Restore RNG states written by save_rng, so noise after a resume matches a straight run."""
    tensors, meta = _load_tensors(Path(path), "RNG state")
    if meta is None:
        raise ValueError(f"RNG state file {path} lacks its metadata")
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [
            tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors
        ]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = meta["python"]
    random.setstate((version, tuple(py_state), py_gauss))
