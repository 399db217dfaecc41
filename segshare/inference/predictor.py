"""Case in -> NIfTI out: preprocess, sliding-window predict, restore to the scan's grid, write.

:class:`Predictor` predicts one case; :func:`predict_cases` runs a list of cases with the next case
read and the last one written in background threads while the current one is computed, skips
outputs that already exist, and never lets one bad case stop the batch.

Output per case (atomic: temporary name in the same folder, then ``os.replace``):
``<case>.nii.gz`` (uint8 labels with the input's shape, affine, qform/sform and codes, header
otherwise copied) and, with ``save_probabilities``, ``<case>.npz`` holding ``probabilities``
``(I, J, K, num_classes)`` float32 on the same voxel grid.

Non-finite voxels: a scan with NaN or Inf voxels is **refused** (listed as a failure, with the
count of non-finite voxels in the scan file): silently replacing them would hide a broken
conversion, and the value to use is the user's call.

Concurrent runs into one folder: a case is claimed before it is read with an exclusive lock file
``.<case>.lock`` (:class:`CaseClaims`), so two runs never compute the same case; the lock is
removed once the case is written (or failed), and a killed run's lock is taken over.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from segshare.data.discovery import Case
from segshare.data.io import (
    INPUTS_FILE,
    atomic_target,
    read_voxels,
    save_nifti_atomic,
    write_json_atomic,
)
from segshare.data.preprocessing import Plan, preprocess_case, restore_to_original
from segshare.data.validation import DEFAULT_MAX_VOXELS, check_geometry, open_headers
from segshare.inference.claims import CaseClaims
from segshare.inference.sliding_window import WindowSettings

FAILURES_FILE = "failures.json"
#: Maps a label map on the scan's grid to the one written (e.g. connected-component postprocessing).
LabelFn = Callable[[np.ndarray], np.ndarray]
NIFTI_INTENT_LABEL = 1002


@dataclass
class PredictReport:
    """What a batch did: case ids written, skipped (output already there) and busy (being
    predicted by another run), one dict per failure, and the record files (failure list, inputs)
    that could not be written, each ``"<path>: <reason>"``."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    busy: list[str] = field(default_factory=list)
    not_written: list[str] = field(default_factory=list)


def select_shard(cases: Sequence[Case], index: int, count: int) -> list[Case]:
    """The deterministic share ``index`` of ``count`` of the cases sorted by ``case_id``.

    Cases are dealt round-robin (``sorted[index::count]``), so shard sizes differ by at most one
    and every case belongs to exactly one shard.

    Raises:
        ValueError: Unless ``count >= 1`` and ``0 <= index < count``.
    """
    if int(count) != count or count < 1:
        raise ValueError(f"shard.count must be a positive integer, got {count!r}.")
    if int(index) != index or not 0 <= index < count:
        raise ValueError(f"shard.index must be in [0, {count - 1}], got {index!r}.")
    return sorted(cases, key=lambda c: c.case_id)[int(index) :: int(count)]


def failures_file_name(index: int = 0, count: int = 1) -> str:
    """``failures.json``, or ``failures.shard-K-of-N.json`` when the batch is sharded."""
    return FAILURES_FILE if count == 1 else f"failures.shard-{index}-of-{count}.json"


def inputs_file_name(failures_name: str) -> str:
    """The list of input scans beside a failure list: ``inputs.json`` (or ``inputs.shard-...``),
    which ``segshare-evaluate`` reads to find the images of its overlays."""
    return INPUTS_FILE.removesuffix(".json") + failures_name.removeprefix("failures")


def output_paths(output_dir: Path, case_id: str) -> tuple[Path, Path]:
    """``(<case>.nii.gz, <case>.npz)`` in ``output_dir``."""
    return output_dir / f"{case_id}.nii.gz", output_dir / f"{case_id}.npz"


def argmax_labels(probs: np.ndarray) -> np.ndarray:
    """``(D, H, W, K)`` probabilities -> ``(D, H, W)`` uint8 labels, one slab at a time.

    ``np.argmax`` on the whole volume would allocate an int64 map (8 bytes per voxel).
    """
    labels = np.empty(probs.shape[:3], np.uint8)
    for i in range(probs.shape[0]):
        labels[i] = probs[i].argmax(axis=-1)
    return labels


def restored_argmax(probs: np.ndarray, properties: dict[str, Any]) -> np.ndarray:
    """``argmax(restore_to_original(probs))`` restoring one class at a time.

    Resampling back is linear per class and the uncropped region is 1.0 in every single-class
    restore, so a running maximum (ties to the lower class, as ``np.argmax``) gives the same
    labels while only one class lives on the scan's grid at a time.

    Args:
        probs: ``(D, H, W, K)`` probabilities on the preprocessed grid.
        properties: The case's preprocessing properties.

    Returns:
        ``(I, J, K)`` uint8 labels on the scan's grid.
    """
    best = labels = None
    for k in range(probs.shape[-1]):
        restored = restore_to_original(probs[..., k : k + 1], properties, is_label=False)[..., 0]
        if best is None:
            best, labels = restored, np.zeros(restored.shape, np.uint8)
            continue
        labels[restored > best] = k
        np.maximum(best, restored, out=best)
    return labels


def label_nifti(labels: np.ndarray, source: nib.Nifti1Image) -> nib.Nifti1Image:
    """Wrap a label map in a NIfTI with the source scan's geometry and header.

    Args:
        labels: ``(I, J, K)`` integer labels on the source's voxel grid.
        source: The input scan (only its header is used).

    Returns:
        A uint8 image with the source's affine, qform/sform (and their codes), zooms, units and
        description; no intensity scaling; intent "label"; cal_min/cal_max = label range.
    """
    header = source.header.copy()
    header.set_data_shape(labels.shape)
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(labels.astype(np.uint8, copy=False), source.affine, header=header)
    img.set_qform(source.header.get_qform(), code=int(source.header["qform_code"]))
    img.set_sform(source.header.get_sform(), code=int(source.header["sform_code"]))
    img.header.set_slope_inter(1.0, 0.0)
    img.header.set_intent(NIFTI_INTENT_LABEL)
    img.header["cal_min"], img.header["cal_max"] = 0, int(labels.max()) if labels.size else 0
    return img


def non_finite_message(opened: Sequence[tuple[Path, str, nib.Nifti1Image]]) -> str:
    """Why a case whose preprocessed image is not finite is refused: the NaN/Inf voxels counted
    in each scan file as stored (one NaN spreads over the whole image once normalised).

    Args:
        opened: ``(path, kind, image)`` of the case's files (``open_headers``).
    """
    counts = []
    for path, _, img in opened:
        raw = read_voxels(img, path)
        n = int(raw.size - np.count_nonzero(np.isfinite(raw)))
        if n:
            counts.append(f"{path}: {n} non-finite voxel{'' if n == 1 else 's'} (NaN or Inf)")
    if not counts:
        names = ", ".join(str(path) for path, _, _ in opened)
        return f"{names}: preprocessing made a finite scan non-finite (NaN or Inf); refused."
    return (
        "; ".join(counts) + " in the scan; refused. Replace them (e.g. with the background "
        "value) and re-run."
    )


#: A region is predicted where its sigmoid probability exceeds this (nnU-Net's rule).
REGION_THRESHOLD = 0.5


def regions_to_labels(probs: np.ndarray, regions_class_order: Sequence[int]) -> np.ndarray:
    """``(D, H, W, R)`` region probabilities -> ``(D, H, W)`` uint8 labels (nnU-Net's rule): start
    from 0 and, for each region ``i`` in order, write ``regions_class_order[i]`` wherever its
    probability exceeds :data:`REGION_THRESHOLD`, so later regions overwrite earlier ones (BraTS:
    whole tumor -> 1, then tumor core -> 2, then enhancing -> 3 inside it). One slab at a time."""
    labels = np.zeros(probs.shape[:3], np.uint8)
    for i in range(probs.shape[0]):
        for r, value in enumerate(regions_class_order):
            labels[i][probs[i, ..., r] > REGION_THRESHOLD] = value
    return labels


def probabilities_to_labels(probs: np.ndarray, plan: Plan) -> np.ndarray:
    """The label map of ``(..., K)`` probabilities: the argmax of softmax classes, or
    :func:`regions_to_labels` when ``plan`` has regions."""
    if plan.regions:
        return regions_to_labels(probs, plan.regions_class_order)
    return argmax_labels(probs)


def restore_output(probs: np.ndarray, properties: dict[str, Any], plan: Plan) -> np.ndarray:
    """``restore_to_original`` of the network's probabilities: outside the crop box softmax
    classes are background (class 0 is 1, the others 0) and regions are absent (every channel
    0), so each region channel is restored alone as ``1 - restore(1 - p)`` (a restored array's
    channel 0 is 1 outside)."""
    if not plan.regions:
        return restore_to_original(probs, properties, is_label=False)
    out = None
    for r in range(probs.shape[-1]):
        one = restore_to_original(1.0 - probs[..., r : r + 1], properties, is_label=False)
        if out is None:
            out = np.empty((*one.shape[:3], probs.shape[-1]), np.float32)
        out[..., r] = 1.0 - one[..., 0]
    return out


def restored_labels(probs: np.ndarray, properties: dict[str, Any], plan: Plan) -> np.ndarray:
    """``probabilities_to_labels(restore_output(probs))`` with one channel on the scan's grid at
    a time: :func:`restored_argmax`, or the region rule applied channel by channel."""
    if not plan.regions:
        return restored_argmax(probs, properties)
    labels = None
    for r, value in enumerate(plan.regions_class_order):
        one = 1.0 - restore_to_original(1.0 - probs[..., r : r + 1], properties, is_label=False)
        if labels is None:
            labels = np.zeros(one.shape[:3], np.uint8)
        labels[one[..., 0] > REGION_THRESHOLD] = value
    return labels


class Predictor:
    """Predicts cases with one model and its preprocessing plan.

    Args:
        predict_fn: ``(B, *roi, C)`` float32 -> ``(B, *roi, K)`` probabilities (see
            :func:`segshare.inference.model_io.make_predict_fn`).
        plan: The preprocessing plan the model was trained with.
        window: The sliding window, its ``roi_size`` set (usually the training patch size).
        progress: Show a progress bar over the windows of each case.
        max_voxels: Refuse a scan whose header declares more voxels (before reading it).
    """

    def __init__(
        self,
        predict_fn: Callable[[np.ndarray], np.ndarray],
        plan: Plan,
        window: WindowSettings,
        *,
        progress: bool = False,
        max_voxels: int = DEFAULT_MAX_VOXELS,
    ):
        if window.roi_size is None:
            raise ValueError("Predictor: the window's roi_size must be set.")
        self.predict_fn, self.plan, self.window = predict_fn, plan, window
        self.progress, self.max_voxels = bool(progress), int(max_voxels)

    def load(self, case: Case) -> tuple[np.ndarray, dict[str, Any], nib.Nifti1Image]:
        """Read and preprocess a case: ``(image (D, H, W, C) float32, properties, source)``.

        Raises:
            ValueError: Naming the file, when it is unreadable, not 3D (or 4D channels-last),
                too large, mismatched (channel shapes or affines differ), not finite, or
                discovery found a problem with its files (``Case.problem``).
        """
        if case.problem:
            raise ValueError(f"{case.images[0]}: {case.problem}")
        problems: list = []
        # headers only
        opened = open_headers(case, self.max_voxels, problems, setting="inference.max_voxels")
        if not problems:
            check_geometry(opened, 1e-3, problems)
        if problems:
            raise ValueError("; ".join(str(p) for p in problems))
        source = opened[0][2]
        image, _, props = preprocess_case(case.images, None, self.plan)
        if not np.isfinite(image).all():
            raise ValueError(non_finite_message(opened))
        return image, props, source

    def predict_array(self, image: np.ndarray) -> np.ndarray:
        """Probabilities ``(D, H, W, K)`` float32 for a preprocessed ``(D, H, W, C)`` image."""
        return self.window.predict(image, self.predict_fn, self.plan.num_classes, self.progress)

    def write(
        self,
        case_id: str,
        probs: np.ndarray,
        props: dict[str, Any],
        source: nib.Nifti1Image,
        output_dir: Path,
        save_probabilities: bool = False,
        postprocess: LabelFn | None = None,
    ) -> Path:
        """Restore ``probs`` to the scan's grid, write the labels (and probabilities) atomically;
        ``postprocess`` maps the labels on the scan's grid before they are written.

        Probabilities are resampled back before the argmax or the region rule (as nnU-Net).
        Unless they are saved, no ``(I, J, K, num_classes)`` buffer is made: without resampling
        the labels are made first (uncropping adds class 0, reorienting permutes voxels), with
        resampling one channel is restored at a time (:func:`restored_labels`); the labels are
        the same.
        """
        nii_path, npz_path = output_paths(output_dir, case_id)
        if save_probabilities:
            probs = restore_output(probs, props, self.plan)
            # before the NIfTI: an existing NIfTI means a complete case
            with atomic_target(npz_path, ".npz") as tmp:
                np.savez_compressed(tmp, probabilities=probs)
            labels = probabilities_to_labels(probs, self.plan)
        elif list(props["resampled_shape"]) != list(props["cropped_shape"]):
            labels = restored_labels(probs, props, self.plan)
        else:
            labels = restore_to_original(
                probabilities_to_labels(probs, self.plan), props, is_label=True
            )
        del probs
        if postprocess is not None:
            labels = postprocess(labels)
        return save_nifti_atomic(label_nifti(labels, source), nii_path)


def _remove_stale_temporaries(output_dir: Path, case_id: str) -> None:
    """Delete the temporary files a killed run left for a case (called by its claim's holder)."""
    for prefix in (f".{case_id}.nii.gz.", f".{case_id}.npz."):
        for tmp in output_dir.glob(glob.escape(prefix) + "*"):
            tmp.unlink(missing_ok=True)


def _is_done(out: Path, case: Case, save_probabilities: bool) -> bool:
    """Whether the outputs of ``case`` exist (never for a case whose input is broken)."""
    nii, npz = output_paths(out, case.case_id)
    return not case.problem and nii.exists() and (npz.exists() or not save_probabilities)


def _claimed(
    todo: Sequence[Case],
    out: Path,
    claims: CaseClaims,
    report: PredictReport,
    skip_existing: bool,
    save_probabilities: bool,
    bar,
) -> Iterator[Case]:
    """The cases of ``todo`` this run claims, one at a time (claimed just before they are read);
    the others go to ``report.busy`` (claimed elsewhere) or ``report.skipped`` (finished
    elsewhere meanwhile)."""
    for case in todo:
        if not claims.claim(case.case_id):
            report.busy.append(case.case_id)
        elif skip_existing and _is_done(out, case, save_probabilities):
            claims.release(case.case_id)
            report.skipped.append(case.case_id)
        else:
            _remove_stale_temporaries(out, case.case_id)
            yield case
            continue
        bar.update(1)


def _predict_overlapped(
    predictor: Predictor,
    todo: Sequence[Case],
    out: Path,
    save_probabilities: bool,
    report: PredictReport,
    progress: bool,
    claims: CaseClaims,
    skip_existing: bool,
    postprocess: LabelFn | None = None,
) -> None:
    """Predict ``todo`` into ``out``, reading the next case and writing the last one in background
    threads; each case's outcome goes into ``report`` (a failure never stops the others). Each
    case is claimed (``claims``) before it is read and released once written or failed."""
    from tqdm.auto import tqdm

    lock = threading.Lock()

    def fail(case: Case, err: BaseException) -> None:
        with lock:
            report.failed.append(
                {"case_id": case.case_id, "file": str(case.images[0]), "reason": str(err)}
            )

    def write(case: Case, probs, props, source) -> None:
        try:
            predictor.write(
                case.case_id, probs, props, source, out, save_probabilities, postprocess
            )
            with lock:
                report.written.append(case.case_id)
        except Exception as err:  # noqa: BLE001 - reported per case
            fail(case, err)
        finally:
            claims.release(case.case_id)

    bar = tqdm(total=len(todo), desc="cases", unit="case", disable=not progress)
    cases = _claimed(todo, out, claims, report, skip_existing, save_probabilities, bar)
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        case = next(cases, None)
        load = reader.submit(predictor.load, case) if case is not None else None
        last_write: Future | None = None
        while case is not None:
            following = next(cases, None)  # claimed now, read while this one is predicted
            next_load = reader.submit(predictor.load, following) if following else None
            try:
                image, props, source = load.result()
                load = None  # drop the reference: the image is freed after prediction
                probs = predictor.predict_array(image)
                del image
            except Exception as err:  # noqa: BLE001 - reported per case
                fail(case, err)
                claims.release(case.case_id)
            else:
                if last_write is not None:
                    last_write.result()  # at most one case waits in memory to be written
                last_write = writer.submit(write, case, probs, props, source)
                del probs
            bar.update(1)
            case, load = following, next_load
    bar.close()


def predict_cases(
    predictor: Predictor,
    cases: Sequence[Case],
    output_dir: str | os.PathLike,
    *,
    save_probabilities: bool = False,
    skip_existing: bool = True,
    failures_name: str = FAILURES_FILE,
    progress: bool = True,
    postprocess: LabelFn | None = None,
    on_finished: Callable[[PredictReport], None] | None = None,
    lock_stale_seconds: float = 600.0,
) -> PredictReport:
    """Predict every case into ``output_dir``; one bad case never stops the others.

    Reading/preprocessing of the next case and restoring/writing of the previous one run in
    background threads while the current case is computed. Existing outputs are skipped, so a
    re-run after a crash only does the missing cases. A case is claimed with a lock file before
    it is read (:class:`CaseClaims`), so concurrent runs into one folder compute each case once.
    Failures (file and reason) are returned and written to ``output_dir/failures_name`` (an empty
    list when none failed); the scans of the cases to ``inputs.json`` beside it
    (:func:`inputs_file_name`), so that ``segshare-evaluate`` shows them under its overlays. A
    record that cannot be written (a full disk) is listed in ``PredictReport.not_written``, never
    raised: the report still says which cases failed.

    Args:
        predictor: The configured :class:`Predictor`.
        cases: The cases to predict (already sharded).
        output_dir: Destination folder (created).
        save_probabilities: Also write ``<case>.npz`` with the class probabilities.
        skip_existing: Skip cases whose ``<case>.nii.gz`` (and ``.npz`` if asked) exist; a case
            whose input discovery found broken (``Case.problem``) is never skipped: it fails.
        failures_name: File name of the failure list inside ``output_dir``.
        progress: Show a progress bar over cases.
        postprocess: maps each label map (on the scan's grid) before it is written.
        on_finished: called with the report once every case is done, before any record file is
            written (the app prints the failures there).
        lock_stale_seconds: a lock not refreshed for this long is taken over (its run died).

    Returns:
        A :class:`PredictReport`.
    """
    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = PredictReport()
    todo = []
    for case in cases:
        if skip_existing and _is_done(out, case, save_probabilities):
            report.skipped.append(case.case_id)
        else:
            todo.append(case)
    with CaseClaims(out, lock_stale_seconds) as claims:
        _predict_overlapped(
            predictor, todo, out, save_probabilities, report, progress, claims, skip_existing,
            postprocess,
        )  # fmt: skip
    for names in (report.written, report.skipped, report.busy):
        names.sort()
    report.failed.sort(key=lambda f: f["case_id"])
    report.seconds = time.perf_counter() - start
    if on_finished is not None:
        on_finished(report)
    inputs = {c.case_id: [os.path.realpath(p) for p in c.images] for c in cases}
    for content, name in (
        (report.failed, failures_name),
        (inputs, inputs_file_name(failures_name)),
    ):
        try:
            write_json_atomic(content, out / name)
        except OSError as err:
            report.not_written.append(f"{out / name}: not written ({err.strerror or err})")
    return report
