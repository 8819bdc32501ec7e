"""Configs with typos and bad values are rejected with one clear sentence."""

from __future__ import annotations

from pathlib import Path

import pytest

from dalle2.config import ConfigError, load_config, parse_config
from dalle2.edges.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_are_valid() -> None:
    for path in [
        REPO / "zenml_config.yaml",
        *sorted((REPO / "configs").glob("*.yaml")),
        REPO / "tests" / "configs" / "tiny.yaml",
    ]:
        assert load_config(path).decoder, path


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"data": {"num_synthtic": 5}}, r"'data.num_synthtic': unknown key"),
        ({"prior": {"diffusion": {"prediction": "noise"}}}, r"prior.diffusion.prediction"),
        ({"prior": {"train": {"lr": -1}}}, r"prior.train.lr"),
        ({"decoder": []}, "at least one stage"),
        (
            {"decoder": [{"image_size": 32, "lowres_size": 16, "unet": {"lowres_cond": True}}]},
            "first decoder stage",
        ),
        ({"decoder": [{"image_size": 30}]}, "image_size must divide"),
        ({"decoder": [{"unet": {"attn_levels": [7]}}]}, r"attn_levels \[7\]"),
        ({"clip": {"pretrained_weights": "openai"}}, "needs pretrained_model"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_values_are_rejected(patch: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        parse_config(patch)
    assert "\n" not in str(err.value)


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("parameters:\n  config:\n    prior: {train: {stepz: 3}}\n")
    assert main(["check-config", str(bad)]) == 2
    assert "prior.train.stepz" in capsys.readouterr().err
    assert main(["check-config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["check-config", str(REPO / "zenml_config.yaml")]) == 0
