"""The standard FID path: torch-fidelity's InceptionV3 from a weight file (eval.inception_weights).

The weights are random (the real file cannot be downloaded here): the test proves the path
and the metric's name, not its value.
"""

from __future__ import annotations

import pytest
import torch
from torch_fidelity import feature_extractor_inceptionv3 as fe

from dalle2.evaluation import frechet_distance


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> str:
    """A weight file in torch-fidelity's format: the state dict of its own InceptionV3."""
    with pytest.MonkeyPatch.context() as mp:  # build the network without fetching weights
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def test_inception_weights_give_a_metric_named_fid(inception_weights) -> None:
    gen = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator())
    ref = torch.full((12, 3, 32, 32), 128, dtype=torch.uint8)
    ref[:, 0] = torch.arange(12, dtype=torch.uint8)[:, None, None] * 20
    out = frechet_distance(gen, ref, inception_weights=inception_weights, batch_size=6)
    assert set(out) == {"fid"} and out["fid"] > 0
    same = frechet_distance(ref, ref, inception_weights=inception_weights, batch_size=6)
    assert abs(same["fid"]) < 1e-3 * out["fid"]  # a distance: zero between equal sets


def test_a_pickled_program_is_not_loaded_as_inception_weights(tmp_path) -> None:
    evil = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(1), "hook": print}, evil)  # a callable: not a tensor
    with pytest.raises(ValueError, match="not an InceptionV3 state dict of plain tensors"):
        frechet_distance(
            torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
            torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
            inception_weights=str(evil),
        )
