"""``segshare-crossval``: merge the validation predictions of the cross-validation folds and score
them as one set (nnU-Net's ``crossval_results_folds_0_1_2_3_4``).

``run(cfg)`` is the Hydra wrapper of :func:`segshare.evaluation.crossval.merge_folds`; the merge
folder gets ``summary.json``, ``metrics.csv``, ``report.md``/``.html`` over all cases and
``folds.json`` (per fold). See ``docs/crossval.md``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from segshare.cli import USER_ERRORS, exit_on_user_error
from segshare.evaluation.configurations import find_best_configuration, ranking_rows
from segshare.evaluation.crossval import merge_folds


def _runs(cfg: DictConfig) -> list[str]:
    """``cfg.runs`` as a list of folders.

    Raises:
        ValueError: ``runs`` is missing, empty or not a list of folders.
    """
    example = "runs=[multirun/train/folds/0,multirun/train/folds/1,...]"
    if OmegaConf.is_missing(cfg, "runs") or cfg.runs is None:
        raise ValueError(f"runs is required: the run folder of every fold, e.g. {example}.")
    runs = OmegaConf.to_container(cfg.runs) if OmegaConf.is_list(cfg.runs) else [cfg.runs]
    if not runs or not all(isinstance(r, str) and r for r in runs):
        raise ValueError(
            f"runs must list the run folder of every fold, e.g. {example}; got {runs}."
        )
    return runs


def run(cfg: DictConfig) -> dict:
    """Runs the merge described by a composed ``crossval.yaml``; returns the summary (with
    ``"folds"``: the ``folds.json`` contents), or with ``runs_by_config`` the
    ``best_configuration.json`` contents."""
    if OmegaConf.is_missing(cfg, "output") or cfg.output is None:
        raise ValueError("output is required: the folder for the merge, e.g. output=crossval.")
    if cfg.get("runs_by_config") is not None:
        if cfg.get("runs") is not None:
            raise ValueError(
                "give runs=[...] (one configuration) or runs_by_config={...}, not both."
            )
        given = cfg.runs_by_config
        by_config = OmegaConf.to_container(given) if OmegaConf.is_config(given) else given
        if not isinstance(by_config, dict) or not all(
            isinstance(v, list) and v for v in by_config.values()
        ):
            raise ValueError(
                "runs_by_config must map each configuration to the runs of its folds, e.g. "
                f"runs_by_config={{none:[RUN0,RUN1],stage:[RUN2,RUN3]}}; got {by_config}."
            )
        return find_best_configuration(
            by_config, cfg.output, num_workers=cfg.num_workers, progress=cfg.progress
        )
    runs = _runs(cfg)
    return merge_folds(
        runs,
        cfg.output,
        num_workers=cfg.num_workers,
        progress=cfg.progress,
        postprocessing=bool(cfg.postprocessing),
    )


def format_ranking(best: dict, output: str) -> str:
    """The configurations and ensembles by cross-validation Dice, and the predict command."""
    header, rows = ranking_rows(best)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    post = best["best"]["postprocessing"]
    lines += [
        f"best: {best['best']['name']} (postprocessing: {len(post['steps'])} step(s), Dice "
        f"{post['foreground_dice_before']:.4f} -> {post['foreground_dice_after']:.4f})",
        f"predict with: {best['predict_command']}",
        f"details in {output}/best_configuration.json",
    ]
    return "\n".join(lines)


def format_results(summary: dict, output: str) -> str:
    """The per-fold table and the overall foreground-mean Dice."""
    folds = summary["folds"]
    lines = [f"{'fold':>4}  {'cases':>5}  {'Dice':>6}  run"]
    for row in folds["folds"]:
        lines.append(
            f"{row['fold']:>4}  {row['num_cases']:>5}  {row['foreground_dice']:6.4f}  {row['run']}"
        )
    dice = folds["foreground_dice"]
    lines.append(
        f"mean over {len(folds['folds'])} folds {dice['mean_over_folds']:.4f} "
        f"(sd {dice['sd_over_folds']:.4f}); all {summary['num_cases']} cases: "
        f"foreground-mean Dice {dice['all_cases']:.4f}"
    )
    for key, name in summary["labels"].items():
        lines.append(f"  label {key} ({name}): Dice {summary['mean'][key]['Dice']:.4f}")
    post = folds.get("postprocessing")
    if post:
        steps = "; ".join(
            f"{s['kind']} of labels {list(s['labels'])}"
            + (f" (< {s['min_voxels']} voxels)" if s.get("min_voxels") else "")
            for s in post["steps"]
        )
        lines.append(
            f"postprocessing ({post['file']}): {steps or 'none helps'}; foreground-mean Dice "
            f"{post['foreground_dice_before']:.4f} -> {post['foreground_dice_after']:.4f}"
        )
    lines.append(f"reports in {output}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="pkg://segshare.conf", config_name="crossval")
def main(cfg: DictConfig) -> None:
    """Console entry point ``segshare-crossval runs=[RUN0,RUN1,...] output=DIR``."""
    with exit_on_user_error("segshare-crossval", [((*USER_ERRORS, OSError), 1)]):
        summary = run(cfg)
    if "ranking" in summary:
        print(format_ranking(summary, str(cfg.output)))
    else:
        print(format_results(summary, str(cfg.output)))


if __name__ == "__main__":
    main()
