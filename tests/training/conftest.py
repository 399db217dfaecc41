"""Tiny training runs: a small synthetic dataset and the real configs, shrunk."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

TINY = [
    "model=unet_small",
    "model.features=[4,8]",
    "model.blocks_per_stage=[1,1]",
    "data.patch_size=[16,16,16]",
    "data.batch_size=2",
    "data.num_workers=1",
    "data.synthetic.num_cases=6",
    "data.synthetic.shape_range=[18,22]",
    "trainer.steps_per_epoch=3",
    "trainer.max_epochs=2",
    "trainer.max_val_cases=1",
    "trainer.progress=false",
    "final_evaluation=false",
]


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """A shared folder where the tiny synthetic dataset (and its cache) are made once."""
    return tmp_path_factory.mktemp("tiny_data")


@pytest.fixture
def make_cfg(tiny_data_root, tmp_path):
    """Compose ``conf/train.yaml`` with the tiny overrides, every path under tmp dirs."""

    def _make(*overrides: str, run_dir: Path | None = None):
        run_dir = run_dir or tmp_path / "run"
        with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
            cfg = compose(
                config_name="train",
                overrides=[
                    *TINY,
                    f"paths.root_dir={tiny_data_root}",
                    f"paths.data_dir={tiny_data_root}",
                    f"paths.output_dir={run_dir}",
                    *overrides,
                ],
            )
        return cfg

    return _make
