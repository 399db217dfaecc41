"""Every config group describes one object: each option of each group composes and instantiates
into its typed object; the data layer never sees a config."""

from pathlib import Path

import keras
import pytest
from hydra import compose, initialize_config_module

from segshare.cli import instantiate
from segshare.data.augment import AugmentByLength, AugmentSettings
from segshare.data.prepare import DataSettings
from segshare.data.synthetic import SyntheticSpec
from segshare.inference.sliding_window import WindowSettings
from segshare.losses import DiceCELoss
from segshare.training.loop import LoopSettings

CONF = Path(__file__).resolve().parents[1] / "conf"


def _train_cfg(*overrides: str):
    with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
        return compose("train", overrides=["paths.root_dir=/r", "paths.output_dir=/o", *overrides])


def test_train_config_groups_instantiate_into_their_objects():
    cfg = _train_cfg()
    data, settings = instantiate(cfg.data), instantiate(cfg.trainer)
    assert isinstance(data, DataSettings) and isinstance(data.augment, AugmentByLength)
    assert isinstance(data.synthetic, SyntheticSpec)
    assert data.patch_size is None and data.batch_size is None  # planned
    assert cfg.model.features is None and cfg.model.blocks_per_stage is None
    assert isinstance(settings, LoopSettings) and settings.jit_compile == "auto"
    assert settings.initial_lr == cfg.optimizer.learning_rate and settings.seed == cfg.seed
    assert isinstance(instantiate(cfg.window), WindowSettings)
    assert isinstance(instantiate(cfg.loss), DiceCELoss)
    assert isinstance(instantiate(cfg.optimizer), keras.optimizers.AdamW)
    assert cfg.plan.compute_gflops == "auto"


@pytest.mark.parametrize("scheme", sorted(p.stem for p in (CONF / "sharing").glob("*.yaml")))
def test_the_sharing_group_is_a_group_of_the_model(scheme):
    cfg = _train_cfg(f"sharing={scheme}", "model.features=[4,8]", "model.blocks_per_stage=[1,2]")
    assert cfg.model.sharing == scheme
    model = instantiate(cfg.model, in_channels=1, num_classes=2)
    assert model.get_layer("encoder").sharing == scheme


@pytest.mark.parametrize(
    "group", ["optimizer", "loss", "model", "data"], ids=lambda g: f"every {g} option"
)
def test_every_option_of_a_group_instantiates(group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        tiny = ["model.features=[4,8]", "model.blocks_per_stage=[1,1]"] if group == "model" else []
        cfg = _train_cfg(f"{group}={option}", *tiny)
        extra = {"in_channels": 1, "num_classes": 2} if group == "model" else {}
        assert instantiate(cfg[group], **extra) is not None, option


def test_the_hippocampus_recipe_is_a_budget_and_the_rest_is_planned():
    cfg = _train_cfg("experiment=hippocampus")
    assert cfg.trainer.budget_minutes == 45
    planned = ("data.patch_size", "data.batch_size", "model.features", "model.blocks_per_stage")
    for key in planned:
        section, name = key.split(".")
        assert cfg[section][name] is None, key
    default = instantiate(_train_cfg("data/augment=default").data.augment)  # nnU-Net's
    assert (default.rotation_deg, default.p_lowres, default.p_gamma) == (30.0, 0.25, 0.3)
    light = instantiate(_train_cfg("data/augment=light").data.augment)
    assert (light.rotation_deg, light.p_lowres, light.p_gamma) == (15.0, 0.0, 0.15)
    # the default chooses between exactly those two sets by the run's length
    auto = instantiate(_train_cfg().data.augment)
    assert isinstance(auto, AugmentByLength) and isinstance(default, AugmentSettings)
    assert auto.full == default and auto.light == light
    assert (
        auto.for_steps(3550) is auto.light and auto.for_steps(auto.light_below_steps) is auto.full
    )
    assert "light (3,550 steps < data.augment.light_below_steps=10,000)" in auto.describe(3550)
    tuned = instantiate(_train_cfg("data.augment.light.p_rotation=0.5").data.augment)
    assert tuned.light.p_rotation == 0.5 and tuned.full == default


def test_a_bad_setting_is_its_own_one_line_error():
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\), got 1.5"):
        instantiate(_train_cfg("window.overlap=1.5").window)
    with pytest.raises(ValueError, match=r"data.fold must be in \[0, 4\] or 'all', got 7"):
        instantiate(_train_cfg("data.fold=7").data)


def test_the_data_layer_never_sees_a_config():
    data = Path(__file__).resolve().parents[1] / "segshare" / "data"
    for path in data.glob("*.py"):
        text = path.read_text()
        assert "OmegaConf" not in text and "DictConfig" not in text, path.name
