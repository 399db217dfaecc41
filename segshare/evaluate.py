"""``segshare-evaluate``: score a folder of predicted label maps against references.

Writes ``summary.json`` (nnU-Net's shape), ``metrics.csv`` (tidy), ``report.md`` and a
self-contained ``report.html`` into the output folder, all or none. Exit status: 0 when scored,
2 when an input is bad (every bad file listed) or the outputs cannot be written. ``run(cfg)`` is
the Hydra wrapper of :func:`segshare.evaluation.evaluate_folders`, the plain function that the
training and prediction apps call.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from segshare.cli import USER_ERRORS, exit_on_user_error
from segshare.evaluation import evaluate_folders


def run(cfg: DictConfig) -> dict:
    """Runs the evaluation described by a composed ``evaluate.yaml`` config; returns the summary."""
    labels = cfg.labels
    if labels is not None and not isinstance(labels, int | str):
        labels = OmegaConf.to_container(labels)
    return evaluate_folders(
        cfg.pred,
        cfg.ref,
        cfg.output,
        labels=labels,
        images_dir=cfg.images,
        nsd_tolerance_mm=cfg.nsd_tolerance_mm,
        hd95=cfg.hd95,
        num_workers=cfg.num_workers,
        dataset_json=cfg.dataset_json,
        strict_json=cfg.strict_json,
        missing_as_empty=cfg.missing_as_empty,
        progress=cfg.progress,
        ignore_label=cfg.ignore_label,
    )


def _print_summary(summary: dict, output: str) -> None:
    fg = summary["foreground_mean"]
    print(f"{summary['num_cases']} cases, {summary['num_missing_predictions']} missing predictions")
    for key, name in summary["labels"].items():
        m = summary["mean"][key]
        print(
            f"  label {key} ({name}): Dice {m['Dice']:.4f}  HD95 {m['HD95']:.3f} mm  "
            f"NSD {m['NSD']:.4f}"
        )
    for name, values in summary.get("regions", {}).items():
        m = summary["region_mean"][name]
        print(
            f"  region {name} ({'+'.join(map(str, values))}): Dice {m['Dice']:.4f}  "
            f"HD95 {m['HD95']:.3f} mm  NSD {m['NSD']:.4f}"
        )
    if "region_foreground_mean" in summary:
        print(f"  region mean Dice {summary['region_foreground_mean']['Dice']:.4f}")
    print(f"  foreground mean Dice {fg['Dice']:.4f}; reports in {output}")


@hydra.main(version_base="1.3", config_path="pkg://segshare.conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Console entry point ``segshare-evaluate pred=DIR ref=DIR output=DIR``."""
    # a bad input, or outputs that cannot be written (a full disk: none is written): status 2
    with exit_on_user_error("segshare-evaluate", [((*USER_ERRORS, OSError), 2)]):
        summary = run(cfg)
    _print_summary(summary, str(cfg.output))


if __name__ == "__main__":
    main()
