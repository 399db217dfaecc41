"""``segshare-predict``: label maps for NIfTI scans from a model trained by ``segshare-train``.

    segshare-predict model_path=outputs/train/RUN input=/data/imagesTs output=preds
    segshare-predict model_path=[RUN0,RUN1,RUN2] input=DIR output=preds   # an ensemble
    segshare-predict model_path=CROSSVAL_DIR input=DIR output=preds       # its folds' ensemble
    segshare-predict -m model_path=RUN input=DIR output=preds shard.index=0,1 shard.count=2 \
        hydra/launcher=joblib

``run(cfg)`` is the testable function; ``main()`` is the thin Hydra entry point. Exit status: 0 when
every case was predicted (or already existed), 1 when any case failed, or is still being
predicted by another run into the same folder (its output is not there yet: rerun once that run
has finished; a lock left by a run killed on another host counts as abandoned after 10 minutes),
or (all good cases are still written; the failures are printed, then
saved in ``output/failures.json``) or that list could not be written (a full disk), 2 on a setup
error (bad ``model_path``, ``input`` or option, two scans of one case id, an output folder that
cannot be made).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from segshare.cli import USER_ERRORS, exit_on_user_error
from segshare.inference.predictor import PredictReport


def run(
    cfg: DictConfig, on_finished: Callable[[PredictReport], None] | None = None
) -> PredictReport:
    """Predict every case of ``cfg.input`` (this shard's share) into ``cfg.output``.

    Args:
        cfg: A composed ``predict.yaml`` config.
        on_finished: called with the report when every case is done, before the failure list is
            written (see :func:`segshare.inference.predictor.predict_cases`).

    Returns:
        The :class:`~segshare.inference.predictor.PredictReport` (written, skipped, failed).

    Raises:
        ValueError: On a setup problem (model, plan, input path, option); the message names it.
    """
    from segshare.cli import instantiate
    from segshare.data.discovery import discover_images
    from segshare.devices import resolve_precision
    from segshare.inference.ensemble import load_ensemble
    from segshare.inference.predictor import failures_file_name, predict_cases, select_shard

    index, count = cfg.shard.index, cfg.shard.count  # checked by select_shard
    window = instantiate(cfg.window)  # a bad window is a setup error, not a failure per case
    model_path = cfg.model_path
    model_path = OmegaConf.to_object(model_path) if OmegaConf.is_config(model_path) else model_path
    precision, why = resolve_precision(str(cfg.precision))
    print(f"precision: {precision} ({why}); runtime: {cfg.runtime}")
    predictor, runs = load_ensemble(
        model_path,
        window,
        tta=bool(cfg.tta),
        mirror_axes=list(cfg.inference.mirror_axes),
        progress=bool(cfg.inference.progress),
        max_voxels=int(cfg.inference.max_voxels),
        precision=precision,
        runtime=str(cfg.runtime),
    )
    postprocess = None
    postprocessing = cfg.postprocessing
    if postprocessing is None and isinstance(model_path, str) and model_path.endswith(".zip"):
        from segshare.inference.package import open_package, package_postprocessing

        postprocessing = package_postprocessing(open_package(model_path))
        if postprocessing is not None:
            print(f"postprocessing: the package's ({postprocessing.name})")
    if postprocessing is not None:
        from functools import partial

        from segshare.evaluation.postprocessing import apply_postprocessing, load_postprocessing

        steps = load_postprocessing(postprocessing)
        postprocess = partial(apply_postprocessing, steps=steps)
    cases = select_shard(discover_images(cfg.input, runs[0].in_channels), index, count)
    output = Path(cfg.output).resolve()
    if any(Path(os.path.realpath(p)).parent == output for c in cases for p in c.images):
        raise ValueError(
            f"output={cfg.output!r} is the folder of the input scans: predictions named like the "
            f"scans would be taken for finished outputs. Choose another output folder."
        )
    if len(runs) > 1:
        folders = ", ".join(str(r.folder) for r in runs)
        print(f"segshare-predict: ensemble of {len(runs)} models: {folders}")
    return predict_cases(
        predictor,
        cases,
        output,
        save_probabilities=bool(cfg.save_probabilities),
        skip_existing=bool(cfg.inference.skip_existing),
        failures_name=failures_file_name(int(index), int(count)),
        progress=bool(cfg.inference.progress),
        postprocess=postprocess,
        on_finished=on_finished,
    )


def format_report(report: PredictReport, output: str) -> str:
    """A short human summary of a batch, listing every failure with its file and reason."""
    busy = f", {len(report.busy)} being predicted by another run" if report.busy else ""
    lines = [
        f"segshare-predict: {len(report.written)} written, {len(report.skipped)} already there "
        f"(skipped){busy}, {len(report.failed)} failed in {report.seconds:.1f} s -> {output}"
    ]
    for f in report.failed:
        lines.append(f"  FAILED {f['case_id']}: {f['reason']}")
    return "\n".join(lines)


def _print_report(report: PredictReport, output: str) -> None:
    print(format_report(report, output), file=sys.stderr if report.failed else sys.stdout)


@hydra.main(version_base="1.3", config_path="pkg://segshare.conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    """Console entry point ``segshare-predict model_path=RUN input=PATH output=DIR``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    # a folder or model that cannot be read or made (OSError) is a setup error too
    with exit_on_user_error("segshare-predict", [((*USER_ERRORS, OSError), 2)]):
        report = run(cfg, on_finished=lambda r: _print_report(r, str(cfg.output)))
    status = finish(report)
    # In a multirun the other shards go on; FailuresCallback sets the exit status at the end.
    if status and HydraConfig.get().mode != RunMode.MULTIRUN:
        raise SystemExit(status)


def finish(report: PredictReport) -> int:
    """Print what was not written (a record, or a case another run still holds) to stderr;
    return the exit status: 1 when a case failed, a record was not written or a case is still
    being predicted by another run (its output is not there yet), else 0."""
    for line in report.not_written:
        print(f"segshare-predict: error: {line}", file=sys.stderr)
    if report.busy:
        print(
            f"segshare-predict: {len(report.busy)} case(s) not written yet, being predicted by "
            f"another run ({', '.join(report.busy[:5])}); rerun when it has finished.",
            file=sys.stderr,
        )
    return 1 if report.failed or report.not_written or report.busy else 0


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
