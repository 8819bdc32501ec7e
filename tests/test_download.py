"""img2dataset against a loopback HTTP server; DVC add/push/status in a temp repo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dalle2.config import DataConfig
from dalle2.data import iter_shard, load_pairs, shard_paths
from dalle2.download import (
    DownloadError,
    download_dataset,
    matches_source,
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
    samples = [s for p in shard_paths(tmp_path / "data") for s in iter_shard(p)]
    assert sorted(s.caption for s in samples) == sorted(f"c{i}" for i in range(12))
    assert all(s.image.shape == (64, 64, 3) for s in samples)
    assert matches_source(tmp_path / "data", cfg)
    images, keys, captions = load_pairs(tmp_path / "data")
    assert images.shape == (12, 64, 64, 3) and len(keys) == len(captions) == 12
    # image i is flat grey i * 20 and captioned c{i}: rows stay aligned
    grey = [int(im[32, 32, 0]) for im in images]
    assert all(abs(g - int(c[1:]) * 20) <= 3 for g, c in zip(grey, captions, strict=True))
    sub_images, sub_keys, sub_captions = load_pairs(tmp_path / "data", set(keys[:3]))
    assert sub_keys == keys[:3] and sub_captions == captions[:3]
    assert np.array_equal(sub_images, images[:3])


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
