"""``segshare-train``: the training app (Hydra over ``conf/train.yaml``).

``train(cfg)`` is the testable entry point: it instantiates the config groups and wires them;
``main`` is the thin Hydra wrapper. A run folder gets ``model.keras`` (best validation Dice),
``plan.json`` and ``run.json`` (the trained-run contract: preprocessing, window, channels,
labels), ``config.yaml`` and ``parameters.json`` (the record), ``checkpoints/{latest,best}``,
``train_log.csv``, ``tensorboard/`` and ``validation/``. Running the same command on the same run
folder resumes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from segshare.cli import exit_on_user_error, instantiate
from segshare.data.pipeline import TrainingFeed
from segshare.data.prepare import prepare_dataset
from segshare.data.validation import DatasetError
from segshare.models import check_patch_size, format_parameter_report, parameter_report
from segshare.training.loop import Trainer, TrainingDiverged
from segshare.training.run_folder import check_resumable, write_run_files
from segshare.training.strategy import configure_runtime, is_chief, make_strategy, with_loss_scaling
from segshare.training.validation import evaluate_fold


def train(cfg: DictConfig) -> tuple[dict, dict[str, Any]]:
    """Train (or resume) the run described by ``cfg``; returns (last metrics row, objects)."""
    settings = instantiate(cfg.trainer)
    strategy = make_strategy(settings.strategy)  # before any other TensorFlow work
    configure_runtime(settings.seed, settings.precision, settings.deterministic)
    data, window = instantiate(cfg.data), instantiate(cfg.window)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_patch_size(data.patch_size, len(cfg.model.features), int(cfg.model.spatial_dims))
    prepared = prepare_dataset(data, progress=settings.progress)
    plan = prepared.plan
    check_resumable(run_dir, plan)
    with strategy.scope():
        model = instantiate(cfg.model, in_channels=plan.in_channels, num_classes=plan.num_classes)
        optimizer = instantiate(cfg.optimizer, global_clipnorm=settings.grad_clip_norm)
        optimizer = with_loss_scaling(optimizer, settings.precision)
        optimizer.build(model.trainable_variables)
    report = parameter_report(model)
    print(format_parameter_report(report))
    feed = TrainingFeed(
        prepared, data, settings.seed, settings.steps_per_epoch, settings.max_val_cases
    )
    if is_chief(strategy):
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        write_run_files(run_dir, plan, feed.patch_size, report, config_yaml)
    loss = instantiate(cfg.loss)
    trainer = Trainer(model, optimizer, loss, feed, run_dir, settings, window, strategy=strategy)
    last = trainer.fit()
    objects = {"model": model, "run_dir": run_dir, "prepared": prepared, "report": report}
    if cfg.final_evaluation and is_chief(strategy) and prepared.val_ids:
        summary = evaluate_fold(run_dir, prepared, window, progress=settings.progress)
        last["final_val_dice_fg_mean"] = summary["foreground_mean"].get("Dice", float("nan"))
        objects["summary"] = summary
    return last, objects


@hydra.main(version_base="1.3", config_path="pkg://segshare.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    with exit_on_user_error(
        "segshare-train", [(DatasetError, 2), ((TrainingDiverged, ValueError), 1)]
    ):
        train(cfg)


def main() -> None:
    """Console entry point ``segshare-train``."""
    _hydra_main()


if __name__ == "__main__":
    main()
