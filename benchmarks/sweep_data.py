"""The data a GPU sweep needs, packed here into what a GPU machine's transfer allows.

The device machine gets the working tree and at most 8 carried folders, 64 MiB in all, and
reaches no network. The emoji download (123 MB of tar shards, most of it tar and pax headers
around ~3 KB PNGs) and its cached embeddings (126 MB) do not fit. What a run needs is the
images and captions, so those travel as one uint8 array per dataset, xz-compressed (emoji on
white compress far better than as 14,208 separate PNGs); CLIP trains there from the images,
so the embeddings need not travel. The emoji judge travels as it is cached, so a GPU run is
judged by the same network as the CPU runs were.

    write_pack(out, datasets, judges)   # here: DIR/manifest.json, DIR/KEY.npz.xz, DIR/judge-*/
    Pack(DIR).shards(key, work)         # there: tar shards laid out as the download step does

The arrays hold every pixel as decoded from the shards, so the GPU trains on the same
images in the same shards and order; only the PNGs are encoded anew.
"""

from __future__ import annotations

import io
import json
import lzma
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dalle2.config import DataConfig
from dalle2.data import shapes64
from dalle2.data import shards as D

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
TRANSFER_MIB = 64  # what the device tool carries: the working tree plus carried paths
XZ_PRESET = 6


class PackError(Exception):
    """Data a sweep needs is missing or does not match; the message says what to do."""


@dataclass
class Dataset:
    """The images (N, H, W, 3) uint8, their captions and keys, and how many a shard holds."""

    images: np.ndarray
    captions: list[str]
    keys: list[str]
    shard_sizes: list[int]


def read_shards(shard_dir: Path) -> Dataset:
    """Every sample of a download's tar shards, in shard order."""
    images, captions, keys, sizes = [], [], [], []
    for tar in D.shard_paths(shard_dir):
        n = 0
        for sample in D.tar_samples(tar):
            images.append(D.decode_image(sample))
            captions.append(D.caption_of(sample))
            keys.append(sample["__key__"])
            n += 1
        sizes.append(n)
    return Dataset(np.stack(images), captions, keys, sizes)


def draw_shapes64(data: DataConfig) -> Dataset:
    """shapes64 as the download step draws it (same seed and count, drawn at the config's
    size), for a config whose data was never downloaded here: data/ stays untouched."""
    with tempfile.TemporaryDirectory() as tmp:
        frame = shapes64.generate(
            Path(tmp), data.num_synthetic, seed=data.synthetic_seed, image_size=data.image_size
        )
        images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in frame["path"]])
    n = len(images)
    sizes = [min(data.shard_size, n - s) for s in range(0, n, data.shard_size)]
    return Dataset(images, frame["caption"].tolist(), [f"{i:09d}" for i in range(n)], sizes)


def dataset_of(data: DataConfig, shard_dir: Path) -> Dataset:
    """A config's dataset: its downloaded shards, or shapes64 drawn where none are."""
    if shard_dir.is_dir():
        return read_shards(shard_dir)
    if data.url_list is None and data.source == "shapes64":
        return draw_shapes64(data)
    raise PackError(
        f"no data at {shard_dir}: run the pipeline's download step with this config first"
    )


def write_shards(shard_dir: Path, ds: Dataset) -> None:
    """Tar shards of PNG + caption per sample, as img2dataset lays a download out; written
    under a temporary name and renamed, so a folder that exists is complete."""
    tmp = shard_dir.with_name(f".{shard_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = 0
    for s, size in enumerate(ds.shard_sizes):
        with tarfile.open(tmp / f"{s:05d}.tar", "w") as tar:
            for i in range(start, start + size):
                png = io.BytesIO()
                Image.fromarray(ds.images[i]).save(png, "PNG", compress_level=1)  # fast to write
                for ext, blob in (("png", png.getvalue()), ("txt", ds.captions[i].encode())):
                    info = tarfile.TarInfo(f"{ds.keys[i]}.{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
        start += size
    shutil.rmtree(shard_dir, ignore_errors=True)
    tmp.rename(shard_dir)


def _save(path: Path, ds: Dataset) -> None:
    buf = io.BytesIO()
    np.savez(buf, images=ds.images, captions=np.array(ds.captions), keys=np.array(ds.keys))
    path.write_bytes(lzma.compress(buf.getvalue(), preset=XZ_PRESET))


def _load(path: Path, shard_sizes: list[int]) -> Dataset:
    with np.load(io.BytesIO(lzma.decompress(path.read_bytes()))) as z:
        return Dataset(z["images"], z["captions"].tolist(), z["keys"].tolist(), shard_sizes)


def mib(path: Path) -> float:
    """Size of a file or of a folder's files, in MiB."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def write_pack(out: Path, datasets: dict[str, Dataset], judges: dict[str, Path]) -> dict[str, Any]:
    """Pack `datasets` (by dataset key) and the judge folders of some of them into `out`;
    returns the manifest, with each file's size."""
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"datasets": {}}
    for key, ds in datasets.items():
        file = out / f"{key}.npz.xz"
        _save(file, ds)
        entry = {
            "file": file.name,
            "images": len(ds.captions),
            "image_size": int(ds.images.shape[1]),
            "shard_sizes": ds.shard_sizes,
            "mib": round(mib(file), 2),
            "judge": None,
        }
        if key in judges:
            folder = out / f"judge-{judges[key].name}"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(judges[key], folder)
            entry |= {"judge": folder.name, "judge_mib": round(mib(folder), 2)}
        manifest["datasets"][key] = entry
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


class Pack:
    """A folder write_pack wrote, read on the GPU machine."""

    def __init__(self, folder: Path) -> None:
        if not (folder / MANIFEST).is_file():
            raise PackError(f"{folder} holds no {MANIFEST}: write it with --pack {folder}")
        self.folder = folder
        self.datasets: dict[str, Any] = json.loads((folder / MANIFEST).read_text())["datasets"]

    def _entry(self, key: str) -> dict[str, Any]:
        if key not in self.datasets:
            raise PackError(
                f"the pack in {self.folder} holds no dataset {key} (it has "
                f"{', '.join(self.datasets) or 'none'}); pack this config's data with --pack"
            )
        return self.datasets[key]

    def shards(self, key: str, work: Path) -> Path:
        """The dataset's tar shards under work/KEY, unpacked once."""
        shard_dir = work / key
        if not shard_dir.is_dir():
            entry = self._entry(key)
            write_shards(shard_dir, _load(self.folder / entry["file"], entry["shard_sizes"]))
        return shard_dir

    def judge(self, key: str) -> Path:
        """The folder of the emoji judge packed with the dataset."""
        name = self._entry(key)["judge"]
        if name is None:
            raise PackError(f"the pack in {self.folder} holds no judge for {key}; repack it")
        return self.folder / name


def travelling_mib() -> float:
    """What the device tool sends besides carried paths: tracked and untracked, not ignored
    files of the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    files = [ROOT / f for f in listed.stdout.decode().split("\0") if f]
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20
