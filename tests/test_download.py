"""img2dataset against a loopback HTTP server; DVC add/push/status in a temp repo."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dalle2 import download
from dalle2.config import DataConfig
from dalle2.download import (
    PARTIAL_SOURCE_FILE,
    DownloadError,
    download_dataset,
    matches_source,
    read_stats,
    read_url_list,
    serve_directory,
)
from dalle2.versioning import (
    VersioningError,
    add_and_push,
    find_project_root,
    is_in_sync,
    pointer_md5,
)


class _Sample(NamedTuple):
    key: str
    caption: str
    image: np.ndarray
    url: str


def _read_samples(tars: Iterable[Path]) -> list[_Sample]:
    """The samples img2dataset wrote into webdataset tars, sorted by key.

    Read here with tarfile rather than through dalle2.data, so these tests pin down what
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


def test_disallowed_url_schemes_are_refused_and_counted(tmp_path: Path) -> None:
    site = _site(tmp_path)
    secret = tmp_path / "secret.png"  # a real image on the pipeline machine's disk
    Image.fromarray(np.full((64, 64, 3), 250, np.uint8)).save(secret)
    with serve_directory(site) as base:
        rows = [(f"{base}/{i}.png", f"c{i}") for i in range(4)] + [
            (secret.as_uri(), "file"),
            (f"<URL:{secret.as_uri()}>", "wrapped file"),  # urllib unwraps and opens this
            ("ftp://127.0.0.1:1/x.png", "ftp"),
        ]
        pd.DataFrame(rows, columns=["url", "caption"]).to_parquet(tmp_path / "urls.parquet")
        cfg = DataConfig(
            url_list=str(tmp_path / "urls.parquet"),
            processes=1,
            threads=4,
            min_success_ratio=0.5,
            timeout_s=5,
        )
        stats = download_dataset(cfg, tmp_path / "data", tmp_path / "cache", progress=False)
    assert (stats.count, stats.successes, stats.failed_to_download) == (7, 4, 3)
    assert stats.reasons == {
        "url scheme 'file' not allowed (data.allowed_url_schemes)": 2,
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
    assert not (tmp_path / "data").exists() and not (tmp_path / "data.partial").exists()


class _CrashError(Exception):
    pass


def test_rerun_after_crash_fetches_only_unfinished_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = DataConfig(num_synthetic=30, shard_size=10, processes=1, threads=4, timeout_s=5)
    data, partial = tmp_path / "data", tmp_path / "data.partial"
    real_run = download.run_img2dataset

    def run_then_crash(*args: object, **kwargs: object) -> None:
        real_run(*args, **kwargs)
        raise _CrashError

    monkeypatch.setattr(download, "run_img2dataset", run_then_crash)
    with pytest.raises(_CrashError):
        download_dataset(cfg, data, tmp_path / "cache", progress=False)
    monkeypatch.setattr(download, "run_img2dataset", real_run)
    assert not data.exists()
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
    stats = download_dataset(cfg, data, tmp_path / "cache", progress=False)

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


def test_partial_from_another_source_is_discarded(tmp_path: Path) -> None:
    partial = tmp_path / "data.partial"
    partial.mkdir()
    (partial / PARTIAL_SOURCE_FILE).write_text(json.dumps({"url_list": "another"}))
    (partial / "00000.tar").write_bytes(b"")
    (partial / "00000_stats.json").write_text(json.dumps({"count": 99, "successes": 99}))
    site = _site(tmp_path)
    with serve_directory(site) as base:
        urls = pd.DataFrame({"url": [f"{base}/{i}.png" for i in range(3)], "caption": "x"})
        urls.to_parquet(tmp_path / "urls.parquet")
        cfg = DataConfig(url_list=str(tmp_path / "urls.parquet"), processes=1, threads=2)
        stats = download_dataset(cfg, tmp_path / "data", tmp_path / "cache", progress=False)
    assert (stats.count, stats.successes) == (3, 3)
    assert len(_read_samples([tmp_path / "data" / "00000.tar"])) == 3


def test_pyspark_distributor_needs_pyspark(tmp_path: Path) -> None:
    if importlib.util.find_spec("pyspark") is not None:
        pytest.skip("pyspark is installed")
    cfg = DataConfig(distributor="pyspark", num_synthetic=4)
    with pytest.raises(DownloadError, match=r"`pip install pyspark`.*local\[N\]") as err:
        download_dataset(cfg, tmp_path / "data", tmp_path / "cache", progress=False)
    assert str(err.value).count(". ") == 0 and "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())  # checked before any work


def test_low_success_ratio_stops_with_one_sentence_and_keeps_old_data(tmp_path: Path) -> None:
    old = tmp_path / "data"
    old.mkdir()
    (old / "keep.txt").write_text("previous download")
    urls = pd.DataFrame({"url": ["http://127.0.0.1:1/a.png"] * 4, "caption": ["x"] * 4})
    urls.to_parquet(tmp_path / "urls.parquet")
    cfg = DataConfig(url_list=str(tmp_path / "urls.parquet"), processes=1, threads=2, timeout_s=2)
    with pytest.raises(DownloadError, match=r"only 0 of 4 images downloaded.*refused"):
        download_dataset(cfg, old, tmp_path / "cache", progress=False)
    assert (old / "keep.txt").read_text() == "previous download"


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
    md5 = add_and_push(root, "data")
    assert md5 == pointer_md5(root, "data") and md5.endswith(".dir")
    assert is_in_sync(root, "data")
    assert any((tmp_path / "remote").rglob("*")), "push stored nothing in the remote"
    (root / "data" / "a.txt").write_text("changed")
    assert not is_in_sync(root, "data")
    # the snapshot comes back from the remote after the local copy and cache are gone
    import shutil

    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    _dvc(root, "pull", "-q")
    assert (root / "data" / "a.txt").read_text() == "one"
    assert is_in_sync(root, "data")


def test_a_url_list_inside_the_data_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "urls.csv").write_text("url,caption\nhttp://127.0.0.1:1/a.png,a\n")
    cfg = DataConfig(url_list=str(tmp_path / "data" / "urls.csv"))
    with pytest.raises(DownloadError, match=r"lies inside .* keep the URL list outside"):
        download_dataset(cfg, tmp_path / "data", tmp_path / "cache", progress=False)
    assert (tmp_path / "data" / "urls.csv").is_file()
