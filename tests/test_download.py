"""img2dataset against a loopback HTTP server; DVC add/push/status in a temp repo.

Runs side by side (subprocesses) are in test_side_by_side.py.
"""

from __future__ import annotations

import errno
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dalle2.config import DataConfig
from dalle2.data import download
from dalle2.data.download import (
    DOWNLOADS_DIR,
    PARTIAL_SOURCE_FILE,
    SOURCE_FILE,
    DownloadError,
    dataset_key,
    download_dataset,
    matches_source,
    prepare_dataset,
    read_stats,
    read_url_list,
    serve_directory,
    source_fingerprint,
)
from dalle2.data.versioning import (
    LOCK_DIR,
    VersioningError,
    add,
    dataset_md5,
    file_lock,
    find_project_root,
    is_in_sync,
    pointer_md5,
    push,
    snapshot_files,
)


class _Sample(NamedTuple):
    key: str
    caption: str
    image: np.ndarray
    url: str


def _read_samples(tars: Iterable[Path]) -> list[_Sample]:
    """The samples img2dataset wrote into webdataset tars, sorted by key.

    Read here with tarfile rather than through dalle2.data.shards, so these tests pin down what
    img2dataset writes, whatever the readers built on it do.
    """
    samples = []
    for path in tars:
        with tarfile.open(path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in files.items():
            key, _, ext = name.rpartition(".")
            if ext == "txt":
                image = np.asarray(Image.open(io.BytesIO(files[f"{key}.png"])).convert("RGB"))
                url = json.loads(files[f"{key}.json"])["url"]
                samples.append(_Sample(key, data.decode(), image, url))
    return sorted(samples, key=lambda s: s.key)


def _site(root: Path) -> Path:
    site = root / "site"
    site.mkdir()
    for i in range(12):
        Image.fromarray(np.full((64, 64, 3), i * 20, np.uint8)).save(site / f"{i}.png")
    (site / "notimage.png").write_bytes(b"this is not an image")
    (site / "truncated.png").write_bytes((site / "3.png").read_bytes()[:60])
    return site


def test_bad_rows_are_counted(tmp_path: Path) -> None:
    site = _site(tmp_path)
    with serve_directory(site) as base:
        good = [f"{base}/{i}.png" for i in range(12)]
        bad = [
            f"{base}/missing.png",  # 404
            f"{base}/notimage.png",  # not an image
            f"{base}/truncated.png",  # truncated image
            "http://127.0.0.1:1/refused.png",  # connection refused
            "not a url",  # bad URL
        ]
        urls = pd.DataFrame({"url": good + bad, "caption": [f"c{i}" for i in range(17)]})
        urls.to_csv(tmp_path / "urls.csv", index=False)
        cfg = DataConfig(
            url_list=str(tmp_path / "urls.csv"),
            processes=1,
            threads=4,
            shard_size=8,
            min_success_ratio=0.5,
            timeout_s=5,
        )
        stats = download_dataset(cfg, tmp_path / "data", tmp_path / "cache", progress=False)
    assert (stats.count, stats.successes) == (17, 12)
    assert stats.failed_to_download == 3  # 404, refused, bad URL
    assert stats.failed_to_resize == 2  # not an image, truncated
    assert sum(stats.reasons.values()) == 5
    assert read_stats(tmp_path / "data") == stats
    samples = _read_samples(sorted((tmp_path / "data").glob("*.tar")))
    assert sorted(s.caption for s in samples) == sorted(f"c{i}" for i in range(12))
    assert all(s.image.shape == (64, 64, 3) for s in samples)
    assert matches_source(tmp_path / "data", cfg)
    # image i is flat grey i * 20 and captioned c{i}: rows stay aligned
    assert all(abs(int(s.image[32, 32, 0]) - int(s.caption[1:]) * 20) <= 3 for s in samples)


def test_disallowed_schemes_and_empty_captions_are_refused_and_counted(tmp_path: Path) -> None:
    site = _site(tmp_path)
    secret = tmp_path / "secret.png"  # a real image on the pipeline machine's disk
    Image.fromarray(np.full((64, 64, 3), 250, np.uint8)).save(secret)
    with serve_directory(site) as base:
        rows = [(f"{base}/{i}.png", f"c{i}") for i in range(4)] + [
            (secret.as_uri(), "file"),
            (f"<URL:{secret.as_uri()}>", "wrapped file"),  # urllib unwraps and opens this
            ("ftp://127.0.0.1:1/x.png", "ftp"),
            (f"{base}/0.png", None),  # good images without a caption are not trained on
            (f"{base}/1.png", "   "),
        ]
        pd.DataFrame(rows, columns=["url", "caption"]).to_parquet(tmp_path / "urls.parquet")
        cfg = DataConfig(
            url_list=str(tmp_path / "urls.parquet"),
            processes=1,
            threads=4,
            min_success_ratio=0.4,
            timeout_s=5,
        )
        stats = download_dataset(cfg, tmp_path / "data", tmp_path / "cache", progress=False)
    assert (stats.count, stats.successes, stats.failed_to_download) == (9, 4, 5)
    assert stats.reasons == {
        "url scheme 'file' not allowed (data.allowed_url_schemes)": 2,
        "empty or missing caption": 2,
        "url scheme 'ftp' not allowed (data.allowed_url_schemes)": 1,
    }
    assert read_stats(tmp_path / "data") == stats
    samples = _read_samples(sorted((tmp_path / "data").glob("*.tar")))
    assert sorted(s.caption for s in samples) == ["c0", "c1", "c2", "c3"]
    assert not any((s.image == 250).all() for s in samples)
    # the control: urllib, img2dataset's fetcher, would have read both file rows
    for url, _ in rows[4:6]:
        with urllib.request.urlopen(url) as r:
            assert r.read() == secret.read_bytes()
    with_file = cfg.model_copy(update={"allowed_url_schemes": ("http", "file")})
    assert not matches_source(tmp_path / "data", with_file)


def test_all_rows_refused_stops_with_one_sentence_without_img2dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("img2dataset must not run on an empty URL list")

    monkeypatch.setattr(download, "run_img2dataset", fail)
    urls = pd.DataFrame({"url": ["file:///etc/passwd", "FTP://x/a.png"], "caption": ["a", "b"]})
    urls.to_csv(tmp_path / "urls.csv", index=False)
    cfg = DataConfig(url_list=str(tmp_path / "urls.csv"), min_success_ratio=0)
    with pytest.raises(
        DownloadError, match=r"^only 0 of 2 images downloaded .*url scheme 'file' not allowed"
    ) as err:
        download_dataset(cfg, tmp_path / "data", tmp_path / "cache", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "data").exists()  # the unfinished download is deleted


class _CrashError(Exception):
    pass


def test_rerun_after_crash_fetches_only_unfinished_shards(
    dvc_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = DataConfig(num_synthetic=30, shard_size=10, processes=1, threads=4, timeout_s=5)
    key = dataset_key(cfg)
    data, partial = dvc_project / "data" / key, dvc_project / DOWNLOADS_DIR / f"{key}.partial"
    real_run = download.run_img2dataset

    def run_then_crash(*args: object, **kwargs: object) -> None:
        real_run(*args, **kwargs)
        raise _CrashError

    monkeypatch.setattr(download, "run_img2dataset", run_then_crash)
    with pytest.raises(_CrashError):
        prepare_dataset(cfg, dvc_project, progress=False)
    monkeypatch.setattr(download, "run_img2dataset", real_run)
    assert not (dvc_project / "data").exists()  # a half download never lies in data/
    tars = [partial / f"0000{i}.tar" for i in range(3)]
    before = [_read_samples([t]) for t in tars]
    assert [len(b) for b in before] == [10, 10, 10]
    shard0 = tars[0].read_bytes()
    # shard 1 never started; shard 2 was killed while writing its stats file
    for name in ("00001.tar", "00001.parquet", "00001_stats.json"):
        (partial / name).unlink()
    stats2 = partial / "00002_stats.json"
    stats2.write_text(stats2.read_text()[:20])

    fetched: list[str] = []
    serve = download._QuietHandler.do_GET

    def counting_get(handler: download._QuietHandler) -> None:
        fetched.append(handler.path)
        serve(handler)

    monkeypatch.setattr(download._QuietHandler, "do_GET", counting_get)
    prepared = prepare_dataset(cfg, dvc_project, progress=False)

    assert prepared.path == data and not prepared.skipped
    stats = prepared.stats
    assert (stats.count, stats.successes) == (30, 30)
    after = [_read_samples([data / t.name]) for t in tars]
    assert (data / "00000.tar").read_bytes() == shard0  # kept, not fetched again
    # the rerun's server has another port, but each shard holds the same rows as before
    for old, new in zip(before, after, strict=True):
        assert [(s.key, s.caption) for s in old] == [(s.key, s.caption) for s in new]
        assert all(np.array_equal(o.image, n.image) for o, n in zip(old, new, strict=True))
    assert sorted(fetched) == sorted(urllib.parse.urlsplit(s.url).path for s in after[1] + after[2])
    assert len(fetched) == 20
    assert not partial.exists() and not (data / PARTIAL_SOURCE_FILE).exists()
    assert matches_source(data, cfg) and read_stats(data) == stats
    assert is_in_sync(dvc_project, "data") and prepared.snapshot_md5 == pointer_md5(
        dvc_project, "data"
    )


def test_partial_from_another_source_is_discarded(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / PARTIAL_SOURCE_FILE).write_text(json.dumps({"url_list": "another"}))
    (work / "00000.tar").write_bytes(b"")
    (work / "00000_stats.json").write_text(json.dumps({"count": 99, "successes": 99}))
    site = _site(tmp_path)
    with serve_directory(site) as base:
        urls = pd.DataFrame({"url": [f"{base}/{i}.png" for i in range(3)], "caption": "x"})
        urls.to_parquet(tmp_path / "urls.parquet")
        cfg = DataConfig(url_list=str(tmp_path / "urls.parquet"), processes=1, threads=2)
        stats = download_dataset(cfg, work, tmp_path / "cache", progress=False)
    assert (stats.count, stats.successes) == (3, 3)
    assert len(_read_samples([work / "00000.tar"])) == 3


def test_pyspark_distributor_needs_pyspark(tmp_path: Path) -> None:
    if importlib.util.find_spec("pyspark") is not None:
        pytest.skip("pyspark is installed")
    cfg = DataConfig(distributor="pyspark", num_synthetic=4)
    with pytest.raises(DownloadError, match=r"`pip install pyspark`.*local\[N\]") as err:
        download_dataset(cfg, tmp_path / "data", tmp_path / "cache", progress=False)
    assert str(err.value).count(". ") == 0 and "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())  # checked before any work


def test_low_success_ratio_stops_with_one_sentence_and_keeps_old_data(tmp_path: Path) -> None:
    old = tmp_path / "data" / "another-source"
    old.mkdir(parents=True)
    (old / "keep.txt").write_text("previous download")
    urls = pd.DataFrame({"url": ["http://127.0.0.1:1/a.png"] * 4, "caption": ["x"] * 4})
    urls.to_parquet(tmp_path / "urls.parquet")
    cfg = DataConfig(url_list=str(tmp_path / "urls.parquet"), processes=1, threads=2, timeout_s=2)
    with pytest.raises(DownloadError, match=r"only 0 of 4 images downloaded.*refused"):
        prepare_dataset(cfg, tmp_path, progress=False)  # fails before DVC is needed
    assert (old / "keep.txt").read_text() == "previous download"
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["another-source"]
    assert not any((tmp_path / DOWNLOADS_DIR).iterdir())


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        (None, "missing.csv", "does not exist"),
        ("url,text\nhttp://x/1.png,a\n", "list.csv", r"lacks column\(s\) \['caption'\]"),
        ("x", "list.json", "must be .parquet, .csv or .tsv"),
    ],
)
def test_bad_url_lists_are_rejected(tmp_path: Path, content, name, match) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DownloadError, match=match):
        read_url_list(path, "url", "caption")


def _dvc(root: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True, capture_output=True)


def test_dvc_versioning_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    (root / "data").mkdir(parents=True)
    (root / "data" / "a.txt").write_text("one")
    with pytest.raises(VersioningError, match="dvc init"):
        find_project_root(root)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _dvc(root, "init", "-q")
    _dvc(root, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    assert find_project_root(root / "data") == root.resolve()
    assert not is_in_sync(root, "data")
    md5 = add(root, "data")
    assert md5 == pointer_md5(root, "data") and md5.endswith(".dir")
    assert push(root, "data", md5)
    assert is_in_sync(root, "data")
    assert any((tmp_path / "remote").rglob("*")), "push stored nothing in the remote"
    (root / "data" / "a.txt").write_text("changed")
    assert not is_in_sync(root, "data")
    # the snapshot comes back from the remote after the local copy and cache are gone
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    _dvc(root, "pull", "-q")
    assert (root / "data" / "a.txt").read_text() == "one"
    assert is_in_sync(root, "data")


def test_a_url_list_inside_the_data_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "urls.csv").write_text("url,caption\nhttp://127.0.0.1:1/a.png,a\n")
    cfg = DataConfig(url_list=str(tmp_path / "data" / "urls.csv"))
    with pytest.raises(DownloadError, match=r"lies inside .* keep the URL list outside") as err:
        prepare_dataset(cfg, tmp_path, progress=False)
    assert "\n" not in str(err.value)
    assert (tmp_path / "data" / "urls.csv").is_file()


def test_dataset_key_follows_what_decides_the_downloaded_bytes(tmp_path: Path) -> None:
    base = DataConfig(num_synthetic=216)
    key = dataset_key(base)
    assert re.fullmatch(r"shapes64-216-[0-9a-f]{12}", key)
    how_it_runs = {"processes": 7, "threads": 3, "timeout_s": 1, "min_success_ratio": 0.1}
    assert dataset_key(base.model_copy(update={**how_it_runs, "dvc_push": False})) == key
    what_it_gets = [
        {"num_synthetic": 300},
        {"synthetic_seed": 1},
        {"image_size": 32},
        {"resize_mode": "border"},
        {"encode_format": "jpg"},
        {"shard_size": 10},
    ]
    keys = {dataset_key(base.model_copy(update=u)) for u in what_it_gets}
    assert len(keys) == len(what_it_gets) and key not in keys

    urls = tmp_path / "my urls (v2).csv"
    urls.write_text("url,caption\nhttp://x/a.png,a\n")
    listed = DataConfig(url_list=str(urls))
    key = dataset_key(listed)
    assert re.fullmatch(r"my_urls_v2-[0-9a-f]{12}", key)
    what_it_gets = [{"url_col": "u"}, {"caption_col": "c"}, {"allowed_url_schemes": ("https",)}]
    keys = {dataset_key(listed.model_copy(update=u)) for u in what_it_gets}
    urls.write_text("url,caption\nhttp://x/b.png,b\n")
    keys.add(dataset_key(listed))
    assert len(keys) == len(what_it_gets) + 1 and key not in keys


def test_a_failed_push_warns_once_and_the_next_run_pushes(
    dvc_project: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (dvc_project / "data").mkdir()
    (dvc_project / "data" / "a.txt").write_text("one")
    snapshot = add(dvc_project, "data")
    blocked = dvc_project.parent / "store-down"
    blocked.write_text("a file where the remote's folder should be")
    _dvc(dvc_project, "remote", "add", "team", str(blocked / "dvc"))
    monkeypatch.setenv("DALLE2_DVC_REMOTE", "team")
    with caplog.at_level(logging.WARNING, logger="dalle2.data.versioning"):
        assert not push(dvc_project, "data", snapshot)
    (warning,) = caplog.records
    assert "dvc push -r team data.dvc" in warning.getMessage()
    assert "the next run pushes it" in warning.getMessage()
    assert not any((dvc_project.parent / "remote").rglob("*")), "pushed to the default remote"
    blocked.unlink()  # the store is back
    assert push(dvc_project, "data", snapshot)
    assert any(blocked.rglob("*")), "the next push stored nothing"
    shutil.rmtree(blocked)  # a marker, not the remote, now says it was pushed
    assert push(dvc_project, "data", snapshot) and not blocked.exists()
    monkeypatch.setenv("DALLE2_DVC_REMOTE", "nowhere")
    with pytest.raises(VersioningError, match="DALLE2_DVC_REMOTE=nowhere names no DVC remote"):
        push(dvc_project, "data", snapshot)


def test_dataset_md5_names_one_folder_whatever_else_data_holds(dvc_project: Path) -> None:
    data = dvc_project / "data"
    files = {"a/x": "1", "a/sub/y": "2", "a2/x": "1", "a2/sub/y": "2", "ab/x": "1"}
    for rel, text in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text(text)
    add(dvc_project, "data")
    snapshot = snapshot_files(dvc_project, "data")
    assert snapshot is not None and set(snapshot) == set(files)
    a = dataset_md5(snapshot, "a")
    assert a is not None and dataset_md5(snapshot, "missing") is None
    assert dataset_md5(snapshot, "a2") == a  # the same bytes, whichever folder holds them
    assert dataset_md5(snapshot, "ab") != a  # "a/" is a folder prefix, not a string prefix

    (data / "b").mkdir()
    (data / "b" / "z").write_text("another source")
    add(dvc_project, "data")
    grown = snapshot_files(dvc_project, "data")
    assert grown is not None and "b/z" in grown and dataset_md5(grown, "a") == a
    (data / "a" / "x").write_text("edited")
    add(dvc_project, "data")
    edited = snapshot_files(dvc_project, "data")
    assert edited is not None and dataset_md5(edited, "a") != a


def _fake_download(folder: Path, cfg: DataConfig, n: int) -> None:
    """What matches_source takes for a finished download of `cfg`: a shard, stats, source."""
    folder.mkdir(parents=True)
    (folder / "00000.tar").write_bytes(b"shard")
    (folder / "00000_stats.json").write_text(json.dumps({"count": n, "successes": n}))
    (folder / SOURCE_FILE).write_text(json.dumps(source_fingerprint(cfg)))


def test_a_reused_dataset_is_versioned_as_it_now_is(
    dvc_project: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = DataConfig(num_synthetic=5, dvc_push=False)  # pushing is test_side_by_side's
    folder = dvc_project / "data" / dataset_key(cfg)
    _fake_download(folder, cfg, 5)
    first = prepare_dataset(cfg, dvc_project, progress=False)  # no data.dvc yet: added
    assert first.skipped and first.path == folder and first.stats.successes == 5
    assert first.snapshot_md5 == pointer_md5(dvc_project, "data")

    def no_add(*args: object, **kwargs: object) -> str:
        raise AssertionError("data/ matches data.dvc: no new snapshot")

    with monkeypatch.context() as m:
        m.setattr(download, "add", no_add)
        again = prepare_dataset(cfg, dvc_project, progress=False)
    assert (again.md5, again.snapshot_md5, again.skipped) == (first.md5, first.snapshot_md5, True)

    other = dvc_project / "data" / "another-source"
    other.mkdir()
    (other / "00000.tar").write_bytes(b"theirs")
    with caplog.at_level(logging.WARNING, logger="dalle2"):
        grown = prepare_dataset(cfg, dvc_project, progress=False)
    assert grown.md5 == first.md5 and grown.snapshot_md5 != first.snapshot_md5
    assert not caplog.records

    (folder / "00000.tar").write_bytes(b"edited by hand")
    with caplog.at_level(logging.WARNING, logger="dalle2"):
        edited = prepare_dataset(cfg, dvc_project, progress=False)
    assert edited.skipped and edited.md5 != first.md5
    assert edited.snapshot_md5 not in {first.snapshot_md5, grown.snapshot_md5}
    assert "differs from its last snapshot" in caplog.text
    assert is_in_sync(dvc_project, "data")


def test_install_across_filesystems_never_shows_a_half_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work, out = tmp_path / "downloads" / "k.partial", tmp_path / "data" / "k"
    work.mkdir(parents=True)
    (work / "00000.tar").write_bytes(b"shard")
    real_rename = os.rename

    def rename(src: Path, dst: Path) -> None:
        if Path(src) == work:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(src, dst)

    monkeypatch.setattr(download.os, "rename", rename)
    download._install(work, out)
    assert (out / "00000.tar").read_bytes() == b"shard"
    assert not work.exists() and [p.name for p in out.parent.iterdir()] == ["k"]


def test_unfinished_downloads_of_other_sources_go_unless_a_run_holds_them(
    tmp_path: Path,
) -> None:
    downloads = tmp_path / DOWNLOADS_DIR
    for key in ("mine", "crashed", "running"):
        (downloads / f"{key}.partial").mkdir(parents=True)
    held, release = threading.Event(), threading.Event()

    def other_run() -> None:
        with file_lock(tmp_path / LOCK_DIR / "download-running.lock", "test"):
            held.set()
            release.wait()

    thread = threading.Thread(target=other_run)
    thread.start()
    held.wait()
    try:
        download._drop_abandoned(tmp_path, keep="mine")
    finally:
        release.set()
        thread.join()
    assert sorted(p.name for p in downloads.iterdir()) == ["mine.partial", "running.partial"]


def test_file_lock_is_reentrant_and_makes_others_wait(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, order = tmp_path / "locks" / "x.lock", []

    def other_run() -> None:
        with file_lock(path, "another run is testing"):
            order.append("other")

    with caplog.at_level(logging.INFO, logger="dalle2"), file_lock(path, "test"):
        with file_lock(path, "test") as again:  # a second flock here would wait on itself
            assert again
        thread = threading.Thread(target=other_run)
        thread.start()
        for _ in range(500):
            if "waiting for" in caplog.text:
                break
            time.sleep(0.01)
        order.append("main")
    thread.join()
    assert order == ["main", "other"]
    assert f"waiting for {path} (another run is testing)" in caplog.text
