"""img2dataset's pyspark distributor on a local[2] Spark session, against a loopback server.

The product's download path (dalle2.data.download.download_dataset, which hands
data.distributor to img2dataset) runs the same URL list twice, once per distributor, and
the shards must be valid webdataset tars holding the same samples byte for byte: the same
keys, captions, image bytes and per-sample json. They are compared member by member, not
as files: img2dataset writes a shard's samples in the order its download threads finish,
so two runs (of either distributor) order a tar's members differently, and the per-shard
*_stats.json differ in their times.

img2dataset uses the active SparkSession when one exists (it starts a local[N] one itself
only when none does, with 16 GB of driver memory), so the session is made here, small.
Needs `pip install pyspark` and Java (17+ for pyspark 4); skipped without them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dalle2.config import DataConfig
from dalle2.data.download import download_dataset, read_stats, serve_directory

pytestmark = pytest.mark.spark

N_GOOD, SHARD_SIZE = 20, 8  # 21 rows with the missing one: shards of 8, 8 and 5 rows
JOB_GROUP = "img2dataset-test"


def _java_major() -> int | None:
    """The major version of the `java` that pyspark would launch, None when there is none."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 else major  # "1.8.0" is Java 8


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    pyspark = pytest.importorskip(
        "pyspark", reason="pyspark is not installed (pip install pyspark)"
    )
    java = _java_major()
    if java is None:
        pytest.skip("no Java for pyspark (apt-get install default-jre-headless)")
    needed = 17 if int(pyspark.__version__.split(".")[0]) >= 4 else 8
    if java < needed:
        pytest.skip(f"pyspark {pyspark.__version__} needs Java {needed}+, found Java {java}")
    from pyspark.sql import SparkSession

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYSPARK_PYTHON", sys.executable)  # workers import img2dataset from here
        mp.setenv("PYSPARK_DRIVER_PYTHON", sys.executable)
        mp.setenv("SPARK_LOCAL_IP", "127.0.0.1")  # loopback only
        session = (
            SparkSession.builder.master("local[2]")
            .appName("dalle2-pyspark-download-test")
            .config("spark.driver.memory", "1g")
            # a JVM that starts fast (C1 only, serial GC): halves the session's start here
            .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .getOrCreate()
        )
        session.sparkContext.setLogLevel("ERROR")
        try:
            yield session
        finally:
            session.stop()


def _site(root: Path) -> Path:
    """N_GOOD distinct noise images: equal image bytes cannot happen by chance."""
    site = root / "site"
    site.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_GOOD):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), np.uint8)).save(site / f"{i}.png")
    return site


def _tar_members(tars: list[Path]) -> dict[str, bytes]:
    """Every file of the shards by 'shard/member name', checking webdataset's layout:
    each key has exactly .png, .txt and .json members, grouped together."""
    members: dict[str, bytes] = {}
    for path in tars:
        with tarfile.open(path) as tar:
            names = [m.name for m in tar if m.isfile()]
            for m in tar:
                if m.isfile():
                    members[f"{path.name}/{m.name}"] = tar.extractfile(m).read()
        keys = [n.rpartition(".")[0] for n in names]
        groups = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
        assert len(groups) == len(set(groups)), f"{path.name}: a key's files are not together"
        for key in groups:
            exts = sorted(n.rpartition(".")[2] for n in names if n.rpartition(".")[0] == key)
            assert exts == ["json", "png", "txt"], f"{path.name}/{key}: {exts}"
    return members


def _download(
    distributor: str, url_list: Path, out: Path, cache: Path
) -> tuple[list[Path], dict[str, bytes]]:
    cfg = DataConfig(
        url_list=str(url_list),
        distributor=distributor,
        # local[2] gives the pyspark run its 2 workers; the reference run takes 1 process
        # (each imports img2dataset, ~5 s of CPU): the process count changes no bytes
        processes=2 if distributor == "pyspark" else 1,
        threads=4,
        shard_size=SHARD_SIZE,
        image_size=32,
        min_success_ratio=0.5,
        timeout_s=10,
        dvc_push=False,
    )
    stats = download_dataset(cfg, out, cache, progress=False)
    assert (stats.count, stats.successes, stats.failed_to_download) == (N_GOOD + 1, N_GOOD, 1)
    assert read_stats(out) == stats
    tars = sorted(out.glob("*.tar"))
    return tars, _tar_members(tars)


def test_pyspark_distributor_writes_the_same_shards_as_multiprocessing(
    spark, tmp_path: Path
) -> None:
    site = _site(tmp_path)
    with serve_directory(site) as base:  # one server: the json sidecars hold the URL
        urls = [f"{base}/{i}.png" for i in range(N_GOOD)]
        urls.insert(5, f"{base}/missing.png")  # a 404 in the first shard
        captions = [f"caption {i}" for i in range(len(urls))]
        pd.DataFrame({"url": urls, "caption": captions}).to_parquet(tmp_path / "urls.parquet")

        sc = spark.sparkContext
        sc.setJobGroup(JOB_GROUP, "img2dataset download")
        try:
            spark_tars, spark_files = _download(
                "pyspark", tmp_path / "urls.parquet", tmp_path / "spark", tmp_path / "cache"
            )
        finally:
            sc.setLocalProperty("spark.jobGroup.id", None)
        # the shards really went through Spark: one job per batch of shards, all succeeded
        jobs = sc.statusTracker().getJobIdsForGroup(JOB_GROUP)
        assert jobs, "img2dataset ran no Spark job: it did not use the session"
        assert all(sc.statusTracker().getJobInfo(j).status == "SUCCEEDED" for j in jobs)

        mp_tars, mp_files = _download(
            "multiprocessing", tmp_path / "urls.parquet", tmp_path / "mp", tmp_path / "cache"
        )

    assert (
        [p.name for p in spark_tars]
        == [p.name for p in mp_tars]
        == [
            "00000.tar",
            "00001.tar",
            "00002.tar",
        ]
    )
    # same members (keys and kinds), same bytes: images, captions and per-sample json
    assert sorted(spark_files) == sorted(mp_files)
    differing = [name for name in spark_files if spark_files[name] != mp_files[name]]
    assert not differing, f"pyspark and multiprocessing shards differ in {differing[:5]}"

    # and the content is right: caption i with image i, resized to 32x32
    samples = {}
    for name, data in spark_files.items():
        if name.endswith(".json"):
            meta = json.loads(data)
            key = name.removesuffix(".json")
            samples[key] = (meta, spark_files[f"{key}.txt"].decode(), spark_files[f"{key}.png"])
    assert len(samples) == N_GOOD
    per_shard = [sum(k.startswith(t.name) for k in samples) for t in spark_tars]
    assert per_shard == [7, 8, 5]  # shard 0 lost the 404 row
    for meta, caption, png in samples.values():
        source = site / meta["url"].rsplit("/", 1)[1]
        assert meta["status"] == "success"
        assert meta["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert caption == captions[urls.index(meta["url"])]
        assert Image.open(io.BytesIO(png)).size == (32, 32)
