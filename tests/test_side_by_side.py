"""Pipeline runs side by side: real processes, img2dataset and DVC in one project.

Each run is a subprocess calling prepare_dataset; the runs wait at a file barrier and then
start at once, so they really do meet at the same folders and locks. One test with three
runs covers both cases (same source, other source) in the time of one download.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

from dalle2.data.versioning import dataset_md5, is_in_sync, snapshot_files

_RUN = """
import json, logging, sys, time
from pathlib import Path
from dalle2.config import DataConfig
from dalle2.data.download import prepare_dataset

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
root, barrier, me, n, runs = sys.argv[1:]
(Path(barrier) / me).touch()
while len(list(Path(barrier).iterdir())) < int(runs):
    time.sleep(0.01)
cfg = DataConfig(
    num_synthetic=int(n), image_size=16, shard_size=8, processes=1, threads=4, timeout_s=10
)
got = prepare_dataset(cfg, Path(root), progress=False)
print(json.dumps({
    "path": str(got.path), "md5": got.md5, "snapshot": got.snapshot_md5,
    "skipped": got.skipped, "successes": got.stats.successes,
}))
"""


def _run_at_once(root: Path, sizes: list[int]) -> list[tuple[dict, str]]:
    """Run prepare_dataset for each shapes64 size at once; (result, log) per run, in order."""
    barrier = root.parent / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RUN, str(root), str(barrier), str(i), str(n), str(len(sizes))],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, n in enumerate(sizes)
    ]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out.append((json.loads(stdout.strip().splitlines()[-1]), stderr))
    return out


def _samples(folder: Path) -> list[str]:
    """The captions in a dataset folder's shards, read with tarfile."""
    captions = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            captions += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]
    return captions


def _in_remote(remote: Path, snapshot: str) -> bool:
    return (remote / "files" / "md5" / snapshot[:2] / snapshot[2:]).is_file()


def test_runs_at_once_download_each_source_once_and_keep_their_own(dvc_project: Path) -> None:
    """Three runs at once: two of one source (216-like) and one of another (300-like)."""
    runs = _run_at_once(dvc_project, [24, 30, 24])
    (a, a_log), (other, _), (b, b_log) = runs
    # the same source: one run downloads, the other waits at its lock and reuses the folder
    assert sorted([a["skipped"], b["skipped"]]) == [False, True]
    assert a["path"] == b["path"] and a["md5"] == b["md5"]
    assert ["another run is downloading the same data" in log for log in (a_log, b_log)] == [
        a["skipped"],
        b["skipped"],
    ]
    # the other source: its own folder and md5, downloaded meanwhile
    assert not other["skipped"] and other["path"] != a["path"] and other["md5"] != a["md5"]
    for got, n in ((a, 24), (b, 24), (other, 30)):
        folder = Path(got["path"])
        assert got["successes"] == n and len(_samples(folder)) == n
        assert json.loads((folder / "source.json").read_text())["shapes64"]["num_images"] == n
        assert _in_remote(dvc_project.parent / "remote", got["snapshot"])
    # the last snapshot holds both, and adding one did not change the other's md5
    files = snapshot_files(dvc_project, "data")
    assert files is not None
    for got in (a, other):
        assert dataset_md5(files, Path(got["path"]).name) == got["md5"]
    assert sorted(p.name for p in (dvc_project / "data").iterdir()) == sorted(
        Path(got["path"]).name for got in (a, other)
    )
    assert is_in_sync(dvc_project, "data")
    assert not any((dvc_project / ".cache" / "downloads").iterdir())
