"""Turn a URL list into webdataset shards with img2dataset, and count what failed.

The default dataset (shapes64) is generated locally and served by a loopback HTTP
server that lives only as long as the download, so it takes exactly the path a real
URL list takes: HTTP fetch, decode, resize, shard.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dalle2 import synthetic
from dalle2.config import DataConfig

SOURCE_FILE = "source.json"


class DownloadError(RuntimeError):
    """The download could not produce a usable dataset."""


@dataclass
class DownloadStats:
    """What img2dataset reported, summed over shards."""

    count: int = 0
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def success_ratio(self) -> float:
        return self.successes / self.count if self.count else 0.0


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """Serve `root` on 127.0.0.1 at a free port while the block runs; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def read_url_list(path: Path, url_col: str, caption_col: str) -> pd.DataFrame:
    """Read a parquet/csv/tsv URL list, checking it has the url and caption columns."""
    if not path.is_file():
        raise DownloadError(f"URL list {path} does not exist; fix data.url_list in the config")
    suffix = path.suffix.lower()
    readers = {
        ".parquet": pd.read_parquet,
        ".csv": pd.read_csv,
        ".tsv": functools.partial(pd.read_csv, sep="\t"),
    }
    if suffix not in readers:
        raise DownloadError(f"URL list {path} must be .parquet, .csv or .tsv, not '{suffix}'")
    try:
        df = readers[suffix](path)
    except Exception as err:
        raise DownloadError(f"could not read URL list {path}: {err}") from None
    missing = [c for c in (url_col, caption_col) if c not in df.columns]
    if missing:
        raise DownloadError(f"URL list {path} lacks column(s) {missing}; it has {list(df.columns)}")
    if df.empty:
        raise DownloadError(f"URL list {path} has no rows")
    return df


def source_fingerprint(cfg: DataConfig) -> dict:
    """What determines the downloaded data: the URL list's bytes or the shapes64 settings."""
    fp: dict = {
        "image_size": cfg.image_size,
        "resize_mode": cfg.resize_mode,
        "encode_format": cfg.encode_format,
    }
    if cfg.url_list is None:
        fp["shapes64"] = {"num_images": cfg.num_synthetic, "seed": cfg.synthetic_seed}
    else:
        path = Path(cfg.url_list)
        digest = hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else None
        fp["url_list"] = {"name": path.name, "md5": digest}
    return fp


def read_stats(out_dir: Path) -> DownloadStats:
    """Sum img2dataset's per-shard *_stats.json files."""
    stats = DownloadStats()
    reasons: Counter[str] = Counter()
    for f in sorted(out_dir.glob("*_stats.json")):
        s = json.loads(f.read_text())
        stats.count += int(s.get("count", 0))
        stats.successes += int(s.get("successes", 0))
        stats.failed_to_download += int(s.get("failed_to_download", 0))
        stats.failed_to_resize += int(s.get("failed_to_resize", 0))
        reasons.update({k: int(v) for k, v in s.get("status_dict", {}).items() if k != "success"})
    stats.reasons = dict(reasons.most_common())
    return stats


def run_img2dataset(url_list: Path, out_dir: Path, cfg: DataConfig, progress: bool) -> None:
    """Call img2dataset on a parquet URL list with url/caption columns."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its only outside request
    from img2dataset import download

    with contextlib.redirect_stdout(None if progress else open(os.devnull, "w")):
        download(
            url_list=str(url_list),
            output_folder=str(out_dir),
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            output_format="webdataset",
            image_size=cfg.image_size,
            resize_mode=cfg.resize_mode,
            encode_format=cfg.encode_format,
            encode_quality=95 if cfg.encode_format != "png" else 1,
            processes_count=cfg.processes,
            thread_count=cfg.threads,
            number_sample_per_shard=cfg.shard_size,
            timeout=cfg.timeout_s,
            retries=0,
            distributor="multiprocessing",
            enable_wandb=False,
            disallowed_header_directives=[],  # loopback/file servers send no such headers
        )


def download_dataset(
    cfg: DataConfig, out_dir: Path, cache_dir: Path, progress: bool = True
) -> DownloadStats:
    """Download into a fresh `out_dir` (replacing it only on success); returns the stats."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    list_path = partial.parent / f".{out_dir.name}-urls.parquet"
    if cfg.url_list is None:
        src = cache_dir / f"shapes64-{cfg.num_synthetic}-{cfg.synthetic_seed}-{cfg.image_size}"
        if not (src / "index.parquet").is_file():
            shutil.rmtree(src, ignore_errors=True)
            frame = synthetic.generate(
                src, cfg.num_synthetic, seed=cfg.synthetic_seed, progress=progress
            )
            frame["rel"] = [str(Path(p).relative_to(src)) for p in frame["path"]]
            frame.to_parquet(src / "index.parquet", index=False)
        frame = pd.read_parquet(src / "index.parquet")
        with serve_directory(src) as base:
            urls = pd.DataFrame(
                {"url": [f"{base}/{r}" for r in frame["rel"]], "caption": frame["caption"]}
            )
            urls.to_parquet(list_path, index=False)
            run_img2dataset(list_path, partial, cfg, progress)
    else:
        df = read_url_list(Path(cfg.url_list), cfg.url_col, cfg.caption_col)
        df = pd.DataFrame(
            {"url": df[cfg.url_col].astype(str), "caption": df[cfg.caption_col].astype(str)}
        )
        df.to_parquet(list_path, index=False)
        run_img2dataset(list_path, partial, cfg, progress)
    list_path.unlink(missing_ok=True)
    stats = read_stats(partial)
    if stats.count == 0 or stats.success_ratio < cfg.min_success_ratio:
        top = ", ".join(f"{k} ({v})" for k, v in list(stats.reasons.items())[:3]) or "none"
        shutil.rmtree(partial, ignore_errors=True)
        raise DownloadError(
            f"only {stats.successes} of {stats.count} images downloaded "
            f"({stats.success_ratio:.0%} < data.min_success_ratio {cfg.min_success_ratio:.0%}); "
            f"most common failures: {top}"
        )
    shutil.rmtree(partial / "_tmp", ignore_errors=True)
    (partial / SOURCE_FILE).write_text(
        json.dumps(source_fingerprint(cfg), indent=1, sort_keys=True)
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return stats


def matches_source(out_dir: Path, cfg: DataConfig) -> bool:
    """True when `out_dir` holds a download made from the configured source."""
    f = out_dir / SOURCE_FILE
    if not f.is_file() or not any(out_dir.glob("*.tar")):
        return False
    return json.loads(f.read_text()) == json.loads(
        json.dumps(source_fingerprint(cfg), sort_keys=True)
    )
