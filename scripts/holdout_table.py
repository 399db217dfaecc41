"""The sharing study's hold-out table: each fold alone against the 5-fold ensemble, per scheme.

    python scripts/holdout_table.py /tmp/study/holdout none stage global

``HOLDOUT/<scheme>/<model>/summary.json`` are ``segshare-evaluate`` summaries of the held-out
cases, ``<model>`` a fold number or ``ensemble`` (``scripts/sharing_study.sh`` writes them).
Prints one Markdown table: per scheme the foreground-mean Dice of each fold, their mean and sd,
the ensemble's Dice, and two paired comparisons over the cases
(:mod:`segshare.evaluation.comparison`): the ensemble against the per-case mean of the single
folds and against the best single fold; then each scheme's ensemble against the first scheme's.
Exit status 2 with a one-line error when a summary is missing or unreadable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from segshare.data.io import read_json
from segshare.evaluation.comparison import case_scores, format_difference, paired_comparison


def _summary(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path}: missing (run the study's holdout stage)")
    return read_json(path)


def holdout_rows(holdout: Path, schemes: list[str]) -> list[str]:
    """The table's lines (Markdown)."""
    lines = [
        "| scheme | Dice per fold | mean (sd) | 5-fold ensemble | ensemble - mean of folds "
        "| ensemble - best fold |",
        "|---|---|---|---|---|---|",
    ]
    ensembles = {}
    for scheme in schemes:
        folds = sorted(
            (p for p in (holdout / scheme).iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
        )
        if not folds:
            raise ValueError(f"{holdout / scheme}: no fold folders (0, 1, ...)")
        singles = [_summary(p / "summary.json") for p in folds]
        ensemble = _summary(holdout / scheme / "ensemble" / "summary.json")
        dice = np.array([s["foreground_mean"]["Dice"] for s in singles], dtype=float)
        scores = [case_scores(s) for s in singles]
        common = set.intersection(*(set(s) for s in scores))
        mean_of_folds = {c: float(np.mean([s[c] for s in scores])) for c in common}
        best = scores[int(np.argmax(dice))]
        ensembles[scheme] = case_scores(ensemble)
        lines.append(
            f"| {scheme} | {', '.join(f'{d:.4f}' for d in dice)} | {dice.mean():.4f} "
            f"({dice.std(ddof=1) if len(dice) > 1 else float('nan'):.4f}) "
            f"| {ensemble['foreground_mean']['Dice']:.4f} "
            f"| {format_difference(paired_comparison(mean_of_folds, ensembles[scheme]))} "
            f"| {format_difference(paired_comparison(best, ensembles[scheme]))} |"
        )
    reference = schemes[0]
    for scheme in schemes[1:]:
        lines.append("")
        lines.append(
            f"ensemble {scheme} - ensemble {reference}: "
            f"{format_difference(paired_comparison(ensembles[reference], ensembles[scheme]))}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("holdout", type=Path, help="the study's holdout folder")
    parser.add_argument("schemes", nargs="+", help="schemes, the reference first")
    args = parser.parse_args(argv)
    try:
        lines = holdout_rows(args.holdout, args.schemes)
    except (ValueError, KeyError, OSError) as err:
        print(f"holdout_table: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
