"""Every config group describes one object: each option of each group composes and instantiates
into its typed object; the data layer never sees a config."""

from pathlib import Path

import keras
import pytest
from hydra import compose, initialize_config_module

from segshare.cli import instantiate
from segshare.data.augment import AugmentSettings
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
    assert isinstance(data, DataSettings) and isinstance(data.augment, AugmentSettings)
    assert isinstance(data.synthetic, SyntheticSpec) and data.patch_size == [32, 32, 32]
    assert isinstance(settings, LoopSettings) and settings.jit_compile == "auto"
    assert settings.initial_lr == cfg.optimizer.learning_rate and settings.seed == cfg.seed
    assert isinstance(instantiate(cfg.window), WindowSettings)
    assert isinstance(instantiate(cfg.loss), DiceCELoss)
    assert isinstance(instantiate(cfg.optimizer), keras.optimizers.SGD)


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
        cfg = _train_cfg(f"{group}={option}")
        extra = {"in_channels": 1, "num_classes": 2} if group == "model" else {}
        assert instantiate(cfg[group], **extra) is not None, option


def test_the_hippocampus_recipe_has_one_patch_and_the_light_augmentation():
    cfg = _train_cfg("experiment=hippocampus")
    assert list(cfg.data.patch_size) == [40, 56, 40]
    light, default = instantiate(cfg.data.augment), instantiate(_train_cfg().data.augment)
    assert (light.rotation_deg, light.p_lowres, light.p_gamma) == (15.0, 0.0, 0.15)
    assert (default.rotation_deg, default.p_lowres, default.p_gamma) == (30.0, 0.25, 0.3)
    assert "patch_size" not in (CONF / "data" / "hippocampus.yaml").read_text()


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
