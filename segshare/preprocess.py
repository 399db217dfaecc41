"""``segshare-preprocess``: validate a dataset, then fingerprint, plan (the preprocessing, and the
network, patch and batch of every configuration), cache and split it.

Usage: ``segshare-preprocess data.root=DIR [data.preprocessed_dir=OUT]``. Exits 2, listing every
problem with its file, when the dataset does not validate.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from segshare.cli import exit_on_user_error, instantiate
from segshare.data.planner import format_configurations
from segshare.data.prepare import PreparedData, prepare_dataset
from segshare.data.validation import DatasetError


def run(cfg: DictConfig) -> PreparedData:
    """Prepare ``cfg.data`` and print a summary; raises ``DatasetError`` on bad data."""
    prepared = prepare_dataset(
        instantiate(cfg.data), bool(cfg.progress), planner=instantiate(cfg.plan)
    )
    plan, fp = prepared.plan, prepared.fingerprint
    print(f"dataset       {prepared.dataset.root} ({fp['num_cases']} cases)")
    ignore = f" (ignore label {plan.ignore_label})" if plan.ignore_label is not None else ""
    print(f"labels        {plan.labels}{ignore}")
    print(
        f"spacing       {[round(s, 4) for s in plan.target_spacing]} (target), "
        f"normalization {plan.normalization}"
    )
    print(f"fingerprint   {prepared.preprocessed_dir / 'fingerprint.json'}")
    print(
        f"splits        {prepared.preprocessed_dir / 'splits.json'} (fold {cfg.data.fold}: "
        f"{len(prepared.train_ids)} train / {len(prepared.val_ids)} val)"
    )
    print(f"cache         {prepared.cache_dir}")
    print(f"plan          {prepared.preprocessed_dir / 'plan.json'}")
    print(format_configurations(plan.configurations))
    return prepared


@hydra.main(version_base="1.3", config_path="pkg://segshare.conf", config_name="preprocess")
def main(cfg: DictConfig) -> None:
    """Console entry point (thin layer over :func:`run`)."""
    with exit_on_user_error("segshare-preprocess", [(DatasetError, 2), ((ValueError, OSError), 1)]):
        run(cfg)


if __name__ == "__main__":
    main()
