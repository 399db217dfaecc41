"""``segshare-train``: the training app (Hydra over ``conf/train.yaml``).

``train(cfg)`` is the testable entry point; ``main`` is the thin Hydra wrapper. A run folder gets
``model.keras`` (best validation Dice), ``plan.json`` (the preprocessing the model expects),
``config.yaml``, ``parameters.json``, ``checkpoints/{latest,best}``, ``train_log.csv`` and
``tensorboard/``. Running the same command on the same run folder resumes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf


def _check_resumed_plan(run_dir: Path, plan) -> None:
    """Refuse to resume a run whose checkpoint was trained on another preprocessing plan.

    Raises:
        ValueError: naming the run's ``plan.json`` and the settings that differ.
    """
    from segshare.data.preprocessing import Plan
    from segshare.training.checkpoints import find_checkpoint

    saved = run_dir / "plan.json"
    if not saved.is_file() or find_checkpoint(run_dir / "checkpoints" / "latest") is None:
        return
    old, new = Plan.load(saved).to_dict(), plan.to_dict()
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ValueError(
            f"{saved}: this run's checkpoint was trained with another preprocessing plan "
            f"({details}). Resume with the run's data settings (e.g. data.target_spacing), or "
            f"train into a new hydra.run.dir."
        )


def _configure_tensorflow(cfg: DictConfig) -> bool:
    """Seeds, determinism, precision; returns whether XLA compilation is on."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(cfg.seed))
    if cfg.trainer.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(str(cfg.trainer.precision))
    jit = cfg.trainer.jit_compile
    if jit == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return bool(jit)


def build_optimizer(opt_cfg: DictConfig, grad_clip_norm: float | None, precision: str):
    """SGD (Nesterov) or AdamW from ``conf/optimizer``; loss scaling for float16."""
    import keras

    clip = {"global_clipnorm": float(grad_clip_norm)} if grad_clip_norm else {}
    if opt_cfg.name == "sgd":
        opt = keras.optimizers.SGD(
            learning_rate=float(opt_cfg.learning_rate),
            momentum=float(opt_cfg.momentum),
            nesterov=bool(opt_cfg.nesterov),
            weight_decay=float(opt_cfg.weight_decay) or None,
            **clip,
        )
    elif opt_cfg.name == "adamw":
        opt = keras.optimizers.AdamW(
            learning_rate=float(opt_cfg.learning_rate),
            weight_decay=float(opt_cfg.weight_decay),
            beta_1=float(opt_cfg.beta_1),
            beta_2=float(opt_cfg.beta_2),
            **clip,
        )
    else:
        raise ValueError(f"optimizer.name must be 'sgd' or 'adamw', got {opt_cfg.name!r}.")
    if precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def train(cfg: DictConfig) -> tuple[dict, dict[str, Any]]:
    """Train (or resume) the run described by ``cfg``; returns (last metrics row, objects)."""
    from hydra.utils import instantiate

    from segshare.data.cache import load_cached_case
    from segshare.data.pipeline import make_training_data
    from segshare.data.prepare import prepare_dataset
    from segshare.losses import DiceCELoss
    from segshare.models import check_patch_size, format_parameter_report, parameter_report
    from segshare.training.loop import LoopSettings, Trainer
    from segshare.training.strategy import is_chief, make_strategy

    # MultiWorkerMirroredStrategy must exist before other TensorFlow work in the process.
    strategy = make_strategy(str(cfg.trainer.strategy))
    jit = _configure_tensorflow(cfg)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    patch = tuple(int(p) for p in cfg.data.patch_size)
    check_patch_size(patch, len(cfg.model.features), int(cfg.model.spatial_dims))
    prepared = prepare_dataset(cfg.data, progress=bool(cfg.trainer.progress))
    plan = prepared.plan
    _check_resumed_plan(run_dir, plan)
    with strategy.scope():
        model = instantiate(
            cfg.model,
            in_channels=plan.in_channels,
            num_classes=plan.num_classes,
            sharing=cfg.sharing.scheme,
            num_templates=cfg.sharing.num_templates,
            _convert_="all",
        )
        optimizer = build_optimizer(
            cfg.optimizer, cfg.trainer.grad_clip_norm, str(cfg.trainer.precision)
        )
        optimizer.build(model.trainable_variables)
    report = parameter_report(model)
    print(format_parameter_report(report))
    if is_chief(strategy):
        plan.save(run_dir / "plan.json")
        (run_dir / "parameters.json").write_text(json.dumps(report, indent=2))
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    loss_fn = DiceCELoss(**OmegaConf.to_container(cfg.loss, resolve=True))

    def make_dataset(epoch: int):
        return make_training_data(
            prepared.cache_dir,
            prepared.train_ids,
            patch,
            int(cfg.data.batch_size),
            oversample_foreground=float(cfg.data.oversample_foreground),
            augment_cfg=cfg.data.augment,
            seed=int(cfg.seed) * 10007 + epoch,
            backend="tf",
            num_workers=int(cfg.data.num_workers),
            steps_per_epoch=int(cfg.trainer.steps_per_epoch),
        )

    val_ids = list(prepared.val_ids)
    if cfg.trainer.max_val_cases is not None:
        val_ids = val_ids[: int(cfg.trainer.max_val_cases)]

    def validation_cases():
        for case_id in val_ids:
            image, label, _ = load_cached_case(prepared.cache_dir, case_id)
            yield case_id, image, label

    settings = LoopSettings(
        max_epochs=int(cfg.trainer.max_epochs),
        steps_per_epoch=int(cfg.trainer.steps_per_epoch),
        epochs_per_run=cfg.trainer.epochs_per_run,
        initial_lr=float(cfg.optimizer.learning_rate),
        lr_schedule=str(cfg.trainer.lr_schedule),
        poly_exponent=float(cfg.trainer.poly_exponent),
        val_every=int(cfg.trainer.val_every),
        overlap=float(cfg.trainer.overlap),
        sw_batch_size=int(cfg.trainer.sw_batch_size),
        seed=int(cfg.seed),
        jit_compile=jit,
        progress=bool(cfg.trainer.progress),
        label_names={v: k for k, v in plan.labels.items()},
    )
    trainer = Trainer(
        strategy,
        model,
        optimizer,
        loss_fn,
        make_dataset,
        validation_cases,
        patch,
        plan.num_classes,
        run_dir,
        settings,
    )
    last = trainer.fit()
    objects = {"model": model, "run_dir": run_dir, "prepared": prepared, "report": report}
    if cfg.final_evaluation and is_chief(strategy) and prepared.val_ids:
        # All of the fold's validation cases, even when epochs validate on fewer.
        summary = evaluate_validation(run_dir, prepared, prepared.val_ids, patch, cfg)
        last["final_val_dice_fg_mean"] = summary["foreground_mean"].get("Dice", float("nan"))
        objects["summary"] = summary
    return last, objects


def _reference_link(label: Path, target: Path) -> None:
    """Expose a reference under the prediction's file name (a link, or a .nii.gz copy)."""
    import nibabel as nib

    if target.exists() or target.is_symlink():
        target.unlink()
    if label.name.endswith(".nii.gz"):
        target.symlink_to(label.resolve())
    else:
        nib.save(nib.load(label), target)


def evaluate_validation(run_dir: Path, prepared, val_ids, patch, cfg: DictConfig) -> dict:
    """Final step: predict the fold's validation cases on their original grids with the best
    model, then write the evaluation report (``validation/summary.json`` ...) against their labels.
    """
    from segshare.evaluate import evaluate_folders
    from segshare.inference.model_io import load_model_safely, make_predict_fn
    from segshare.inference.predictor import Predictor, predict_cases

    out = run_dir / "validation"
    pred_dir, ref_dir = out / "predictions", out / "references"
    ref_dir.mkdir(parents=True, exist_ok=True)
    model = load_model_safely(run_dir / "model.keras")
    predictor = Predictor(
        make_predict_fn(model),
        prepared.plan,
        patch,
        overlap=float(cfg.trainer.overlap),
        sw_batch_size=int(cfg.trainer.sw_batch_size),
    )
    wanted = set(val_ids)
    cases = [c for c in prepared.dataset.cases if c.case_id in wanted]
    predict_cases(predictor, cases, pred_dir, skip_existing=False, progress=cfg.trainer.progress)
    for case in cases:
        _reference_link(Path(case.label), ref_dir / f"{case.case_id}.nii.gz")
    dataset_json = Path(prepared.dataset.root) / "dataset.json"
    summary = evaluate_folders(
        pred_dir,
        ref_dir,
        out,
        dataset_json=dataset_json if dataset_json.exists() else None,
        num_workers=1,
        progress=bool(cfg.trainer.progress),
    )
    dice = summary["foreground_mean"].get("Dice", float("nan"))
    print(
        f"Final validation ({len(cases)} cases, original geometry): foreground-mean Dice {dice:.4f}"
    )
    return summary


@hydra.main(version_base="1.3", config_path="pkg://segshare.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    from segshare.cli import exit_on_user_error
    from segshare.data.validation import DatasetError
    from segshare.training.loop import TrainingDiverged

    with exit_on_user_error(
        "segshare-train", [(DatasetError, 2), ((TrainingDiverged, ValueError), 1)]
    ):
        train(cfg)


def main() -> None:
    """Console entry point ``segshare-train``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _hydra_main()


if __name__ == "__main__":
    main()
