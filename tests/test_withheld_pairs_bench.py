"""benchmarks/withheld_pairs.py withholds whole colour-shape pairs from all training, through
the library's generic holdout rules, and nothing else of the default changes."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import yaml

from dalle2.config import parse_config
from dalle2.data import shapes64
from dalle2.data.shards import Holdout
from dalle2.edges.tracking.reproduce import checkout

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("withheld", REPO / "benchmarks" / "withheld_pairs.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_withheld_pairs_are_in_no_training_split_in_any_size_or_background() -> None:
    base = yaml.safe_load((REPO / "zenml_config.yaml").read_text())
    draws = [bench.draw_pairs(seed, 3) for seed in range(2)]
    assert draws[0] != draws[1], "two draws withhold different pairs"
    for pairs in draws:
        colours = {p.split()[0] for p in pairs}
        shapes = {p.split()[1] for p in pairs}
        assert len(colours) == len(shapes) == 3, "each colour and shape is still seen elsewhere"
        run = bench.withheld_config(base, pairs, "test")
        cfg = parse_config(run["parameters"]["config"])
        held = Holdout.of(cfg.data)
        assert ("holdout:colour_shape", "unseen_colour_shape") in held.sets
        captions = [s.caption for s in shapes64.all_specs()]
        for i, caption in enumerate(captions):
            spec_ = shapes64.parse_caption(caption)
            withheld = f"{spec_.color} {spec_.shape}" in pairs
            key = f"{i:09d}"
            assert held.keeps("holdout:colour_shape", key, caption) is withheld, caption
            if withheld:
                assert not held.keeps("train", key, caption), caption
        assert sum(held.keeps("holdout:colour_shape", "k", c) for c in captions) == 3 * len(
            shapes64.SIZES
        ) * len(shapes64.BACKGROUNDS)
        # the rest of the config is the default's: the same steps, another registry name
        default = base["parameters"]["config"]
        assert run["parameters"]["config"]["decoder"] == default["decoder"]
        assert cfg.registry.name != parse_config(default).registry.name


def test_an_override_sets_a_dotted_path_into_a_list() -> None:
    cfg = {"decoder": [{"text_drop_prob": 0.1}, {}]}
    bench.apply_override(cfg, "decoder.0.text_drop_prob=0.5")
    bench.apply_override(cfg, "prior.best_of=4")
    assert cfg == {"decoder": [{"text_drop_prob": 0.5}, {}], "prior": {"best_of": 4}}


def test_a_run_trains_the_checkout_as_it_is_in_a_worktree_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worktree a row trains in holds the uncommitted lever (modified and untracked
    files, deletions), not ignored files; writing there leaves the checkout alone."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    (repo / ".gitignore").write_text("ignored.txt\n")
    (repo / "lever.py").write_text("old\n")
    (repo / "gone.py").write_text("x\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "c"], cwd=repo, check=True)
    (repo / "lever.py").write_text("new\n")
    (repo / "gone.py").unlink()
    (repo / "pkg").mkdir()
    (repo / "pkg" / "added.py").write_text("a\n")
    (repo / "ignored.txt").write_text("i\n")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    tree = checkout(repo, head.stdout.strip(), tmp_path / "tree", "data")
    monkeypatch.setattr(bench, "ROOT", repo)
    bench._copy_changes(tree)
    assert (tree / "lever.py").read_text() == "new\n"
    assert (tree / "pkg" / "added.py").is_file()
    assert not (tree / "gone.py").exists() and not (tree / "ignored.txt").exists()
    (tree / "lever.py").write_text("written by the run\n")
    assert (repo / "lever.py").read_text() == "new\n"
