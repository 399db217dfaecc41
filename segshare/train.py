"""``segshare-train``: the training app (Hydra over ``conf/train.yaml``).

``train(cfg)`` is the testable entry point: it instantiates the config groups and wires them;
``main`` is the thin Hydra wrapper. A run folder gets ``model.keras`` (best validation Dice),
``plan.json`` and ``run.json`` (the trained-run contract: preprocessing, window, channels,
labels), ``config.yaml`` and ``parameters.json`` (the record), ``checkpoints/{latest,best}``,
``train_log.csv``, ``tensorboard/`` and ``validation/``. Running the same command on the same run
folder resumes it; a folder holding a trained run without a whole checkpoint to resume from is
refused (``trainer.resume_from=best`` resumes from ``checkpoints/best``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from segshare.cli import exit_on_user_error, instantiate
from segshare.data.pipeline import TrainingFeed
from segshare.data.planner import (
    PLANNED_SETTINGS,
    Configuration,
    apply_configuration,
    format_configurations,
)
from segshare.data.prepare import DataSettings, prepare_dataset
from segshare.data.preprocessing import Plan
from segshare.data.validation import DatasetError
from segshare.devices import resolve_precision
from segshare.models import check_patch_size, format_parameter_report, parameter_report
from segshare.training.loop import Trainer, TrainingDiverged
from segshare.training.run_folder import check_resumable, check_same_training, write_run_files
from segshare.training.strategy import (
    check_backend,
    check_batch_split,
    configure_runtime,
    is_chief,
    make_strategy,
    with_loss_scaling,
)
from segshare.training.validation import evaluate_fold


def train(cfg: DictConfig) -> tuple[dict, dict[str, Any]]:
    """Train (or resume) the run described by ``cfg``; returns (last metrics row, objects)."""
    settings = instantiate(cfg.trainer)
    check_backend(settings.strategy, settings.precision)  # before any work
    strategy = make_strategy(settings.strategy)  # before any other TensorFlow (or JAX) work
    precision, why = resolve_precision(settings.precision, training=True)
    print(f"precision: {precision} ({why})")
    settings = replace(settings, precision=precision)
    configure_runtime(settings.seed, settings.precision, settings.deterministic)
    data, window = instantiate(cfg.data), instantiate(cfg.window)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare_dataset(data, settings.progress, planner=instantiate(cfg.plan))
    plan = prepared.plan
    resuming = check_resumable(run_dir, plan, settings.resume_from)  # before anything is written
    data, planned, slice_axis = planned_settings(plan, str(cfg.configuration), data, cfg.model)
    check_batch_split(strategy, data.batch_size)
    split = {
        "fold": data.fold,
        "num_folds": int(data.num_folds),
        "train_cases": list(prepared.train_ids),
        "validation_cases": list(prepared.val_ids),
    }
    network = {
        "configuration": str(cfg.configuration),
        "patch_size": list(data.patch_size),
        "batch_size": int(data.batch_size),
        **planned,
    }
    if resuming is not None:
        check_same_training(run_dir, split, network)
    with strategy.scope():
        model = instantiate(
            cfg.model, in_channels=plan.in_channels, num_classes=plan.num_classes, **planned
        )
        optimizer = instantiate(cfg.optimizer, global_clipnorm=settings.grad_clip_norm)
        optimizer = with_loss_scaling(optimizer, settings.precision)
        optimizer.build(model.trainable_variables)
    report = parameter_report(model)
    print(format_parameter_report(report))
    feed = TrainingFeed(
        prepared, data, settings.seed, settings.steps_per_epoch, settings.max_val_cases, slice_axis
    )
    if is_chief(strategy):
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        write_run_files(
            run_dir, plan, feed.patch_size, report, config_yaml, cfg.configuration, slice_axis,
            split, network, precision=settings.precision,
        )  # fmt: skip
    loss = instantiate(cfg.loss, regions=plan.region_values)
    trainer = Trainer(model, optimizer, loss, feed, run_dir, settings, window, strategy=strategy)
    last = trainer.fit()
    objects = {"model": model, "run_dir": run_dir, "prepared": prepared, "report": report}
    if cfg.final_evaluation and is_chief(strategy) and prepared.val_ids:
        summary = evaluate_fold(
            run_dir,
            prepared,
            window,
            progress=settings.progress,
            save_probabilities=bool(cfg.save_validation_probabilities),
        )
        last["final_val_dice_fg_mean"] = summary["foreground_mean"].get("Dice", float("nan"))
        objects["summary"] = summary
    return last, objects


def planned_settings(
    plan: Plan, configuration: str, data: DataSettings, model_cfg: DictConfig
) -> tuple[DataSettings, dict[str, Any], int | None]:
    """The data settings and model arguments with what was left null filled from the plan's
    ``configuration`` (its ``spatial_dims`` always), and its slice axis (2D); prints the plan
    and every explicit override.

    Raises:
        ValueError: the configuration was not planned, or the patch does not fit the network.
    """
    if configuration not in plan.configurations:
        raise ValueError(
            f"configuration={configuration!r} is not in the plan (planned: "
            f"{sorted(plan.configurations)})."
        )
    chosen_config = Configuration.from_dict(plan.configurations[configuration])
    planned_3d = chosen_config.slice_axis is None
    if planned_3d and list(chosen_config.spacing) != list(plan.target_spacing):
        raise ValueError(
            f"configuration={configuration} is planned at {list(chosen_config.spacing)} mm but "
            f"the data are preprocessed at {list(plan.target_spacing)} mm; its own preprocessing "
            f"is not built yet: train configuration=3d_fullres with "
            f"data.target_spacing={[round(s, 3) for s in chosen_config.spacing]} instead."
        )
    given = {key: model_cfg.get(key.split(".")[1]) for key in PLANNED_SETTINGS}
    given.update({"data.patch_size": data.patch_size, "data.batch_size": data.batch_size})
    given = {k: OmegaConf.to_object(v) if OmegaConf.is_config(v) else v for k, v in given.items()}
    chosen, overrides = apply_configuration(chosen_config, given)
    print(f"plan ({configuration} is trained):\n{format_configurations(plan.configurations)}")
    for line in overrides:
        print(f"override: {line}")
    data = replace(data, patch_size=chosen["data.patch_size"], batch_size=chosen["data.batch_size"])
    model_args = {k.split(".")[1]: v for k, v in chosen.items() if k.startswith("model.")}
    model_args = {k: v for k, v in model_args.items() if v is not None}
    model_args["spatial_dims"] = chosen_config.spatial_dims
    check_patch_size(
        data.patch_size,
        len(model_args["features"]),
        chosen_config.spatial_dims,
        model_args.get("strides"),
    )
    return data, model_args, chosen_config.slice_axis


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
