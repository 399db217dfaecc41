"""Find the cases of a dataset folder: MSD layout, nnU-Net raw layout, or a plain pair of folders.

Layouts read:

* **MSD**: ``dataset.json`` with a ``training`` list of ``{"image": ..., "label": ...}`` (paths
  relative to the root); an image may be 4D with channels last.
* **nnU-Net raw**: ``imagesTr/{case}_{XXXX}.nii.gz`` (one file per channel),
  ``labelsTr/{case}.nii.gz``, ``dataset.json`` with ``channel_names``, ``labels``, ``file_ending``.
* **plain**: ``imagesTr/`` and ``labelsTr/`` (or ``images/`` and ``labels/``) with equal file names.

Discovery reads no voxel data. What it cannot make sense of (a missing label, a path outside the
root, a malformed ``dataset.json``) is recorded in ``Dataset.problems`` for validation to report
together with everything else.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from segshare.data.io import is_nifti_path, read_json, strip_nifti_suffix

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_FOLDER_PAIRS = (("imagesTr", "labelsTr"), ("images", "labels"))


@dataclass(frozen=True)
class Case:
    """One scan: its image file(s) (one per channel, or one 4D file) and optional label map."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None
    problem: str | None = None  # found by discovery (e.g. a missing channel file); fails the case


@dataclass
class Dataset:
    """A discovered dataset.

    Attributes:
        root: the dataset folder.
        cases: cases sorted by ``case_id``.
        labels: label name -> integer value (nnU-Net v2 convention), background and the
            ignore label (``"ignore"``, if any) included. Empty when the folder carries no
            ``dataset.json`` (filled from the data later).
        channel_names: channel index (as a string) -> modality name, e.g. ``{"0": "CT"}``.
        file_ending: ``.nii.gz`` or ``.nii``.
        problems: ``(path, message)`` pairs found while discovering (reported by validation).
        regions: region name -> label values, when ``dataset.json`` declares regions
            (:func:`parse_regions`; ``labels`` then names the values); None otherwise.
        regions_class_order: the value each region writes into a predicted label map.
    """

    root: Path
    cases: list[Case]
    labels: dict[str, int]
    channel_names: dict[str, str]
    file_ending: str
    problems: list[tuple[str, str]] = field(default_factory=list)
    regions: dict[str, list[int]] | None = None
    regions_class_order: list[int] | None = None

    @property
    def case_ids(self) -> list[str]:
        """The case identifiers, in order."""
        return [c.case_id for c in self.cases]


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti_path(p.name))


def _nifti_entries(folder: Path) -> list[Path]:
    """Every entry of ``folder`` with a NIfTI name, whatever it is (see :func:`not_a_file`)."""
    return sorted(p for p in folder.iterdir() if is_nifti_path(p.name))


def not_a_file(path: Path) -> str | None:
    """Why an entry with a NIfTI name cannot be read as a file (``None``: it is a regular file,
    or a symbolic link to one): a dangling link, a link loop, a folder, a device or pipe."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symbolic link loop"
        if path.is_symlink():
            return f"a dangling symbolic link (its target '{os.readlink(path)}' does not exist)"
        return f"unreadable ({err.strerror})"
    if stat.S_ISDIR(mode):
        return "a folder, not a NIfTI file"
    return None if stat.S_ISREG(mode) else "not a regular file"


def check_unique_case_files(files: Sequence[Path], folder: str | os.PathLike) -> None:
    """Refuse two files of one case id (``x.nii`` and ``x.nii.gz``): one would silently win.

    Raises:
        ValueError: naming ``folder``, each such case id and both files (one line).
    """
    by_stem: dict[str, list[str]] = {}
    for path in files:
        by_stem.setdefault(strip_nifti_suffix(Path(path).name), []).append(Path(path).name)
    twice = {stem: names for stem, names in sorted(by_stem.items()) if len(names) > 1}
    if twice:
        listed = "; ".join(f"{stem!r}: {', '.join(names)}" for stem, names in twice.items())
        raise ValueError(
            f"{folder}: more than one file for one case id ({listed}); one would overwrite or "
            f"hide the other: remove or rename one."
        )


def _mark_broken(cases: list[Case], entries: Sequence[Path]) -> list[Case]:
    """Give each case holding an entry that is not a file (:func:`not_a_file`) a problem."""
    broken = {p: why for p in entries if (why := not_a_file(p)) is not None}
    if not broken:
        return cases
    out = []
    for case in cases:
        reasons = [f"{p.name} is {broken[p]}" for p in case.images if p in broken]
        if reasons:
            problem = "; ".join([*reasons, *([case.problem] if case.problem else [])])
            case = replace(case, problem=problem)
        out.append(case)
    return out


def _group_channels(
    files: list[Path], in_channels: int | None = None, case_ids: set[str] | frozenset = frozenset()
) -> list[Case]:
    """Read ``files`` as nnU-Net ``{case}_{XXXX}`` channel files (one Case per case) or as one
    case per file, whichever the names support.

    Every name must end in ``_XXXX`` to be read as channels. Then, in order:

    1. Known case ids (``case_ids``: the label files' names of a training folder) decide when
       one reading matches more of them than the other.
    2. Otherwise the channel runs decide: with ``n`` = ``in_channels`` (the model's, when known)
       or the most common number of files per case, the files are channels when at least half
       of the cases have exactly ``0000 .. n-1``. A case that then has other channels (one
       missing, one extra, ``0000 + 0002``) gets a :attr:`Case.problem` naming them, which
       validation and prediction report as that case's error.

    So ``patient_2019``, ``scan_0001 .. scan_0004`` or (for a one-channel model)
    ``img_0000 .. img_0010`` stay one case per file, while one stray ``c_0001`` beside ``a_0000,
    b_0000, c_0000`` fails case ``c`` alone.
    """
    stems = [strip_nifti_suffix(p.name) for p in files]
    single = sorted(
        (Case(s, (p,)) for s, p in zip(stems, files, strict=True)), key=lambda c: c.case_id
    )
    matches = [_CHANNEL_RE.match(s) for s in stems]
    if not files or not all(matches):
        return single
    groups: dict[str, dict[int, Path]] = {}
    for m, p in zip(matches, files, strict=True):
        groups.setdefault(m["case"], {})[int(m["channel"])] = p
    grouped_hits, single_hits = len(case_ids & groups.keys()), len(case_ids & set(stems))
    n = in_channels or Counter(len(ch) for ch in groups.values()).most_common(1)[0][0]
    expected = list(range(n))
    fits = sum(sorted(ch) == expected for ch in groups.values())
    if grouped_hits < single_hits or (grouped_hits == single_hits and 2 * fits < len(groups)):
        return single
    cases = []
    for cid, chans in sorted(groups.items()):
        problem = None
        if sorted(chans) != expected:
            problem = (
                f"case {cid!r} has channel files {', '.join(f'_{c:04d}' for c in sorted(chans))}, "
                f"expected {', '.join(f'_{c:04d}' for c in expected)}"
            )
        cases.append(Case(cid, tuple(chans[c] for c in sorted(chans)), problem=problem))
    return cases


def discover_images(path: str | os.PathLike, in_channels: int | None = None) -> list[Case]:
    """List the scans to predict on.

    Args:
        path: a NIfTI file, a folder of NIfTI files, or a dataset folder with ``imagesTs/`` or
            ``imagesTr/`` (``imagesTs`` preferred). nnU-Net ``{case}_{XXXX}`` channel files are
            grouped into one Case (see :func:`_group_channels` for when names count as channels).
        in_channels: the channels the model takes, when known (see :func:`_group_channels`).

    Returns:
        Cases without labels, sorted by ``case_id``.

    Raises:
        ValueError: the path does not exist, holds no NIfTI file, or holds two files of one
            case id (``x.nii`` and ``x.nii.gz``: :func:`check_unique_case_files`).

    An entry with a NIfTI name that is not a file (a dangling link, a link loop, a folder) is
    kept, its case with a :attr:`Case.problem` saying so: prediction lists it as a failure.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: input path does not exist")
    if path.is_file():
        if not is_nifti_path(path.name):
            raise ValueError(f"{path}: not a NIfTI file name (expected .nii or .nii.gz)")
        return [Case(strip_nifti_suffix(path.name), (path,))]
    for sub in ("imagesTs", "imagesTr"):
        if (path / sub).is_dir():
            path = path / sub
            break
    entries = _nifti_entries(path)
    if not entries:
        raise ValueError(f"{path}: no .nii or .nii.gz files found")
    check_unique_case_files(entries, path)
    return _mark_broken(_group_channels(entries, in_channels), entries)


#: nnU-Net's name of the label that marks voxels nobody annotated (its value is the highest).
IGNORE_LABEL = "ignore"

_LABEL_FORMS = 'nnU-Net {"name": 1} or MSD {"1": "name"}'


def parse_labels(
    raw: object,
    where: str,
    problems: list[tuple[str, str]] | None = None,
) -> dict[str, int]:
    """The ``labels`` entry of a ``dataset.json``: nnU-Net v2 ``{"name": int}`` or MSD
    ``{"0": "name"}`` -> ``{"name": int}``, the ignore label (``"ignore"``) included.

    Args:
        raw: the ``labels`` value.
        where: the file it came from (for messages).
        problems: where ``(where, message)`` pairs go for what segshare cannot honour: a
            non-mapping, a value that is not an integer, a region (a list of values: nnU-Net's
            region-based labels, read by :func:`parse_regions` when the file has a
            ``regions_class_order``), two names with one value, an ``ignore`` label that is not
            the highest value. ``None``: the first problem raises.

    Returns:
        ``{name: label}`` in the file's order.

    Raises:
        ValueError: with ``problems`` ``None``, a problem (names ``where``).
    """
    found: list[str] = []
    labels: dict[str, int] = {}
    if not isinstance(raw, dict):
        found.append(f"'labels' must be a mapping, got {raw!r}")
        raw = {}
    for key, value in raw.items():
        if isinstance(value, int) and not isinstance(value, bool):
            labels[str(key)] = value
        elif isinstance(value, list):
            found.append(
                f"label {key!r}: {value!r} is a region (a list of values), which needs "
                "'regions_class_order' in dataset.json (nnU-Net's rule: the value each region "
                f"writes into the label map); or give each label one integer value ({_LABEL_FORMS})"
            )
        elif isinstance(value, str) and str(key).lstrip("-").isdigit():
            labels[value] = int(key)
        else:
            found.append(f"label {key!r}: {value!r} is not an integer value ({_LABEL_FORMS})")
    by_value: dict[int, list[str]] = {}
    for name, value in labels.items():
        by_value.setdefault(value, []).append(name)
    for value, names in by_value.items():
        if len(names) > 1:
            found.append(f"labels {names} all have the value {value}; each label needs its own")
    others = [v for k, v in labels.items() if k != IGNORE_LABEL]
    _check_ignore(labels.get(IGNORE_LABEL), others, found)
    _report(found, where, problems)
    return labels


def _check_ignore(ignore: int | None, values: list[int], found: list[str]) -> None:
    """nnU-Net's rule: the ignore label has the highest value."""
    if ignore is not None and values and ignore <= max(values):
        found.append(
            f"label 'ignore' has the value {ignore}, but the ignore label must have the "
            f"highest value (nnU-Net's rule): give it a value above {max(values)}"
        )


def _report(found: list[str], where: str, problems: list[tuple[str, str]] | None) -> None:
    """``found`` into ``problems``; with ``None``, the first raises ``ValueError``."""
    if found and problems is None:
        raise ValueError(f"{where}: {found[0]}")
    if problems is not None:
        problems.extend((where, message) for message in found)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_regions(
    raw: object, regions_class_order: object, where: str, problems: list[tuple[str, str]] | None
) -> tuple[dict[str, int], dict[str, list[int]], list[int]]:
    """Region-based ``labels`` (nnU-Net's BraTS form) with their ``regions_class_order``.

    Every entry but ``background`` (0) and ``ignore`` is a region: one value or a list of values
    (e.g. ``"whole tumor": [1, 2, 3]``, ``"enhancing": 3``); the network predicts each region
    with its own sigmoid, and ``regions_class_order[i]`` is the value the label map gets where
    region ``i`` (in the file's order) is predicted (:func:`segshare.regions.regions_to_labels`).

    Args:
        raw: the ``labels`` value.
        regions_class_order: the file's ``regions_class_order``.
        where: the file it came from (for messages).
        problems: where ``(where, message)`` pairs go (a region without values, a value that is
            not a positive integer, two regions with the same values, an order that is not one
            positive integer per region, a missing background, an ``ignore`` label that is not
            above every value); ``None``: the first raises ``ValueError``.

    Returns:
        ``(labels, regions, order)``: ``labels`` the label map's values, ``{"background": 0,
        "label 1": 1, ...}`` for every value a region names (and ``ignore``); ``regions``
        ``{name: sorted values}`` in the file's order; ``order`` the class order.
    """
    found: list[str] = []
    regions: dict[str, list[int]] = {}
    labels: dict[str, int] = {}
    if not isinstance(raw, dict):
        found.append(f"'labels' must be a mapping, got {raw!r}")
        raw = {}
    for key, value in raw.items():
        key = str(key)
        values = value if isinstance(value, list) else [value]
        if key == "background":
            if value != 0:
                found.append(f"label 'background' must be 0 with regions, got {value!r}")
        elif key == IGNORE_LABEL:
            if not _is_int(value):
                found.append(f"label 'ignore': {value!r} is not an integer value")
            else:
                labels[IGNORE_LABEL] = value
        elif not values or not all(_is_int(v) and v > 0 for v in values):
            found.append(
                f"region {key!r}: {value!r} must be a positive integer or a non-empty list of "
                'them, e.g. "whole tumor": [1, 2, 3]'
            )
        else:
            regions[key] = sorted(set(values))
    if "background" not in raw:
        found.append("labels need 'background': 0 (nnU-Net's rule, regions included)")
    by_values: dict[tuple[int, ...], list[str]] = {}
    for name, values in regions.items():
        by_values.setdefault(tuple(values), []).append(name)
    for values, names in by_values.items():
        if len(names) > 1:
            found.append(f"regions {names} all have the values {list(values)}; each needs its own")
    order = regions_class_order
    if (
        not isinstance(order, list)
        or not all(_is_int(v) and v > 0 for v in order)
        or len(order) != len(regions)
    ):
        found.append(
            f"'regions_class_order' must list one positive integer per region ({len(regions)}: "
            f"{list(regions)}), the value each region writes into the label map, got {order!r}"
        )
        order = []
    values = sorted({v for vs in regions.values() for v in vs})
    _check_ignore(labels.get(IGNORE_LABEL), values, found)
    _report(found, where, problems)
    named = {"background": 0, **{f"label {v}": v for v in values}}
    if IGNORE_LABEL in labels:
        named[IGNORE_LABEL] = labels[IGNORE_LABEL]
    return named, regions, list(order)


def subset_dataset_json(meta: dict, case_ids: set[str]) -> dict:
    """A copy of a ``dataset.json`` for ``case_ids`` only: its ``training`` list (MSD) filtered
    and ``numTraining`` set (for datasets derived by scripts, e.g. thick slices, a hold-out)."""
    meta = dict(meta)
    if isinstance(meta.get("training"), list):
        meta["training"] = [
            e for e in meta["training"] if strip_nifti_suffix(Path(e["image"]).name) in case_ids
        ]
    meta["numTraining"] = len(case_ids)
    return meta


def split_ignore_label(labels: dict[str, int]) -> tuple[dict[str, int], int | None]:
    """The labels without the ignore label, and its value (None when there is none)."""
    classes = {k: v for k, v in labels.items() if k != IGNORE_LABEL}
    return classes, labels.get(IGNORE_LABEL)


def labels_from_json(
    meta: dict, where: str, problems: list[tuple[str, str]] | None = None
) -> tuple[dict[str, int], dict[str, list[int]] | None, list[int] | None]:
    """``(labels, regions, regions_class_order)`` of a ``dataset.json``: :func:`parse_regions`
    when it has a ``regions_class_order``, else :func:`parse_labels` and no regions. Problems go
    to ``problems``; with ``None`` the first raises ``ValueError``."""
    raw = meta.get("labels", {})
    if "regions_class_order" in meta:
        return parse_regions(raw, meta["regions_class_order"], where, problems)
    return parse_labels(raw, where, problems), None, None


def _channels_from_json(meta: dict, problems: list[tuple[str, str]], where: str) -> dict | None:
    """``channel_names`` (nnU-Net) or ``modality`` (MSD): ``None`` when absent, empty or not a
    mapping (then a problem names the key)."""
    key = "channel_names" if meta.get("channel_names") else "modality"
    channels = meta.get(key)
    if channels is not None and not isinstance(channels, dict):
        example = '{"0": "CT"}'
        message = f"{key!r} must be a mapping of channel index to name (e.g. {example})"
        problems.append((where, f"{message}, got {channels!r}"))
        return None
    return channels or None


def is_inside(root: Path, path: Path) -> bool:
    """Whether ``path`` lies inside ``root`` once ``..`` is collapsed (lexically: a dataset
    folder made of symbolic links to files elsewhere stays valid)."""
    root_s = os.path.normpath(os.path.abspath(root))
    path_s = os.path.normpath(os.path.abspath(path))
    return os.path.commonpath([root_s, path_s]) == root_s


def _msd_cases(root: Path, meta: dict, problems: list[tuple[str, str]]) -> list[Case]:
    """Cases of the ``training`` list; a listed image that is absent may exist as channel files."""
    json_path = str(root / "dataset.json")
    cases = []
    for i, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or "image" not in entry:
            problems.append((json_path, f"training[{i}] has no 'image': {entry!r}"))
            continue
        bad = [
            key
            for key in ("image", "label")
            if entry.get(key) is not None and not isinstance(entry[key], str)
        ]
        for key in bad:
            problems.append(
                (json_path, f"training[{i}][{key!r}] must be a path (a string), got {entry[key]!r}")
            )
        if bad:
            continue
        image = root / entry["image"]
        label = root / entry["label"] if entry.get("label") else None
        for p in (image, label):
            if p is not None and not is_inside(root, p):
                problems.append(
                    (str(p), f"path in dataset.json points outside the dataset root {root}")
                )
        case_id = strip_nifti_suffix(image.name)
        images: tuple[Path, ...] = (image,)
        if not image.exists():
            ending = ".nii.gz" if image.name.endswith(".gz") else ".nii"
            channels = sorted(image.parent.glob(f"{case_id}_[0-9][0-9][0-9][0-9]{ending}"))
            if channels:
                images = tuple(channels)
        cases.append(Case(case_id, images, label))
    return cases


def _paired_cases(
    root: Path, img_dir: Path, lbl_dir: Path, problems: list, in_channels: int | None
) -> list[Case]:
    """nnU-Net raw / plain pair: images grouped by channel suffix, labels matched by case id."""
    label_list = _nifti_files(lbl_dir) if lbl_dir.is_dir() else []
    label_files: dict[str, Path] = {}
    for path in label_list:
        cid = strip_nifti_suffix(path.name)
        if cid in label_files:
            problems.append(
                (str(path), f"second label file for case {cid!r} (also {label_files[cid].name})")
            )
        label_files.setdefault(cid, path)
    for folder in (img_dir, lbl_dir) if lbl_dir.is_dir() else (img_dir,):
        for entry in _nifti_entries(folder):
            if (why := not_a_file(entry)) is not None:
                problems.append((str(entry), f"{why}; not read"))
    cases = _group_channels(_nifti_files(img_dir), in_channels, set(label_files))
    out = []
    for case in cases:
        label = label_files.pop(case.case_id, None)
        if label is None and lbl_dir.is_dir():
            problems.append(
                (str(case.images[0]), f"no label file for case {case.case_id!r} in {lbl_dir}")
            )
        if case.problem:
            problems.append((str(case.images[0]), case.problem))
        out.append(replace(case, label=label))
    for cid, path in sorted(label_files.items()):
        problems.append((str(path), f"label without an image (case {cid!r})"))
    return out


def discover_dataset(root: str | os.PathLike) -> Dataset:
    """Discover a training dataset (MSD, nnU-Net raw, or a plain pair of folders).

    Args:
        root: the dataset folder.

    Returns:
        The Dataset; problems found on the way are in ``Dataset.problems``.

    Raises:
        ValueError: ``root`` is not a folder, or holds no recognised layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: dataset folder does not exist")
    problems: list[tuple[str, str]] = []
    meta: dict = {}
    json_path = root / "dataset.json"
    if json_path.exists():
        try:
            meta = read_json(json_path)
            if not isinstance(meta, dict):
                raise ValueError(f"{json_path}: top level must be an object")
        except ValueError as err:
            problems.append((str(json_path), str(err).removeprefix(f"{json_path}: ")))
            meta = {}
    known = len(problems)
    labels, regions, order = labels_from_json(meta, str(json_path), problems)
    if len(problems) > known:  # refused labels: no case is checked against them
        labels, regions, order = {}, None, None
    channels = _channels_from_json(meta, problems, str(json_path))
    in_channels = len(channels) if channels else None
    channel_names = {str(k): str(v) for k, v in (channels or {"0": "image"}).items()}
    file_ending = meta.get("file_ending", ".nii.gz")
    if not isinstance(file_ending, str):
        problems.append((str(json_path), f"'file_ending' must be a string, got {file_ending!r}"))
        file_ending = ".nii.gz"
    if isinstance(meta.get("training"), list):
        cases = _msd_cases(root, meta, problems)
    else:
        pair = next(((root / a, root / b) for a, b in _FOLDER_PAIRS if (root / a).is_dir()), None)
        if pair is None:
            raise ValueError(
                f"{root}: no dataset found (expected dataset.json with a 'training' list, "
                "or imagesTr/ + labelsTr/ folders)"
            )
        cases = _paired_cases(root, *pair, problems, in_channels)
    cases.sort(key=lambda c: c.case_id)
    seen: dict[str, Path] = {}
    for c in cases:
        if c.case_id in seen:
            problems.append(
                (str(c.images[0]), f"duplicate case id {c.case_id!r} (also {seen[c.case_id]})")
            )
        seen.setdefault(c.case_id, c.images[0])
    return Dataset(root, cases, labels, channel_names, file_ending, problems, regions, order)
