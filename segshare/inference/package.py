"""A trained model as one versioned zip (``segshare-export``), and ``model_path=X.zip``.

A package holds one run, or every fold of a ``segshare-crossval`` folder (an ensemble), each as
``runs/<i>/`` with its ``model.keras``, ``plan.json`` and ``run.json`` (+ ``parameters.json``);
optionally an OpenVINO IR per run (``runs/<i>/openvino/<digest>/model.xml``: where
``runtime=openvino`` looks for its cached conversion, so it is used as it is) and a TensorFlow
SavedModel (``runs/<i>/saved_model/``, for serving outside segshare); the crossval folder's
``postprocessing.json`` when it has one; and ``segshare_package.json``: the format version, the
segshare version, when it was made, the labels (and regions), the user's metadata (name,
description, licence, authors, citation, version) and the SHA-256 of every other member.

Opening a package (:func:`open_package`) refuses, before anything is extracted, a zip that is
not one, a member whose name is absolute, climbs out with ``..`` or is a symbolic link, a member
the manifest does not list or a listed member that is missing, and then any member whose
checksum differs; it extracts into ``$XDG_CACHE_HOME/segshare/packages/<sha256 of the zip>/``
(default ``~/.cache``) under a temporary name renamed into place, and reuses that folder next time.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from segshare.data.io import read_json, write_json_atomic

MANIFEST = "segshare_package.json"
PACKAGE_FORMAT = 1
#: Run files packed when present (the first three are required).
RUN_FILES = ("model.keras", "plan.json", "run.json", "parameters.json")
POSTPROCESSING = "postprocessing.json"
#: The metadata fields a package records (null when not given).
METADATA_FIELDS = ("name", "description", "licence", "authors", "citation", "version")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stage_run(run_dir: Path, dest: Path, openvino: bool, saved_model: bool) -> None:
    """Copy a run's files into ``dest``; convert the optional formats there."""
    from segshare.inference.trained_run import load_trained_run

    run = load_trained_run(run_dir)
    dest.mkdir(parents=True)
    folder = run.model_file.parent
    shutil.copy2(run.model_file, dest / "model.keras")
    for name in RUN_FILES[1:]:
        if (folder / name).is_file():
            shutil.copy2(folder / name, dest / name)
        elif (run.folder / name).is_file():
            shutil.copy2(run.folder / name, dest / name)
    missing = [n for n in RUN_FILES[:3] if not (dest / n).is_file()]
    if missing:
        raise ValueError(f"{run_dir}: no {', '.join(missing)}: not a segshare-train run folder.")
    if openvino or saved_model:
        model = run.load_model()
        if openvino:
            from segshare.inference.openvino_runtime import converted_ir

            xml = converted_ir(dest / "model.keras", model)  # made in dest/openvino/<digest>/
            inside = dest / "openvino" / xml.parent.name
            if xml.parent != inside:  # found in the user's cache: pack a copy
                shutil.copytree(xml.parent, inside)
        if saved_model:
            import keras

            if keras.backend.backend() != "tensorflow":
                raise ValueError("saved_model=true needs KERAS_BACKEND=tensorflow.")
            model.export(str(dest / "saved_model"), format="tf_saved_model", verbose=False)


def export_package(
    model_path: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    openvino: bool = False,
    saved_model: bool = False,
) -> dict[str, Any]:
    """Pack ``model_path`` (a run, a list of runs or a crossval folder) into the zip ``output``
    (written under a temporary name and renamed into place).

    Returns:
        The manifest.

    Raises:
        ValueError: ``output`` is not a ``.zip`` or lies inside a run; a run is not a trained
            run; metadata keys outside :data:`METADATA_FIELDS`; runs that an ensemble refuses.
    """
    from segshare import __version__
    from segshare.inference.ensemble import _check_compatible, resolve_run_paths
    from segshare.inference.trained_run import load_trained_run

    output = Path(output)
    if output.suffix != ".zip":
        raise ValueError(f"output={str(output)!r} must be a .zip file.")
    unknown = sorted(set(metadata or {}) - set(METADATA_FIELDS))
    if unknown:
        raise ValueError(f"metadata: unknown field(s) {unknown}; known: {list(METADATA_FIELDS)}.")
    paths = resolve_run_paths(model_path)
    runs = [load_trained_run(p) for p in paths]
    _check_compatible(runs)
    single = model_path if isinstance(model_path, str | Path) else None
    postprocessing = Path(single) / POSTPROCESSING if single is not None else None
    plan = runs[0].plan
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".segshare-export.", dir=output.parent) as tmp:
        stage = Path(tmp) / "package"
        for i, run in enumerate(runs):
            _stage_run(run.folder, stage / "runs" / str(i), openvino, saved_model)
        if postprocessing is not None and postprocessing.is_file():
            shutil.copy2(postprocessing, stage / POSTPROCESSING)
        files = sorted(p for p in stage.rglob("*") if p.is_file())
        manifest = {
            "format": PACKAGE_FORMAT,
            "segshare": __version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "metadata": {k: (metadata or {}).get(k) for k in METADATA_FIELDS},
            "runs": [f"runs/{i}" for i in range(len(runs))],
            "postprocessing": POSTPROCESSING if (stage / POSTPROCESSING).is_file() else None,
            "labels": dict(plan.labels),
            "regions": plan.regions,
            "ignore_label": plan.ignore_label,
            "sources": [str(r.folder) for r in runs],
            "files": {p.relative_to(stage).as_posix(): _sha256(p) for p in files},
        }
        write_json_atomic(manifest, stage / MANIFEST)
        partial = Path(tmp) / "package.zip"
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.write(stage / MANIFEST, MANIFEST)
            for p in files:
                zf.write(p, p.relative_to(stage).as_posix())
        os.replace(partial, output)
    return manifest


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or "\\" in name:
        return "an absolute or non-POSIX path"
    if ".." in parts:
        return "a path that climbs out of the package (..)"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    return None


def _check_zip(path: Path) -> dict[str, Any]:
    """The manifest of a package zip whose members are all safe and listed (no extraction)."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{path}: not a segshare package (not a readable zip: {err}).") from None
    with zf:
        for info in zf.infolist():
            problem = _member_problem(info)
            if problem:
                raise ValueError(f"{path}: refused: member {info.filename!r} is {problem}.")
        names = {i.filename for i in zf.infolist() if not i.is_dir()}
        if MANIFEST not in names:
            raise ValueError(f"{path}: not a segshare package (no {MANIFEST}).")
        try:
            import json

            manifest = json.loads(zf.read(MANIFEST))
            listed = set(manifest["files"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: {MANIFEST} is not a package manifest ({err}).") from None
    if manifest.get("format") != PACKAGE_FORMAT:
        raise ValueError(
            f"{path}: package format {manifest.get('format')!r}; this segshare reads "
            f"format {PACKAGE_FORMAT}."
        )
    extra, missing = sorted(names - listed - {MANIFEST}), sorted(listed - names)
    if extra or missing:
        raise ValueError(
            f"{path}: refused: members not in the manifest {extra[:3]}, or listed but missing "
            f"{missing[:3]}."
        )
    return manifest


def _cache_root() -> Path:
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return home / "segshare" / "packages"


def open_package(path: str | Path) -> Path:
    """The extracted, verified folder of the package ``path`` (see the module docstring).

    Raises:
        ValueError: naming the zip and the member, for every refusal of the module docstring.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"model_path={str(path)!r}: no such package file.")
    manifest = _check_zip(path)
    folder = _cache_root() / _sha256(path)[:32]
    if (folder / MANIFEST).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        with zipfile.ZipFile(path) as zf:
            zf.extractall(tmp)
        for name, digest in manifest["files"].items():
            if _sha256(tmp / name) != digest:
                raise ValueError(f"{path}: refused: the checksum of {name} does not match.")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process extracted it meanwhile
            if not (folder / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def package_runs(folder: Path) -> list[Path]:
    """The run folders of an extracted package."""
    return [folder / r for r in read_json(folder / MANIFEST)["runs"]]


def package_postprocessing(folder: Path) -> Path | None:
    """The package's ``postprocessing.json``, if it has one."""
    name = read_json(folder / MANIFEST).get("postprocessing")
    return folder / name if name else None


__all__ = [
    "MANIFEST",
    "METADATA_FIELDS",
    "export_package",
    "open_package",
    "package_postprocessing",
    "package_runs",
]
