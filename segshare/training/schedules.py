"""Learning-rate schedules as pure functions of the epoch (a resumed run needs no extra state)."""

from __future__ import annotations

SCHEDULES = ("poly", "constant")


def learning_rate_at(
    epoch: int, max_epochs: int, initial: float, schedule: str = "poly", exponent: float = 0.9
) -> float:
    """Learning rate for 0-based ``epoch`` of ``max_epochs``: nnU-Net's poly decay
    ``initial * (1 - epoch / max_epochs) ** exponent``, or constant."""
    if schedule not in SCHEDULES:
        raise ValueError(f"trainer.lr_schedule must be one of {SCHEDULES}, got {schedule!r}.")
    if schedule == "constant":
        return float(initial)
    return float(initial) * (1.0 - min(epoch, max_epochs) / max_epochs) ** exponent
