"""A training run's folder before the loop starts: the files later consumers read (the trained-run
contract), and the check that resuming the folder is safe.

``plan.json`` and ``run.json`` (see :mod:`segshare.inference.trained_run`) are the contract;
``parameters.json`` (the parameter report) and ``config.yaml`` (the composed config, for people:
nothing reads it back) are the record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segshare.data.io import write_json_atomic, write_text_atomic
from segshare.data.preprocessing import Plan
from segshare.inference.trained_run import PLAN_FILE, write_run_info
from segshare.training.checkpoints import find_checkpoint


def check_resumable(run_dir: Path, plan: Plan) -> None:
    """Refuse to resume a run whose checkpoint was trained on another preprocessing plan (the
    network configurations planned beside it may change: the run's model is what it is).

    Raises:
        ValueError: naming the run's ``plan.json`` and the settings that differ.
    """
    saved = Path(run_dir) / PLAN_FILE
    if not saved.is_file() or find_checkpoint(Path(run_dir) / "checkpoints" / "latest") is None:
        return
    old, new = Plan.load(saved).preprocessing_dict(), plan.preprocessing_dict()
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ValueError(
            f"{saved}: this run's checkpoint was trained with another preprocessing plan "
            f"({details}). Resume with the run's data settings (e.g. data.target_spacing), or "
            f"train into a new hydra.run.dir."
        )


def write_run_files(
    run_dir: Path,
    plan: Plan,
    patch_size: tuple[int, ...],
    parameters: dict[str, Any],
    config_yaml: str,
    configuration: str | None = None,
    slice_axis: int | None = None,
    split: dict[str, Any] | None = None,
) -> None:
    """Write ``plan.json``, ``run.json``, ``parameters.json`` and ``config.yaml`` (atomically).

    Args:
        run_dir: the run folder.
        plan: the preprocessing plan the model is trained with.
        patch_size: the training patch (the model's default prediction window).
        parameters: the parameter report (``segshare.models.parameter_report``).
        config_yaml: the composed config, resolved, as YAML.
        configuration: the planned configuration trained (``3d_fullres``, ...), if any.
        slice_axis: for a 2D network, the volume axis its slices are taken across.
        split: the fold and its case ids (``run.json``'s ``split``).
    """
    run_dir = Path(run_dir)
    plan.save(run_dir / PLAN_FILE)
    write_run_info(
        run_dir,
        plan,
        patch_size,
        slice_axis,
        split,
        sharing=parameters.get("sharing"),
        configuration=configuration,
    )
    write_json_atomic(parameters, run_dir / "parameters.json")
    write_text_atomic(config_yaml, run_dir / "config.yaml")
