"""What a run trained with: the lock, the installed packages, Python, torch and the device.

Bit-identical weights need the same packages (a new torch kernel changes every weight) on the
same kind of device. So every run records them (tags `env.*` and `run/environment.txt`), and
`dalle2 reproduce` compares the record with the environment it is about to train in.
"""

from __future__ import annotations

import hashlib
import platform
import re
import sysconfig
import tomllib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distributions, version
from pathlib import Path

import torch

LOCK = "uv.lock"
ARTIFACT = "run/environment.txt"  # the installed packages, one `name==version` a line
NO_LOCK = "none"


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them (`Open_Clip.torch` is `open-clip-torch`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_sha256(root: Path) -> str:
    """sha256 of the project's uv.lock, or "none" where the project has none."""
    lock = root / LOCK
    return hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else NO_LOCK


def installed() -> dict[str, str]:
    """Every distribution installed in this interpreter's site-packages, by normalized name.

    Only there, not all of sys.path: an imported setuptools puts its vendored packages on
    the path, which would make the same environment list differently from one process to
    the next."""
    site = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    found = {}
    for dist in distributions(path=site):
        name = dist.metadata["Name"]
        if name:  # a broken install can leave metadata without a name
            found.setdefault(normalize(name), dist.version)
    return dict(sorted(found.items()))


def device_name(device: torch.device) -> str:
    """The device as a reproduction must match it: the GPU's model and CUDA version count."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})"
    return f"{device.type} ({platform.machine()})"


@dataclass(frozen=True)
class Environment:
    lock_sha256: str
    packages: dict[str, str]
    python: str
    torch: str
    device: str

    @property
    def packages_sha256(self) -> str:
        return hashlib.sha256(self.freeze().encode()).hexdigest()

    def freeze(self) -> str:
        return "".join(f"{name}=={v}\n" for name, v in self.packages.items())

    def tags(self) -> dict[str, str]:
        return {
            "env.lock_sha256": self.lock_sha256,
            "env.packages_sha256": self.packages_sha256,
            "env.python": self.python,
            "env.torch": self.torch,
            "env.device": self.device,
        }


def current(root: Path, device: torch.device) -> Environment:
    return Environment(
        lock_sha256=lock_sha256(root),
        packages=installed(),
        python=platform.python_version(),
        torch=torch.__version__,
        device=device_name(device),
    )


def recorded(tags: dict[str, str], freeze: str) -> Environment | None:
    """The environment a run logged, or None for a run from before runs logged one."""
    if "env.lock_sha256" not in tags:
        return None
    packages = {}
    for line in freeze.splitlines():
        name, sep, v = line.strip().partition("==")
        if sep:
            packages[normalize(name)] = v
    return Environment(
        lock_sha256=tags["env.lock_sha256"],
        packages=packages,
        python=tags.get("env.python", "unknown"),
        torch=tags.get("env.torch", "unknown"),
        device=tags.get("env.device", "unknown"),
    )


def differences(then: Environment, now: Environment) -> list[str]:
    """One sentence for each way `now` differs from `then` (empty: the same environment)."""
    out = []
    if then.lock_sha256 != now.lock_sha256:
        out.append(
            f"the lock differs: the run had uv.lock {then.lock_sha256[:12]}, "
            f"this checkout has {now.lock_sha256[:12]}"
        )
    for what in ("python", "torch", "device"):
        a, b = getattr(then, what), getattr(now, what)
        if a != b:
            out.append(f"{what} differs: {a} in the run, {b} now")
    changed = [
        f"{name} {then.packages.get(name, '(absent)')} -> {now.packages.get(name, '(absent)')}"
        for name in sorted(then.packages.keys() | now.packages.keys())
        if then.packages.get(name) != now.packages.get(name) and name != "torch"
    ]
    if changed:
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        out.append(f"{len(changed)} installed package(s) differ: {', '.join(changed[:5])}{more}")
    return out


def lock_pins(root: Path, names: tuple[str, ...]) -> list[str]:
    """`name==version` for each of `names` as uv.lock holds it, so that a served model
    installs the packages it was trained with. Where the lock holds two versions (one per
    Python), or has no uv.lock at all, the installed version decides."""
    lock = root / LOCK
    locked: dict[str, set[str]] = {}
    if lock.is_file():
        for package in tomllib.loads(lock.read_text()).get("package", []):
            locked.setdefault(normalize(package["name"]), set()).add(package.get("version", ""))
    pins = []
    for name in names:
        try:
            here = version(name)
        except PackageNotFoundError:
            here = None
        versions = locked.get(normalize(name), set())
        pick = next(iter(versions)) if len(versions) == 1 else here
        pins.append(f"{name}=={pick}" if pick else name)
    return pins
