"""One training loop for every backend and strategy: custom step, real validation, resume.

Keras 3 ``model.fit`` fails under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585), so the
step is ours (:mod:`segshare.training.steps`: a ``GradientTape`` step under TensorFlow, a
stateless ``jax.jit`` step under JAX); this loop holds everything else, the same on every
backend. Every epoch ends with sliding-window validation on whole cases (per-case Dice, not
patch pseudo-Dice), an atomic ``latest`` checkpoint, and the best model (by foreground-mean Dice)
as ``model.keras``. Everything random is derived from ``(seed, epoch)``, so a resumed run
continues exactly. A run resumes only from a whole, verified checkpoint
(:mod:`segshare.training.run_folder`): a damaged one is refused, never silently replaced by a
fresh start. TensorBoard logs are written through TensorFlow when it is installed (under JAX it
is imported for nothing else, with its GPUs hidden).
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from tqdm.auto import tqdm

from segshare.data.augment import AugmentByLength
from segshare.data.io import atomic_folder, write_text_atomic
from segshare.data.pipeline import TrainingFeed
from segshare.evaluation.overlap import overlap_metrics
from segshare.inference.model_io import make_predict_fn, slice_predict_fn
from segshare.inference.predictor import probabilities_to_labels
from segshare.inference.sliding_window import WindowSettings
from segshare.training.checkpoints import (
    OPTIMIZER,
    STATE,
    WEIGHTS,
    load_checkpoint,
    save_checkpoint,
)
from segshare.training.run_folder import RESUME_POINTS, content_checksums, resume_point, way_out
from segshare.training.schedules import learning_rate_at
from segshare.training.steps import make_steps
from segshare.training.strategy import is_chief, make_strategy, resolve_jit_compile


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class LoopSettings:
    """The loop's settings (``conf/trainer/default.yaml``; every value is set there).

    Attributes:
        max_epochs: epochs of the run (raising it on a resumed run extends the run); ignored
            when ``budget_minutes`` is set.
        budget_minutes: train for this much wall time instead of ``max_epochs``: the number of
            epochs is derived once, after epoch 0, from its measured step time (steps after the
            first three) and validation time, and kept in the checkpoints (a resumed run keeps
            it). None: ``max_epochs``.
        epochs_per_run: stop after this many epochs in one invocation (None: run to the end).
        steps_per_epoch: optimizer steps per epoch.
        val_every: validate every N epochs (and after the last one).
        max_val_cases: validate on at most this many of the fold's cases (None: all).
        strategy: ``auto | default | mirrored | multi_worker`` (see ``training.strategy``).
        precision: Keras dtype policy: ``float32 | mixed_float16 | mixed_bfloat16``.
        jit_compile: XLA for the train step: True, False or ``"auto"`` (on with a GPU).
        grad_clip_norm: clip gradients to this global norm (None: no clipping).
        initial_lr: the learning rate of epoch 0, decayed by ``lr_schedule``.
        lr_schedule: ``poly | constant``.
        poly_exponent: exponent of the poly decay.
        deterministic: deterministic TensorFlow ops.
        seed: seed of every random step (weights, patches, augmentation).
        progress: show progress bars.
        resume_from: the checkpoint an existing run folder resumes from: ``latest`` or ``best``
            (rolls the run back to its best epoch, e.g. when ``latest`` is damaged).
    """

    max_epochs: int
    budget_minutes: float | None
    epochs_per_run: int | None
    steps_per_epoch: int
    val_every: int
    max_val_cases: int | None
    strategy: str
    precision: str
    jit_compile: bool | str
    grad_clip_norm: float | None
    initial_lr: float
    lr_schedule: str
    poly_exponent: float
    deterministic: bool
    seed: int
    progress: bool
    resume_from: str

    def __post_init__(self) -> None:
        if self.resume_from not in RESUME_POINTS:
            raise ValueError(
                f"trainer.resume_from must be 'latest' or 'best', got {self.resume_from!r}."
            )
        if self.budget_minutes is not None and not float(self.budget_minutes) > 0:
            raise ValueError(
                f"trainer.budget_minutes must be > 0 (or null), got {self.budget_minutes!r}."
            )
        if self.budget_minutes is not None and self.strategy == "multi_worker":
            raise ValueError(
                "trainer.budget_minutes cannot be used with trainer.strategy=multi_worker (each "
                "worker would measure its own epoch count); set trainer.max_epochs instead."
            )


def budget_epochs(
    budget_seconds: float, first_epoch_seconds: float, epoch_seconds: float, val_seconds: float,
    val_every: int,
) -> int:  # fmt: skip
    """Epochs that fit a time budget: epoch 0 (already done, ``first_epoch_seconds``) plus as many
    epochs of ``epoch_seconds`` (and a validation of ``val_seconds`` every ``val_every`` epochs)
    as the rest of the budget holds; at least 1."""
    per_epoch = epoch_seconds + val_seconds / max(int(val_every), 1)
    rest = budget_seconds - first_epoch_seconds
    return max(1, 1 + int(rest // per_epoch)) if per_epoch > 0 else 1


def _tensorboard_writer(folder: Path) -> Callable[[dict], None] | None:
    """A function writing one epoch's row as TensorBoard scalars, or None without TensorFlow."""
    import importlib.util

    if keras.backend.backend() != "tensorflow" and importlib.util.find_spec("tensorflow") is None:
        print("TensorBoard logs need TensorFlow, which is not installed: train_log.csv only.")
        return None
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        tf.config.set_visible_devices([], "GPU")  # the GPUs stay JAX's
    writer = tf.summary.create_file_writer(str(folder))

    def write(row: dict) -> None:
        with writer.as_default(step=int(row["epoch"])):
            for key, value in row.items():
                if key != "epoch":
                    tf.summary.scalar(key, value)
        writer.flush()

    return write


def dice_per_class(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of classes ``1..K-1`` (one confusion-matrix pass); NaN where both are empty. Voxels
    whose reference is ``>= K`` (the ignore label) are not counted."""
    labels = range(1, num_classes)
    annotated = ref < num_classes
    if not annotated.all():
        pred, ref = pred[annotated], ref[annotated]
    metrics = overlap_metrics(pred, ref, labels)
    return np.array([metrics[k]["Dice"] for k in labels], dtype=np.float64)


def dice_per_region(pred: np.ndarray, ref: np.ndarray, regions: list[list[int]]) -> np.ndarray:
    """Dice of each region (the union of its values in both maps); NaN where both are empty.
    Voxels whose reference is above every region value (the ignore label) are not counted."""
    top = max(v for values in regions for v in values)
    annotated = ref <= top
    if not annotated.all():
        pred, ref = pred[annotated], ref[annotated]
    dices = []
    for values in regions:
        masks = [np.isin(a, values).astype(np.uint8) for a in (pred, ref)]
        dices.append(overlap_metrics(*masks, [1])[1]["Dice"])
    return np.array(dices, dtype=np.float64)


def _nanmean(values: np.ndarray) -> np.ndarray | float:
    """Mean over the first axis ignoring NaN; NaN (not a warning) where everything is NaN."""
    values = np.asarray(values, dtype=np.float64)
    counts = np.sum(np.isfinite(values), axis=0)
    sums = np.nansum(values, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


class Trainer:
    """Holds the model, optimizer, strategy and step; ``fit`` runs (or resumes) the epochs.

    Args:
        model: the network (built under ``strategy.scope()``).
        optimizer: its optimizer (built for the model's variables).
        loss_fn: ``loss(labels, outputs)``.
        feed: the fold's training batches and validation cases.
        run_dir: the run folder (checkpoints, log, ``model.keras``, TensorBoard).
        settings: the loop's settings.
        window: the sliding window of validation (``roi_size`` None = the training patch).
        strategy: from :func:`~segshare.training.strategy.make_strategy` (default: one device).
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        loss_fn: Callable,
        feed: TrainingFeed,
        run_dir: Path,
        settings: LoopSettings,
        window: WindowSettings,
        *,
        strategy: Any = None,
    ):
        self.strategy = strategy if strategy is not None else make_strategy("default")
        self.model, self.optimizer, self.loss_fn, self.feed = model, optimizer, loss_fn, feed
        self.window = window.with_default_roi(feed.window_size)
        plan = feed.prepared.plan
        self.plan = plan
        self.num_classes = plan.num_classes
        # what validation scores: classes 1..K-1, or every region
        self.scored_names = (
            list(plan.regions)
            if plan.regions
            else [
                {v: n for n, v in plan.labels.items()}.get(k, k) for k in range(1, plan.num_classes)
            ]
        )
        self.run_dir, self.s = Path(run_dir), settings
        # None until epoch 0 of a budgeted run has measured how many epochs fit
        self.max_epochs = None if settings.budget_minutes is not None else settings.max_epochs
        self._augment_line: str | None = None  # the AugmentByLength choice last printed
        self.chief = is_chief(self.strategy)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.log_path = self.run_dir / "train_log.csv"
        self._steps = make_steps(
            model,
            optimizer,
            loss_fn,
            self.strategy,
            jit_compile=resolve_jit_compile(settings.jit_compile),
            num_workers=int(feed.data.num_workers),
        )
        self._predict = make_predict_fn(model, activation="sigmoid" if plan.regions else "softmax")
        if feed.slice_axis is not None:  # a 2D network validates slice by slice
            self._predict = slice_predict_fn(self._predict, feed.slice_axis)

    # -- validation --------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Sliding-window prediction of every validation case; mean Dice per class, or per region
        (nanmean)."""
        dices = []
        for _case_id, image, label in self.feed.validation_cases():
            probs = self.window.predict(
                np.asarray(image, dtype=np.float32), self._predict, self.num_classes
            )
            pred, ref = probabilities_to_labels(probs, self.plan), np.asarray(label)
            if self.plan.regions:
                dices.append(dice_per_region(pred, ref, self.plan.region_values))
            else:
                dices.append(dice_per_class(pred, ref, self.num_classes))
        empty = np.full((1, len(self.scored_names)), np.nan)
        mean = _nanmean(np.stack(dices) if dices else empty)
        result = {
            f"val_dice_{name}": float(v) for name, v in zip(self.scored_names, mean, strict=True)
        }
        result["val_dice_fg_mean"] = float(_nanmean(mean))
        return result

    # -- state -------------------------------------------------------------------------------
    def _restore(self) -> tuple[int, float]:
        found = resume_point(self.run_dir, self.s.resume_from)  # raises when damaged
        if found is None:
            return 0, -math.inf
        state = self._load_verified(found)
        if self.s.budget_minutes is not None and state.get("max_epochs"):
            self.max_epochs = int(state["max_epochs"])  # the budget's epochs, fixed in epoch 0
        epoch = int(state["epoch"]) + 1
        latest = self.run_dir / "checkpoints" / "latest"
        if found.resolve() != latest.resolve():  # resume_from=best: best becomes the resume point
            with atomic_folder(latest) as tmp:  # before the log loses the later epochs
                for item in found.iterdir():
                    shutil.copy2(item, tmp / item.name)
        self._truncate_log(epoch)
        print(f"Resuming from {found} at epoch {epoch} (best foreground Dice {state['best']:.4f}).")
        return epoch, float(state["best"])

    def _load_verified(self, folder: Path) -> dict:
        """Load a checkpoint into the model and optimizer, then compare what was read with the
        checksums its ``state.json`` recorded.

        Raises:
            ValueError: naming the file that cannot be loaded or does not match.
        """
        advice = way_out(self.s.resume_from)
        try:
            state = load_checkpoint(folder, self.model, self.optimizer)
        except Exception as err:  # Keras and h5py raise many types for a broken checkpoint
            reason = " ".join(str(err).split())
            raise ValueError(f"{folder}: cannot be loaded ({reason}). {advice}") from err
        recorded = state.get("checksums")
        if not recorded:
            print(f"{folder}: written without checksums (older segshare); not verified.")
            return state
        actual = content_checksums(self.model, self.optimizer)
        for name in (WEIGHTS, OPTIMIZER):
            if recorded.get(name) != actual[name]:
                raise ValueError(
                    f"{folder / name}: damaged (what it holds does not match the checksum in "
                    f"{folder / STATE}). {advice}"
                )
        return state

    def _truncate_log(self, next_epoch: int) -> None:
        if not self.log_path.exists() or not self.chief:
            return
        with open(self.log_path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) < next_epoch]
        self._write_log(rows)

    def _write_log(self, rows: list[dict]) -> None:
        if not rows:
            return
        buffer = io.StringIO()
        fields = list(dict.fromkeys(key for row in rows for key in row))  # union, first-seen order
        writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(buffer.getvalue(), self.log_path)

    def _append_log(self, row: dict) -> None:
        rows = []
        if self.log_path.exists():
            with open(self.log_path, newline="") as fh:
                rows = list(csv.DictReader(fh))
        self._write_log([*rows, row])

    def _save_best(self) -> None:
        tmp = self.run_dir / ".model.tmp.keras"
        self.model.save(tmp)
        os.replace(tmp, self.run_dir / "model.keras")

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train from the latest checkpoint (if any) to the last epoch; returns the last row."""
        start, best = self._restore()
        last: dict = {}
        if self.max_epochs is not None and start >= self.max_epochs:
            print(f"Nothing to do: {self.max_epochs} epochs already trained in {self.run_dir}.")
        writer = _tensorboard_writer(self.run_dir / "tensorboard") if self.chief else None
        epoch, ran = start, 0
        while self.max_epochs is None or epoch < self.max_epochs:
            if self.s.epochs_per_run and ran >= int(self.s.epochs_per_run):
                break
            t0 = time.perf_counter()
            planned = self.max_epochs or int(self.s.max_epochs)  # epoch 0 of a budget: provisional
            lr = learning_rate_at(
                epoch, planned, self.s.initial_lr, self.s.lr_schedule, self.s.poly_exponent
            )
            loss, step_seconds = self._train_epoch(epoch, lr, planned * self.s.steps_per_epoch)
            row = {"epoch": epoch, "train_loss": loss, "lr": lr}
            t_val = time.perf_counter()
            improved = False
            if self.chief and (
                (epoch + 1) % self.s.val_every == 0
                or epoch + 1 == self.max_epochs
                or self.max_epochs is None  # budget: time one validation in epoch 0
            ):
                row.update(self.validate())
                score = row["val_dice_fg_mean"]
                if math.isfinite(score) and score > best:
                    best, improved = score, True
                    self._save_best()
                    self._checkpoint("best", epoch, best, lr)
            if self.max_epochs is None:
                self._fix_budget(t0, t_val, step_seconds)
                if improved:  # "best" was written above, before the budget: now with its epochs
                    self._checkpoint("best", epoch, best, lr)
            row["best_val_dice_fg_mean"] = best if math.isfinite(best) else float("nan")
            row["seconds"] = round(time.perf_counter() - t0, 2)
            if self.chief:
                self._record(row, writer)
                self._checkpoint("latest", epoch, best, lr)
            last, epoch, ran = row, epoch + 1, ran + 1
        if self.max_epochs is not None and epoch < self.max_epochs and self.chief:
            print(f"Stopped after epoch {epoch - 1} (trainer.epochs_per_run); rerun to continue.")
        if self.chief and not (self.run_dir / "model.keras").exists():
            self._save_best()  # no validation score yet: keep the last model
        return last

    def _fix_budget(self, t0: float, t_val: float, step_seconds: list[float]) -> None:
        """After epoch 0 of a budgeted run: the number of epochs that fit the budget."""
        now = time.perf_counter()
        steady = step_seconds[3:] or step_seconds
        epoch_s = float(np.median(steady)) * self.s.steps_per_epoch
        self.max_epochs = budget_epochs(
            60.0 * float(self.s.budget_minutes), now - t0, epoch_s, now - t_val, self.s.val_every
        )
        print(
            f"Budget {self.s.budget_minutes} min: {self.max_epochs} epochs of "
            f"{self.s.steps_per_epoch} steps ({np.median(steady):.3f} s/step, validation "
            f"{now - t_val:.1f} s every {self.s.val_every} epochs)."
        )

    def _train_epoch(self, epoch: int, lr: float, total_steps: int) -> tuple[float, list[float]]:
        """The optimizer steps of ``epoch`` at learning rate ``lr`` of a run of ``total_steps``
        steps (which choose an :class:`AugmentByLength`'s set); returns the mean loss and each
        step's seconds.

        Raises:
            TrainingDiverged: the loss became NaN or infinite.
        """
        self.optimizer.learning_rate.assign(lr)
        keras.utils.set_random_seed(self.s.seed + epoch)
        augment = self.feed.data.augment
        if isinstance(augment, AugmentByLength) and self.chief:
            line = augment.describe(total_steps)
            if line != self._augment_line:
                print(line)
            self._augment_line = line
        self._steps.start(self.feed.batches(epoch, total_steps))
        losses, seconds = [], []
        bar = tqdm(
            range(self.s.steps_per_epoch),
            desc=f"epoch {epoch + 1}/{self.max_epochs or '?'}",
            disable=not (self.s.progress and self.chief),
            leave=False,
        )
        try:
            for _ in bar:
                t = time.perf_counter()
                loss = self._steps.step()
                seconds.append(time.perf_counter() - t)
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"Loss became {loss} in epoch {epoch}; stopped. The last good checkpoint "
                        f"is kept in {self.ckpt_dir / 'latest'}."
                    )
                losses.append(loss)
                bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        except BaseException:
            self._steps.abort()  # workers released; nothing of the failed epoch is kept
            raise
        self._steps.finish()
        return float(np.mean(losses)), seconds

    def _checkpoint(self, name: str, epoch: int, best: float, lr: float) -> None:
        state = self._state(epoch, best, lr)
        save_checkpoint(self.ckpt_dir / name, self.model, self.optimizer, state)

    def _record(self, row: dict, writer) -> None:
        """One epoch's row into ``train_log.csv``, TensorBoard and the console."""
        self._append_log(row)
        if writer is not None:
            writer(row)
        print(
            " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        )

    def _state(self, epoch: int, best: float, lr: float) -> dict:
        return {
            "epoch": epoch,
            "best": best if math.isfinite(best) else -1.0,
            "learning_rate": lr,
            "seed": self.s.seed,
            "max_epochs": self.max_epochs,
            "rng": {"keras_seed": self.s.seed + epoch, "data_seed": [self.s.seed, epoch]},
            "checksums": content_checksums(self.model, self.optimizer),
        }
