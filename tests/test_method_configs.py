"""Each trained method's own config (TrainConfig.model is the method's dataclass, named by the registry), older
run configs still read, and the threshold `kano train` calibrates from the shared ranking curve (core/curves.py)."""

import json

import pytest
import torch

from kano.core.curves import f1_threshold
from kano.kanoclip import ModelConfig, build_backbone, build_model
from kano.kanoclip.anomalyclip import AnomalyCLIPConfig
from kano.kanoclip.aprilgan import AprilGANConfig
from kano.trainer import TrainConfig
from kano.trainer.train import config_differences


def test_each_method_gets_its_own_config():
    assert type(TrainConfig(data="_").model) is ModelConfig
    assert TrainConfig(data="_", method="aprilgan").model == AprilGANConfig()
    cfg = TrainConfig(data="_", method="anomalyclip", model={"n_ctx": 8, "t_n_ctx": 2})
    assert cfg.model == AnomalyCLIPConfig(n_ctx=8, t_n_ctx=2)
    assert cfg.to_dict()["model"]["n_ctx"] == 8
    model = build_model("anomalyclip", build_backbone("tiny", image_size=32), cfg.model)
    assert model.cfg.n_ctx == 8 and model.cfg.t_n_ctx == 2  # the configured peer is what gets built


@pytest.mark.parametrize("kw, message", [
    ({"method": "aprilgan", "model": {"use_vv": False}}, "KAnoCLIP's model options (use_vv) apply to method kanoclip only"),
    ({"method": "aprilgan", "model": {"n_ctx": 3, "zz": 1}}, "model config keys must be among logit_scale, focal_gamma, focal_smooth (aprilgan's), got n_ctx, zz"),
    ({"method": "anomalyclip", "model": AprilGANConfig()}, "model must be anomalyclip's config AnomalyCLIPConfig, got a AprilGANConfig"),
])
def test_a_config_that_is_not_the_methods_is_refused(kw, message):
    with pytest.raises(ValueError) as e:
        TrainConfig(data="_", **kw)
    assert message in str(e.value)


def test_an_older_peer_run_config_still_reads_and_resumes():
    """Runs written when every method recorded KAnoCLIP's defaults as "model" read as the peer's defaults, and
    --resume sees no difference; a real difference is still reported."""
    now = json.loads(json.dumps(TrainConfig(data="_", method="aprilgan").to_dict()))
    old = {**now, "model": json.loads(json.dumps(ModelConfig().to_dict()))}
    assert TrainConfig(**{**old, "betas": tuple(old["betas"])}).model == AprilGANConfig()
    assert config_differences(old, now) == []
    assert config_differences({**now, "model": {"logit_scale": 50.0, "focal_gamma": 2.0}}, now) == ["model.logit_scale: 50.0 -> 100.0"]


@pytest.mark.parametrize("labels, scores, want", [
    # F1 at 0.8: 2/3; at 0.4: 1/2; at 0.35: 4/5 (best); at 0.1: 2/3 -> midway between 0.35 and 0.1
    ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.225),
    # a tie of a normal and an anomalous image at 0.5: F1 1/2 there, 4/5 at 0.2, the lowest score -> 0.2 itself
    ([1, 0, 1], [0.5, 0.5, 0.2], 0.2),
    # equal best F1 (2/3 at 0.9 and at 0.1): the higher threshold, midway to 0.8
    ([1, 0, 0, 1], [0.9, 0.8, 0.7, 0.1], 0.85),
    ([1, 1], [0.3, 0.6], 0.5),       # one class only: no threshold to learn
])
def test_the_calibrated_threshold_is_the_best_f1_midpoint(labels, scores, want):
    assert f1_threshold(torch.tensor(labels, dtype=torch.float32), torch.tensor(scores)) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("method", ["aprilgan", "anomalyclip"])
def test_the_focal_loss_smoothing_is_a_recorded_setting_and_bad_values_are_refused(method):
    cls = {"aprilgan": AprilGANConfig, "anomalyclip": AnomalyCLIPConfig}[method]
    assert cls().to_dict()["focal_smooth"] == 1e-5  # the authors' loss.py FocalLoss(smooth=1e-5)
    assert cls(focal_smooth=0.0).focal_smooth == 0.0
    for bad in (-1e-3, 0.5, True, "x"):
        with pytest.raises(ValueError, match="focal_smooth must be a number in"):
            cls(focal_smooth=bad)
