"""NIfTI, NumPy, JSON and text input/output with clear errors, atomic writes, file signatures.

Every writer here writes to a temporary name in the destination folder and then
``os.replace``-s it into place (:func:`atomic_target`; a whole folder: :func:`atomic_folder`),
so an interrupted run never leaves a half-written file under the final name. The data is
fsync-ed before the rename and the folder after it, so a power loss leaves the old file or the
new one, never a renamed but empty one. Outputs get the mode the user's umask gives any new file
(``0644`` under umask ``022``), not ``mkstemp``'s ``0600``. Temporaries are named
``.<name>.<random>.tmp<suffix>`` (:data:`TEMPORARY_GLOB`), so a killed run's leftovers can be
found and removed (:func:`remove_temporaries`, under the folder's lock: :func:`filling_folder`).

:func:`file_signature` is what caches and skipped validations compare to tell whether a source
file changed.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import os
import secrets
import shutil
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: In a folder of predictions: ``{case_id: [scan paths]}`` of the scans they were made from
#: (``segshare-predict`` writes it, one per shard; the evaluation reads it for its overlays).
INPUTS_FILE = "inputs.json"
#: The names of :func:`atomic_target`'s temporaries (``.<name>.<random>.tmp<suffix>``).
TEMPORARY_GLOB = ".*.tmp*"
#: :func:`file_signature` hashes a file whole up to this size ...
SIGNATURE_WHOLE_BYTES = 2**20
#: ... and a larger one's first and last this many bytes.
SIGNATURE_EDGE_BYTES = 2**16
#: The lock file of :func:`filling_folder`.
LOCK_FILE = ".lock"
log = logging.getLogger(__name__)


class NiftiReadError(ValueError):
    """A file could not be read as a NIfTI image; the message names the file."""


def is_nifti_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` has a NIfTI file name (``.nii`` or ``.nii.gz``)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    """``"case_0000.nii.gz"`` -> ``"case_0000"``; other names unchanged."""
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_nifti(folder: str | os.PathLike) -> list[Path]:
    """NIfTI files directly in ``folder`` (hidden files skipped), sorted by name.

    Raises:
        FileNotFoundError: ``folder`` is not a folder (the message names it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: '{folder}'.")
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and is_nifti_path(p.name)
    )


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """Open a NIfTI file (header only; the voxel data stays on disk until read).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        The image, as a NIfTI-1 image (NIfTI-2 files are converted).

    Raises:
        NiftiReadError: the file is missing, unreadable, not NIfTI or has a corrupt header.
    """
    path = Path(path)
    if not path.exists():
        raise NiftiReadError(f"{path}: file does not exist")
    if not path.is_file():
        raise NiftiReadError(f"{path}: not a regular file")
    try:
        img = nib.load(str(path))
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise NiftiReadError(f"{path}: truncated or corrupt gzip data ({err})") from err
    except nib.filebasedimages.ImageFileError as err:
        raise NiftiReadError(f"{path}: not a NIfTI image ({err})") from err
    except Exception as err:  # nibabel raises many types for malformed headers
        raise NiftiReadError(
            f"{path}: unreadable NIfTI header ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise NiftiReadError(f"{path}: not a NIfTI image (nibabel read it as {type(img).__name__})")
    return img


def header_problem(img: nib.Nifti1Image) -> str | None:
    """Why an image's header cannot describe a scan, from the header alone (no voxel is read).

    Returns:
        ``"the image has an empty axis ..."`` when an axis has length 0; ``"its affine is not
        finite ..."`` when the voxel-to-world affine (from the sform, else the qform, else the
        voxel sizes) holds NaN or Inf; else None.
    """
    shape = tuple(int(s) for s in img.shape)
    if 0 in shape:
        return f"the image has an empty axis (shape {shape}): it holds no voxels"
    affine = np.asarray(img.affine, dtype=float)
    if not np.isfinite(affine).all():
        header = img.header
        if int(header["sform_code"]) > 0:
            source = "sform (srow_x/y/z)"
        elif int(header["qform_code"]) > 0:
            source = "qform (quatern_*, qoffset_*, pixdim)"
        else:
            source = "voxel sizes (pixdim)"
        return (
            f"its affine is not finite (NaN/Inf in the {source}): the orientation and spacing "
            f"of the scan are unknown"
        )
    return None


def read_voxels(img: nib.Nifti1Image, path: str | os.PathLike) -> np.ndarray:
    """Read an image's voxel data as float32 (scaling applied), with clear errors.

    Args:
        img: an image from :func:`load_nifti`.
        path: the file it came from (for messages).

    Returns:
        The array in the file's voxel order, ``(I, J, K)`` or ``(I, J, K, C)``, float32.

    Raises:
        NiftiReadError: truncated file or corrupt gzip stream.
    """
    try:
        return np.asarray(img.dataobj, dtype=np.float32)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise NiftiReadError(f"{path}: truncated or corrupt gzip data ({err})") from err
    except (OSError, ValueError) as err:
        raise NiftiReadError(f"{path}: cannot read voxel data ({err})") from err


def read_label_voxels(img: nib.Nifti1Image, path: str | os.PathLike) -> np.ndarray:
    """Read a label map without a float copy when it is stored as integers (unscaled).

    Returns:
        The stored integer array, or float32 for float-stored labels (callers check/round).
    """
    slope, inter = img.dataobj.slope, img.dataobj.inter
    if np.issubdtype(img.get_data_dtype(), np.integer) and slope == 1 and inter == 0:
        try:
            return np.asarray(img.dataobj.get_unscaled())
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            raise NiftiReadError(f"{path}: truncated or corrupt gzip data ({err})") from err
        except (OSError, ValueError) as err:
            raise NiftiReadError(f"{path}: cannot read voxel data ({err})") from err
    return read_voxels(img, path)


def read_label_map(path: str | os.PathLike) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Open a 3D label map: its stored voxels (:func:`read_label_voxels`) and its image.

    A trailing axis of length 1 (``(I, J, K, 1)``) is dropped.

    Args:
        path: a ``.nii`` or ``.nii.gz`` label file.

    Returns:
        ``(array (I, J, K) in the file's voxel order, image with header and affine)``; the array
        is the stored integers, or float32 for float-stored labels (callers check/round).

    Raises:
        NiftiReadError: the file is unreadable or not 3D (the message names the file).
    """
    img = load_nifti(path)
    array = read_label_voxels(img, path)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise NiftiReadError(f"{path}: a label map must be 3D, got shape {array.shape}")
    return array, img


def file_signature(path: str | os.PathLike) -> list[int | str] | None:
    """What identifies a file's content, cheaply: ``[size, mtime_ns, sha256 hex]``.

    The hash covers the whole file up to 1 MiB (:data:`SIGNATURE_WHOLE_BYTES`: label maps, small
    scans), else its first and last 64 KiB (:data:`SIGNATURE_EDGE_BYTES`), so a signature reads
    at most 1 MiB whatever the file's size. Size and mtime catch ordinary edits; the hash catches
    a same-size rewrite whose mtime was kept (``cp -p``, ``rsync -a``, ``touch -r``): the first
    bytes hold the NIfTI header (shape, affine, scaling), and the last 8 bytes of a ``.nii.gz``
    are gzip's CRC-32 and length of the whole uncompressed stream, so any change of its voxels
    changes the signature too. Not caught: an uncompressed ``.nii`` over 1 MiB changed only away
    from its ends, at the same size, with its old mtime restored.

    Args:
        path: the file.

    Returns:
        The signature (JSON-serialisable), or None when the file cannot be read.
    """
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            digest = hashlib.sha256()
            if st.st_size <= SIGNATURE_WHOLE_BYTES:
                digest.update(fh.read())
            else:
                digest.update(fh.read(SIGNATURE_EDGE_BYTES))
                fh.seek(-SIGNATURE_EDGE_BYTES, os.SEEK_END)
                digest.update(fh.read(SIGNATURE_EDGE_BYTES))
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns), digest.hexdigest()]


def _create_temporary(path: Path, suffix: str) -> Path:
    """Create an empty ``.<name>.<random>.tmp<suffix>`` beside ``path`` with the umask's mode
    (``os.open(..., 0o666)``; ``tempfile.mkstemp`` would make it ``0600``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}")
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:  # pragma: no cover - 1 in 4 billion
            continue


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries, to disk (``os.fsync``).

    A folder on a file system that cannot fsync folders (``EINVAL``: some network and FUSE file
    systems) is skipped; a file's fsync error (``EIO``: the data did not reach the disk) raises.
    """
    is_dir = Path(path).is_dir()
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if not is_dir or err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_target(path: Path, suffix: str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` on success, delete on error.

    The temporary (``.<name>.<random>.tmp<suffix>``, mode from the umask) exists, empty, when the
    body starts; the body writes it (closing every handle). Then its data is fsync-ed, it is
    renamed onto ``path`` and the folder is fsync-ed, so after a power loss ``path`` holds the old
    content or the whole new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_temporary(path, suffix)
    try:
        yield tmp_path
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries a killed writer left directly in ``folder`` (:data:`TEMPORARY_GLOB`).

    Only safe while no other process writes into ``folder`` (:func:`filling_folder` holds its
    lock).

    Returns:
        The files removed.
    """
    removed = []
    for tmp in Path(folder).glob(TEMPORARY_GLOB):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextmanager
def filling_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder``'s lock (``<folder>/.lock``, ``flock``) while filling it; on entry, delete
    the temporaries a killed writer left there (:func:`remove_temporaries`).

    A second process entering waits (with a warning) until the first leaves, so removing
    leftovers never deletes a live writer's temporary: every writer into ``folder`` holds the lock.
    Without ``fcntl`` (Windows) nothing is locked and leftovers are kept.

    Yields:
        ``folder`` (created when missing).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - Windows
        yield folder
        return
    with open(folder / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another run is filling this folder; waiting for it", folder)
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            for tmp in remove_temporaries(folder):
                log.info("removed %s, left by an interrupted run", tmp)
            yield folder
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def save_nifti_atomic(img: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    """Write a NIfTI image atomically (temporary file in the same folder, then ``os.replace``).

    The temporary name keeps the ``.nii``/``.nii.gz`` ending so nibabel compresses correctly.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise ValueError(f"{path}: a NIfTI output must end in .nii or .nii.gz")
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    with atomic_target(path, suffix) as tmp:
        nib.save(img, str(tmp))
    return path


def save_npy_atomic(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a ``.npy`` file atomically (memory-mappable with ``np.load(mmap_mode="r")``)."""
    path = Path(path)
    with atomic_target(path, ".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array))
    return path


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; swap it into place on success.

    On success every file and folder in it is fsync-ed, the folder at ``path`` (if any) is moved to
    ``<name>.old``, the new one is renamed to ``path`` and only then is ``.old`` deleted: a process
    killed at any moment leaves a whole folder at ``path`` or at ``<name>.old`` (readers look
    there too); the parent folder is fsync-ed after the swap. When the body raises, the temporary
    folder is deleted and ``path`` is untouched.
    The temporary name is fixed (``<name>.tmp``, cleared first) so that a killed writer's leftover
    is reused, not accumulated; one writer per ``path`` at a time.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for file in (f for f in tmp.rglob("*") if f.is_file()):  # data on disk before the swap
            fsync_path(file)
        for folder in sorted((d for d in tmp.rglob("*") if d.is_dir()), reverse=True):
            fsync_path(folder)  # the entries of subfolders, then of the folder itself
        fsync_path(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_path(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(data: str | bytes, path: str | os.PathLike) -> Path:
    """Write text (UTF-8, newlines as given) or bytes to ``path`` atomically.

    Args:
        data: the whole content.
        path: destination; its folder is created when missing.

    Returns:
        ``path``.
    """
    path = Path(path)
    with atomic_target(path, path.suffix) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically (indented, keys in insertion order)."""
    return write_text_atomic(json.dumps(obj, indent=2) + "\n", path)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a malformed one raises ``ValueError`` naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
