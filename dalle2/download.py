"""Turn a URL list into webdataset shards with img2dataset, and count what failed.

The default dataset (shapes64) is generated locally and served by a loopback HTTP
server that lives only as long as the download, so it takes exactly the path a real
URL list takes: HTTP fetch, decode, resize, shard.

A crashed download is continued by the next run: img2dataset's incremental mode skips
every shard whose {shard}_stats.json exists in its output folder, and shards are row-index
slices of the URL list, so the list handed to it must be the same rows in the same order.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import importlib.util
import json
import os
import shutil
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dalle2 import synthetic
from dalle2.config import DataConfig

SOURCE_FILE = "source.json"
# The fingerprint of a partial download; not *.json, as img2dataset's incremental mode
# parses every *.json in its output folder as a finished shard's "{shard}_stats.json".
PARTIAL_SOURCE_FILE = "source.json.partial"
# Rows refused before img2dataset, in its stats format so read_stats sums them in.
REFUSED_STATS_FILE = "refused_stats.json"


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
        schemes = sorted({s.lower() for s in cfg.allowed_url_schemes})
        fp["url_list"] = {"name": path.name, "md5": digest, "allowed_url_schemes": schemes}
    return fp


def url_scheme(url: str) -> str:
    """The scheme urllib (img2dataset's fetcher) opens `url` with; "" when it finds none.

    Parsed the way urllib.request.Request does (unwrap, then the text before the first ':'
    if it holds no '/'), so "<URL:file:///etc/passwd>" or " FILE:///x" are seen as file.
    """
    scheme, colon, _ = urllib.parse.unwrap(url).partition(":")
    return scheme.lower() if colon and "/" not in scheme else ""


def refuse_schemes(
    urls: pd.DataFrame, allowed: tuple[str, ...]
) -> tuple[pd.DataFrame, Counter[str]]:
    """Drop rows whose URL scheme is not allowed, so img2dataset never reads e.g. file://.

    Rows without a scheme stay: urllib cannot open them, and img2dataset counts them failed.
    Returns the kept rows and a failure reason -> count for the refused ones.
    """
    schemes = urls["url"].map(url_scheme)
    refused = (schemes != "") & ~schemes.isin({s.lower() for s in allowed})
    reasons = Counter(
        f"url scheme '{s}' not allowed (data.allowed_url_schemes)" for s in schemes[refused]
    )
    return urls[~refused].reset_index(drop=True), reasons


def read_stats(out_dir: Path) -> DownloadStats:
    """Sum img2dataset's per-shard *_stats.json files and our refused_stats.json."""
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
    """Call img2dataset on a parquet URL list with url/caption columns.

    Shards already finished in `out_dir` are skipped (incremental mode).
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its only outside request
    from img2dataset import download

    with contextlib.ExitStack() as stack:
        if not progress:  # img2dataset prints its own progress; silence it when asked
            stack.enter_context(
                contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w")))
            )
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
            distributor=cfg.distributor,
            incremental_mode="incremental",
            enable_wandb=False,
            disallowed_header_directives=[],  # loopback/file servers send no such headers
        )


def check_distributor(cfg: DataConfig) -> None:
    """Fail before any work when the configured distributor cannot run."""
    if cfg.distributor == "pyspark" and importlib.util.find_spec("pyspark") is None:
        raise DownloadError(
            "data.distributor is 'pyspark' but pyspark is not installed; run "
            "`pip install pyspark` (it needs Java), and img2dataset then uses the active "
            "SparkSession or, when none exists, starts a local[N] one itself with "
            "N = data.processes"
        )


def _drop_unfinished_shards(partial: Path) -> None:
    """Forget stats files a crash may have left unusable, so img2dataset redoes their shards.

    Its incremental mode counts shard N done when any N_*.json exists (and crashes on a
    *.json not named so); it writes that stats file after the shard's tar.
    """
    for f in partial.glob("*.json"):
        try:
            finished = (partial / f"{f.name.split('_')[0]}.tar").is_file() and isinstance(
                json.loads(f.read_text()), dict
            )
        except ValueError:
            finished = False
        if not finished:
            f.unlink()


def _fetch(
    urls: pd.DataFrame, list_path: Path, out: Path, cfg: DataConfig, progress: bool
) -> Counter[str]:
    """Run img2dataset on the allowed rows of `urls`; returns the refused rows' reasons."""
    urls, refused = refuse_schemes(urls, cfg.allowed_url_schemes)
    if not urls.empty:
        urls.to_parquet(list_path, index=False)
        run_img2dataset(list_path, out, cfg, progress)
        list_path.unlink()
    return refused


def download_dataset(
    cfg: DataConfig, out_dir: Path, cache_dir: Path, progress: bool = True
) -> DownloadStats:
    """Download into `out_dir` (replacing it only on success); returns the stats.

    The download is made in `{out_dir}.partial`; one a crashed run left there for the same
    source and shard size is continued, any other is deleted first.
    """
    check_distributor(cfg)
    if cfg.url_list is not None and Path(cfg.url_list).resolve().is_relative_to(out_dir.resolve()):
        raise DownloadError(
            f"data.url_list {cfg.url_list} lies inside {out_dir}, which each download replaces; "
            "keep the URL list outside the data folder"
        )
    partial = out_dir.with_name(out_dir.name + ".partial")
    marker = partial / PARTIAL_SOURCE_FILE
    fingerprint = json.dumps(
        {**source_fingerprint(cfg), "shard_size": cfg.shard_size}, indent=1, sort_keys=True
    )
    if marker.is_file() and marker.read_text() == fingerprint:
        _drop_unfinished_shards(partial)
    else:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        marker.write_text(fingerprint)
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
        # the port differs per run, but rows keep their order, so shards keep their rows
        with serve_directory(src) as base:
            urls = pd.DataFrame(
                {"url": [f"{base}/{r}" for r in frame["rel"]], "caption": frame["caption"]}
            )
            refused = _fetch(urls, list_path, partial, cfg, progress)
    else:
        df = read_url_list(Path(cfg.url_list), cfg.url_col, cfg.caption_col)
        urls = pd.DataFrame(
            {"url": df[cfg.url_col].astype(str), "caption": df[cfg.caption_col].astype(str)}
        )
        refused = _fetch(urls, list_path, partial, cfg, progress)
    marker.unlink()  # from here on the partial is finished or deleted, never continued
    if refused:
        n = refused.total()
        (partial / REFUSED_STATS_FILE).write_text(
            json.dumps(
                {"count": n, "successes": 0, "failed_to_download": n, "status_dict": refused},
                indent=1,
            )
        )
    stats = read_stats(partial)
    if stats.successes == 0 or stats.success_ratio < cfg.min_success_ratio:
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
