"""benchmarks/withheld_pairs.py withholds whole colour-shape pairs from all training, through
the library's generic holdout rules, and nothing else of the default changes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from dalle2.config import parse_config
from dalle2.data import shapes64
from dalle2.data.shards import Holdout

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
