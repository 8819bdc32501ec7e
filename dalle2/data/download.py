"""Turn a URL list into webdataset shards with img2dataset, and count what failed.

Each source downloads into its own folder of the data folder, data/<key>, where the key
hashes everything that decides the downloaded bytes; so runs with different sources can
run side by side, and runs of one source share one download (see prepare_dataset).

The default dataset (shapes64) is generated locally and served by a loopback HTTP
server that lives only as long as the download, so it takes exactly the path a real
URL list takes: HTTP fetch, decode, resize, shard.

A crashed download is continued by the next run: img2dataset's incremental mode skips
every shard whose {shard}_stats.json exists in its output folder, and shards are row-index
slices of the URL list, so the list handed to it must be the same rows in the same order.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import http.server
import importlib.util
import json
import logging
import os
import re
import shutil
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dalle2.data import emoji, shapes64
from dalle2.config import DataConfig
from dalle2.data.versioning import (
    LOCK_DIR,
    VersioningError,
    add,
    dataset_md5,
    file_lock,
    is_in_sync,
    pointer_md5,
    push,
    repo_lock,
    snapshot_files,
)

logger = logging.getLogger(__name__)

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
    if cfg.url_list is None and cfg.source == "emoji":
        fp["emoji"] = {
            "styles": list(cfg.emoji.styles),
            "flags": cfg.emoji.flags,
            "packages": [
                p.integrity for p in (emoji.NAMES, *map(emoji.STYLES.get, cfg.emoji.styles))
            ],
            "builder": emoji.BUILDER_VERSION,
        }
    elif cfg.url_list is None:
        fp["shapes64"] = {"num_images": cfg.num_synthetic, "seed": cfg.synthetic_seed}
    else:
        path = Path(cfg.url_list)
        digest = hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else None
        schemes = sorted({s.lower() for s in cfg.allowed_url_schemes})
        fp["url_list"] = {
            "name": path.name,
            "md5": digest,
            "columns": [cfg.url_col, cfg.caption_col],
            "allowed_url_schemes": schemes,
        }
    return fp


def dataset_key(cfg: DataConfig) -> str:
    """The folder name of this source's download under data/: a readable name + a hash.

    The hash covers the source fingerprint and the shard size, everything that decides the
    downloaded bytes, so two configs share a folder exactly when they download the same.
    """
    full = json.dumps({**source_fingerprint(cfg), "shard_size": cfg.shard_size}, sort_keys=True)
    digest = hashlib.sha256(full.encode()).hexdigest()[:12]
    if cfg.url_list is None and cfg.source == "emoji":
        return f"emoji-{digest}"
    if cfg.url_list is None:
        return f"shapes64-{cfg.num_synthetic}-{digest}"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.url_list).stem).strip("._-")[:40]
    return f"{stem or 'urls'}-{digest}"


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


def refuse_empty_captions(urls: pd.DataFrame) -> tuple[pd.DataFrame, Counter[str]]:
    """Drop rows without a caption (null, empty, blank): img2dataset would write "None" or
    "" as the text, and the models would learn it as a caption. Counted as failures."""
    captions = urls["caption"]
    text = captions.where(captions.notna(), "").astype(str).str.strip()
    empty = text == ""
    reasons: Counter[str] = Counter(
        {"empty or missing caption": int(empty.sum())} if empty.any() else {}
    )
    kept = urls[~empty].reset_index(drop=True)
    kept["caption"] = text[~empty].to_numpy()
    return kept, reasons


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
    urls, no_caption = refuse_empty_captions(urls)
    refused.update(no_caption)
    if not urls.empty:
        urls.to_parquet(list_path, index=False)
        run_img2dataset(list_path, out, cfg, progress)
        list_path.unlink()
    return refused


def _synthetic_source(cfg: DataConfig, cache_dir: Path, progress: bool) -> Path:
    """Generate shapes64 once per (size, seed) into the cache, under a lock shared by runs."""
    src = cache_dir / f"shapes64-{cfg.num_synthetic}-{cfg.synthetic_seed}-{cfg.image_size}"
    with file_lock(cache_dir / "locks" / f"{src.name}.lock", "another run is generating it"):
        if not (src / "index.parquet").is_file():  # written last: a folder without it is partial
            shutil.rmtree(src, ignore_errors=True)
            frame = shapes64.generate(
                src, cfg.num_synthetic, seed=cfg.synthetic_seed, progress=progress
            )
            frame["rel"] = [str(Path(p).relative_to(src)) for p in frame["path"]]
            frame.to_parquet(src / "index.parquet", index=False)
    return src


def _emoji_source(cfg: DataConfig, cache_dir: Path, progress: bool) -> Path:
    """Build the emoji images once per settings into the cache, under a lock shared by runs;
    the npm tarballs themselves live in the user's cache folder (emoji.cache_root)."""
    digest = hashlib.sha256(json.dumps(source_fingerprint(cfg)["emoji"]).encode()).hexdigest()
    src = cache_dir / f"emoji-{digest[:12]}"
    with file_lock(cache_dir / "locks" / f"{src.name}.lock", "another run is building it"):
        if not (src / "index.parquet").is_file():  # written last: a folder without it is partial
            shutil.rmtree(src, ignore_errors=True)
            src.mkdir(parents=True)
            try:
                emoji.build(src, cfg.emoji.styles, cfg.emoji.flags, progress=progress)
            except emoji.EmojiError as err:
                shutil.rmtree(src, ignore_errors=True)
                raise DownloadError(str(err)) from None
    return src


def download_dataset(
    cfg: DataConfig, work_dir: Path, cache_dir: Path, progress: bool = True
) -> DownloadStats:
    """Download into `work_dir`; returns the stats. The caller holds the source's lock.

    A download a crashed run left in `work_dir` for the same source and shard size is
    continued, any other is deleted first. On success `work_dir` holds the finished
    dataset (with its source.json); on a DownloadError it is deleted.
    """
    check_distributor(cfg)
    # what can fail on the source's side fails before a partial download folder exists
    if cfg.url_list is not None:
        df = read_url_list(Path(cfg.url_list), cfg.url_col, cfg.caption_col)
    elif cfg.source == "emoji":
        src = _emoji_source(cfg, cache_dir, progress)
    else:
        src = _synthetic_source(cfg, cache_dir, progress)
    marker = work_dir / PARTIAL_SOURCE_FILE
    fingerprint = json.dumps(
        {**source_fingerprint(cfg), "shard_size": cfg.shard_size}, indent=1, sort_keys=True
    )
    if marker.is_file() and marker.read_text() == fingerprint:
        _drop_unfinished_shards(work_dir)
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        marker.write_text(fingerprint)
    list_path = work_dir.parent / f".{work_dir.name}-urls.parquet"
    if cfg.url_list is None:
        if (src / "ATTRIBUTION.md").is_file():
            shutil.copy(src / "ATTRIBUTION.md", work_dir / "ATTRIBUTION.md")
        frame = pd.read_parquet(src / "index.parquet")
        # the port differs per run, but rows keep their order, so shards keep their rows
        with serve_directory(src) as base:
            urls = pd.DataFrame(
                {"url": [f"{base}/{r}" for r in frame["rel"]], "caption": frame["caption"]}
            )
            refused = _fetch(urls, list_path, work_dir, cfg, progress)
    else:
        urls = pd.DataFrame({"url": df[cfg.url_col].astype(str), "caption": df[cfg.caption_col]})
        refused = _fetch(urls, list_path, work_dir, cfg, progress)
    marker.unlink()  # from here on the download is finished or deleted, never continued
    if refused:
        n = refused.total()
        (work_dir / REFUSED_STATS_FILE).write_text(
            json.dumps(
                {"count": n, "successes": 0, "failed_to_download": n, "status_dict": refused},
                indent=1,
            )
        )
    stats = read_stats(work_dir)
    if stats.successes == 0 or stats.success_ratio < cfg.min_success_ratio:
        top = ", ".join(f"{k} ({v})" for k, v in list(stats.reasons.items())[:3]) or "none"
        shutil.rmtree(work_dir, ignore_errors=True)
        raise DownloadError(
            f"only {stats.successes} of {stats.count} images downloaded "
            f"({stats.success_ratio:.0%} < data.min_success_ratio {cfg.min_success_ratio:.0%}); "
            f"most common failures: {top}"
        )
    shutil.rmtree(work_dir / "_tmp", ignore_errors=True)
    (work_dir / SOURCE_FILE).write_text(
        json.dumps(source_fingerprint(cfg), indent=1, sort_keys=True)
    )
    return stats


def matches_source(out_dir: Path, cfg: DataConfig) -> bool:
    """True when `out_dir` holds a download made from the configured source."""
    f = out_dir / SOURCE_FILE
    if not f.is_file() or not any(out_dir.glob("*.tar")):
        return False
    return json.loads(f.read_text()) == json.loads(
        json.dumps(source_fingerprint(cfg), sort_keys=True)
    )


DOWNLOADS_DIR = Path(".cache") / "downloads"  # unfinished downloads: outside data/, same disk


@dataclass
class PreparedDataset:
    """One source's dataset in the data folder, versioned by DVC."""

    path: Path  # data/<key>: this source's shards
    md5: str  # md5 of this folder's files (dataset_md5): names the dataset
    snapshot_md5: str  # data.dvc's md5 after this run: `dvc pull` of that data.dvc restores it
    stats: DownloadStats
    skipped: bool  # no download: a folder an earlier run made was reused


def _source_lock(root: Path, key: str) -> Path:
    return root / LOCK_DIR / f"download-{key}.lock"


def _drop_abandoned(root: Path, keep: str) -> None:
    """Delete unfinished downloads of other sources that no live run is working on.

    A crashed run's download is continued by the next run of its source, and deleted by a
    run of another source (so crashed downloads do not pile up); never one a run still holds.
    """
    for partial in (root / DOWNLOADS_DIR).glob("*.partial"):
        key = partial.name.removesuffix(".partial")
        if key == keep:
            continue
        with file_lock(_source_lock(root, key), "", wait=False) as held:
            if held:
                logger.info("deleting %s, an unfinished download of another source", partial)
                shutil.rmtree(partial, ignore_errors=True)


def _install(work_dir: Path, out_dir: Path) -> None:
    """Move a finished download into the data folder in one step; the repo lock is held.

    A rename when both lie on one filesystem; otherwise a copy into a hidden sibling (that
    .dvcignore hides) renamed into place, so `out_dir` never exists half-written.
    """
    if out_dir.exists():  # this source's folder, but not a finished download of it
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(work_dir, out_dir)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        staging = out_dir.with_name(f".{out_dir.name}.incoming")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(work_dir, staging)
        os.rename(staging, out_dir)
        shutil.rmtree(work_dir)


def _version(root: Path, cfg: DataConfig, key: str, reused: bool) -> tuple[str, str]:
    """(data.dvc md5, dataset md5) after this run, adding data/ only when it changed and
    pushing the snapshot when `data.dvc_push` and the remote has not taken it yet.

    The caller holds the repo lock, so no other run's folder lands between add and read.
    """
    data_dir = cfg.data_dir
    files = snapshot_files(root, data_dir) if reused else None
    before = dataset_md5(files, key) if files else None
    if before and is_in_sync(root, data_dir):
        snapshot = pointer_md5(root, data_dir)
        assert snapshot is not None  # is_in_sync read it
        if cfg.dvc_push:
            push(root, data_dir, snapshot)
        return snapshot, before
    snapshot = add(root, data_dir)
    if cfg.dvc_push:
        push(root, data_dir, snapshot)
    files = snapshot_files(root, data_dir)
    md5 = dataset_md5(files, key) if files else None
    if md5 is None:
        raise VersioningError(f"`dvc add {data_dir}` recorded no {data_dir}/{key} in its manifest")
    if before and before != md5:
        logger.warning(
            "%s/%s differs from its last snapshot (edited by hand?): versioned as it is now, "
            "as dataset %s; delete the folder to download the source afresh",
            data_dir,
            key,
            md5,
        )
    return snapshot, md5


def prepare_dataset(cfg: DataConfig, root: Path, progress: bool = True) -> PreparedDataset:
    """Download the configured source into data/<key> (or reuse it) and version it with DVC.

    Safe to run side by side in one project: a run of the same source waits for the first
    and reuses its folder; runs of other sources download at once (in .cache/downloads/,
    which no `dvc add data` sees) and take turns with DVC.

    A folder already holding this source's download is reused without a new snapshot when
    data/ matches data.dvc. When it does not (files edited, added or removed by hand, or
    another data.dvc checked out), data/ is added again rather than trusting the recorded
    md5: the md5 then names the bytes the folder holds now, which may differ from what the
    source gives (a warning says so), while the stats stay those the download recorded.
    """
    root = root.resolve()
    data_root = root / cfg.data_dir
    if cfg.url_list is not None:
        url_list = Path(cfg.url_list)
        if url_list.resolve().is_relative_to(data_root.resolve()):
            raise DownloadError(
                f"data.url_list {cfg.url_list} lies inside {data_root}, which holds the "
                "downloads and is versioned whole; keep the URL list outside the data folder"
            )
        if not url_list.is_file():  # checked before its missing md5 goes into the key
            raise DownloadError(
                f"URL list {url_list} does not exist; fix data.url_list in the config"
            )
    key = dataset_key(cfg)
    out, work = data_root / key, root / DOWNLOADS_DIR / f"{key}.partial"
    with file_lock(_source_lock(root, key), "another run is downloading the same data"):
        reused = matches_source(out, cfg)
        if not reused and not matches_source(work, cfg):  # else a crash left it finished
            _drop_abandoned(root, keep=key)
            download_dataset(cfg, work, root / ".cache", progress)
        with repo_lock(root):
            if not reused:
                _install(work, out)
            if loose := sorted(data_root.glob("*.tar")):
                logger.warning(
                    "%s holds %d shards at its top level, from before one folder per source; "
                    "every snapshot versions them until you delete them",
                    data_root,
                    len(loose),
                )
            snapshot, md5 = _version(root, cfg, key, reused)
        stats = read_stats(out)
    return PreparedDataset(out, md5, snapshot, stats, skipped=reused)
