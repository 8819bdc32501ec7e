"""The model card says how a registered model samples, so whoever serves it knows the cost."""

from __future__ import annotations

from pathlib import Path

from dalle2.config import load_config
from dalle2.data.shards import DatasetRef
from dalle2.edges.tracking.model_card import model_card

REPO = Path(__file__).resolve().parents[1]


def test_card_lists_each_stage_with_its_sampling_and_reranking() -> None:
    cfg = load_config(REPO / "zenml_config.yaml")
    base, *ups = cfg.decoder
    cfg = cfg.model_copy(update={"decoder": [base.model_copy(update={"best_of": 4}), *ups]})
    data = DatasetRef(path="data/x", md5="abc", num_samples=10)
    metrics = {"unseen_captions/fidelity_all": 0.96875, "seen_captions/empty_canvas": 0.0}
    card = model_card(cfg, data, metrics, {"decoder_unet_0": 123})
    rows = [line for line in card.splitlines() if line.startswith("| decoder_unet_")]
    assert len(rows) == len(cfg.decoder)
    assert "| 123 |" in rows[0] and rows[0].endswith(", best of 4 |")
    assert all("best of" not in row for row in rows[1:])
    assert "| fidelity_all | 0.9688 |" in card
    assert "DVC md5 `abc`: 10 image-caption pairs" in card
