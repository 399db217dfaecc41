"""``segshare-predict``: label maps for NIfTI scans from a model trained by ``segshare-train``.

    segshare-predict model_path=outputs/train/RUN input=/data/imagesTs output=preds
    segshare-predict -m model_path=RUN input=DIR output=preds shard.index=0,1 shard.count=2 \
        hydra/launcher=joblib

``run(cfg)`` is the testable function; ``main()`` is the thin Hydra entry point. Exit status: 0 when
every case was predicted (or already existed), 1 when any case failed (all good cases are still
written; the failures are listed and saved in ``output/failures.json``), 2 on a setup error
(bad ``model_path``, ``input`` or option).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from segshare.cli import exit_on_user_error
from segshare.inference.predictor import PredictReport

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _roi_size(cfg: DictConfig, config_path: Path | None) -> tuple[int, int, int]:
    """The window size: ``inference.roi_size``, else the run's training ``data.patch_size``.

    The window arguments (``overlap``, ``sw_batch_size``) are checked here too, so a bad value
    is a setup error rather than a failure of every case.
    """
    from segshare.inference.sliding_window import check_window_args

    roi = cfg.inference.roi_size
    if roi is None and config_path is not None:
        roi = OmegaConf.select(OmegaConf.load(config_path), "data.patch_size")
    if roi is None:
        raise ValueError(
            "inference.roi_size is not set and the run folder has no config.yaml with "
            "data.patch_size; pass inference.roi_size=[D,H,W]."
        )
    roi = roi if isinstance(roi, int) else list(roi)
    return check_window_args(roi, cfg.overlap, cfg.sw_batch_size)


def _check_window(predict_fn, roi: tuple[int, ...], channels: int, num_classes: int) -> None:
    """Predict one empty window up front (also traces the model once) to catch a bad roi_size."""
    import numpy as np

    try:
        out = predict_fn(np.zeros((1, *roi, channels), np.float32))
    except Exception as err:  # noqa: BLE001 - backend errors vary; the first line is enough
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"roi_size={list(roi)}: the model cannot predict a window of this size ({first}); "
            f"U-Nets need sizes divisible by 2**(stages - 1)."
        ) from None
    if out.shape != (1, *roi, num_classes):
        raise ValueError(
            f"the model maps a (1, {', '.join(map(str, roi))}, {channels}) window to "
            f"{out.shape}, expected (1, {', '.join(map(str, roi))}, {num_classes}) (plan.json)."
        )


def run(cfg: DictConfig) -> PredictReport:
    """Predict every case of ``cfg.input`` (this shard's share) into ``cfg.output``.

    Args:
        cfg: A composed ``predict.yaml`` config.

    Returns:
        The :class:`~segshare.inference.predictor.PredictReport` (written, skipped, failed).

    Raises:
        ValueError: On a setup problem (model, plan, input path, option); the message names it.
    """
    from segshare.data.discovery import discover_images
    from segshare.data.preprocessing import Plan
    from segshare.inference.model_io import load_model_safely, make_predict_fn, resolve_run
    from segshare.inference.predictor import (
        Predictor,
        failures_file_name,
        predict_cases,
        select_shard,
    )

    index, count = cfg.shard.index, cfg.shard.count
    files = resolve_run(cfg.model_path)
    plan = Plan.load(files.plan)
    roi = _roi_size(cfg, files.config)
    cases = select_shard(discover_images(cfg.input, plan.in_channels), index, count)
    output = Path(cfg.output).resolve()
    if any(p.resolve().parent == output for c in cases for p in c.images):
        raise ValueError(
            f"output={cfg.output!r} is the folder of the input scans: predictions named like the "
            f"scans would be taken for finished outputs. Choose another output folder."
        )
    model = load_model_safely(files.model)
    channels = model.inputs[0].shape[-1] if getattr(model, "inputs", None) else None
    if channels is not None and channels != plan.in_channels:
        raise ValueError(
            f"{files.model}: the model takes {channels} channels but {files.plan} says "
            f"{plan.in_channels}."
        )
    mirror_axes = [int(a) + 1 for a in cfg.inference.mirror_axes]
    predict_fn = make_predict_fn(model, tta=bool(cfg.tta), mirror_axes=mirror_axes)
    _check_window(predict_fn, roi, plan.in_channels, plan.num_classes)
    predictor = Predictor(
        predict_fn,
        plan,
        roi,
        overlap=float(cfg.overlap),
        sw_batch_size=int(cfg.sw_batch_size),
        sigma_scale=float(cfg.inference.sigma_scale),
        progress=bool(cfg.inference.progress),
        max_voxels=int(cfg.inference.max_voxels),
    )
    return predict_cases(
        predictor,
        cases,
        output,
        save_probabilities=bool(cfg.save_probabilities),
        skip_existing=bool(cfg.inference.skip_existing),
        failures_name=failures_file_name(int(index), int(count)),
        progress=bool(cfg.inference.progress),
    )


def format_report(report: PredictReport, output: str) -> str:
    """A short human summary of a batch, listing every failure with its file and reason."""
    lines = [
        f"segshare-predict: {len(report.written)} written, {len(report.skipped)} already there "
        f"(skipped), {len(report.failed)} failed in {report.seconds:.1f} s -> {output}"
    ]
    for f in report.failed:
        lines.append(f"  FAILED {f['case_id']}: {f['reason']}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="pkg://segshare.conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    """Console entry point ``segshare-predict model_path=RUN input=PATH output=DIR``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    with exit_on_user_error("segshare-predict"):
        report = run(cfg)
    print(format_report(report, str(cfg.output)), file=sys.stderr if report.failed else sys.stdout)
    # In a multirun the other shards go on; FailuresCallback sets the exit status at the end.
    if report.failed and HydraConfig.get().mode != RunMode.MULTIRUN:
        raise SystemExit(1)


class FailuresCallback(Callback):
    """After a multirun (all shards done), exit with status 1 if any shard listed failed cases.

    Reads the shards' ``failures*.json`` in ``output`` (or, when ``output`` is left to each job's
    folder, anywhere below the sweep folder), so the status is right for every launcher (joblib,
    submitit) without a traceback.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        import json

        output = OmegaConf.select(config, "output", throw_on_resolution_failure=False)
        try:
            count = int(config.shard.count)
            name = "failures.json" if count == 1 else f"failures.shard-*-of-{count}.json"
        except (TypeError, ValueError, OmegaConfBaseException):
            name = "failures*.json"
        if output is not None and Path(output).is_dir():
            files = sorted(Path(output).glob(name))
        else:
            files = sorted(Path(config.hydra.sweep.dir).rglob(name))
        failed = [f for path in files for f in json.loads(path.read_text())]
        if failed:
            where = ", ".join(str(p) for p in files)
            print(f"segshare-predict: {len(failed)} case(s) failed in the sweep; see {where}")
            raise SystemExit(1)


if __name__ == "__main__":
    main()
