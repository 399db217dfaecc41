"""scripts/make_thick_slices.py: every N-th slice, spacing x N, world positions kept, refusals."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segshare.data.discovery import discover_dataset
from segshare.data.synthetic import generate_synthetic_dataset, make_affine
from tests.data.conftest import HIPPOCAMPUS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_thick_slices.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_thick_slices", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


mts = _load_script()


@pytest.fixture
def nnunet_src(tmp_path) -> Path:
    """nnU-Net raw layout: 2 channels, rotated and flipped affines, odd slice counts."""
    return generate_synthetic_dataset(
        tmp_path / "nnunet", num_cases=3, seed=4, shape_range=(10, 14), num_channels=2
    )


@pytest.fixture
def msd_src(tmp_path) -> Path:
    """MSD layout (``training`` list), int16 images, rotated affines, shape 7 x 9 x 11."""
    root = tmp_path / "msd"
    rng = np.random.default_rng(0)
    training = []
    for i in range(3):
        name = f"./imagesTr/m_{i}.nii.gz", f"./labelsTr/m_{i}.nii.gz"
        img = rng.integers(-500, 500, (7, 9, 11)).astype(np.int16)
        lbl = rng.integers(0, 3, (7, 9, 11)).astype(np.uint8)
        aff = make_affine((0.7, 0.8, 1.1), rng)
        for data, rel in zip((img, lbl), name, strict=True):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, aff), str(root / rel))
        training.append({"image": name[0], "label": name[1]})
    meta = {"name": "tiny", "labels": {"0": "background", "1": "a", "2": "b"}, "numTraining": 3}
    meta |= {"numTest": 1, "test": ["./imagesTs/t.nii.gz"], "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _check_thick(src: Path, dst: Path, axis: int, factor: int, num_cases: int) -> None:
    """Every converted file: ceil(n / factor) slices, the source's kept slices (same dtype, same
    sform/qform codes), and voxel centres of kept slices at the same world positions."""
    cases = discover_dataset(src).cases[:num_cases]
    for case in cases:
        for path in [*case.images, case.label]:
            old, new = nib.load(path), nib.load(dst / path.relative_to(src))
            shape = list(old.shape)
            shape[axis] = math.ceil(shape[axis] / factor)
            assert new.shape == tuple(shape)
            assert new.get_data_dtype() == old.get_data_dtype()
            for code in ("sform_code", "qform_code"):
                assert new.header[code] == old.header[code]
            kept = np.take(np.asarray(old.dataobj), np.arange(0, old.shape[axis], factor), axis)
            np.testing.assert_array_equal(np.asarray(new.dataobj), kept)
            ijk = np.indices(new.shape[:3]).reshape(3, -1).astype(float)
            old_ijk = ijk.copy()
            old_ijk[axis] *= factor
            world_new = nib.affines.apply_affine(new.affine, ijk.T)
            world_old = nib.affines.apply_affine(old.affine, old_ijk.T)
            np.testing.assert_allclose(world_new, world_old, atol=1e-4)
    found = discover_dataset(dst)
    assert found.problems == []
    assert found.case_ids == [c.case_id for c in cases]
    assert [len(c.images) for c in found.cases] == [len(c.images) for c in cases]


def test_nnunet_layout_default_axis_and_factor(nnunet_src, tmp_path):
    dst = tmp_path / "out"
    summary = mts.make_thick_slices(nnunet_src, dst)
    _check_thick(nnunet_src, dst, axis=2, factor=3, num_cases=3)
    meta = json.loads((dst / "dataset.json").read_text())
    assert meta["name"] == "segshare-synthetic (thick slices x3)"
    assert meta["numTraining"] == 3 and meta["channel_names"] == {"0": "MR", "1": "MR"}
    assert summary.cases == 3
    np.testing.assert_allclose(summary.new_spacings[:, 2], summary.old_spacings[:, 2] * 3)
    np.testing.assert_array_equal(summary.new_shapes[:, 2], np.ceil(summary.old_shapes[:, 2] / 3))


def test_msd_layout_axis_0_factor_2_first_two_cases(msd_src, tmp_path):
    dst = tmp_path / "out"
    mts.make_thick_slices(msd_src, dst, axis=0, factor=2, max_cases=2)
    _check_thick(msd_src, dst, axis=0, factor=2, num_cases=2)
    meta = json.loads((dst / "dataset.json").read_text())
    assert meta["name"] == "tiny (thick slices x2)"
    assert meta["training"] == json.loads((msd_src / "dataset.json").read_text())["training"][:2]
    assert meta["numTraining"] == 2 and meta["numTest"] == 0 and meta["test"] == []
    assert not (dst / "imagesTr" / "m_2.nii.gz").exists()
    assert nib.load(dst / "imagesTr" / "m_0.nii.gz").shape == (4, 9, 11)


def test_cli_prints_one_summary_line(nnunet_src, tmp_path):
    dst = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), str(nnunet_src), str(dst), "--factor", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 1
    assert "3 cases, axis 2 x2: median shape " in lines[0] and " mm" in lines[0]
    _check_thick(nnunet_src, dst, axis=2, factor=2, num_cases=3)


def _refusal_args(case: str, src: Path, tmp_path: Path) -> list[str]:
    out = str(tmp_path / "out")
    empty = tmp_path / "empty"
    (empty / "imagesTr").mkdir(parents=True)
    (empty / "labelsTr").mkdir()
    broken = tmp_path / "broken"
    generate_synthetic_dataset(broken, num_cases=2, seed=0, shape_range=(6, 8))
    (broken / "labelsTr" / "case_001.nii.gz").unlink()
    return {
        "missing SRC": [str(tmp_path / "nowhere"), out],
        "no cases": [str(empty), out],
        "problems": [str(broken), out],
        "axis": [str(src), out, "--axis", "3"],
        "factor": [str(src), out, "--factor", "1"],
        "max-cases": [str(src), out, "--max-cases", "0"],
        "DST in repo": [str(src), str(REPO / "data" / "thick_slices_never_written")],
        "DST is SRC": [str(src), str(src)],
        "DST in SRC": [str(src), str(src / "thick")],
    }[case]


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("missing SRC", "does not exist"),
        ("no cases", "no cases"),
        ("problems", "no label file"),
        ("axis", "--axis must be 0, 1 or 2"),
        ("factor", "--factor must be >= 2, got 1"),
        ("max-cases", "--max-cases must be >= 1"),
        ("DST in repo", "inside the repository"),
        ("DST is SRC", "is SRC or inside it"),
        ("DST in SRC", "is SRC or inside it"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(case, words, nnunet_src, tmp_path, capsys):
    args = _refusal_args(case, nnunet_src, tmp_path)
    before = sorted(p.relative_to(nnunet_src) for p in nnunet_src.rglob("*"))
    assert mts.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("make_thick_slices: error: ") and err.count("\n") == 1
    assert words in err
    assert not Path(args[1]).exists() or Path(args[1]) == nnunet_src
    assert sorted(p.relative_to(nnunet_src) for p in nnunet_src.rglob("*")) == before


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    cmd = [sys.executable, str(SCRIPT), str(tmp_path / "nowhere"), str(tmp_path / "out")]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"make_thick_slices: error: SRC {tmp_path / 'nowhere'}: dataset folder does not exist"
    ]


@pytest.mark.realdata
def test_real_hippocampus_first_three_cases(tmp_path):
    if not (HIPPOCAMPUS / "dataset.json").exists():
        pytest.skip(f"real data not found at {HIPPOCAMPUS}")
    dst = tmp_path / "hippo_thick"
    cmd = [sys.executable, str(SCRIPT), str(HIPPOCAMPUS), str(dst), "--max-cases", "3"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    print(run.stdout.strip())
    assert "3 cases, axis 2 x3" in run.stdout
    _check_thick(HIPPOCAMPUS, dst, axis=2, factor=3, num_cases=3)
    meta = json.loads((dst / "dataset.json").read_text())
    assert meta["name"].endswith(" (thick slices x3)") and len(meta["training"]) == 3
