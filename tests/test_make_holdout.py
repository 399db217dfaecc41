"""scripts/make_holdout.py (a labelled hold-out set of links) and scripts/holdout_table.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from segshare.data.discovery import discover_dataset, discover_images
from segshare.data.synthetic import generate_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mho = _load_script("make_holdout")
hot = _load_script("holdout_table")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """nnU-Net raw layout, 10 cases of 2 channel files each."""
    root = tmp_path_factory.mktemp("src") / "raw"
    return generate_synthetic_dataset(
        root, num_cases=10, seed=2, shape_range=(6, 8), num_channels=2
    )


def test_split_links_every_file_once_and_is_seeded(src, tmp_path):
    train, test = mho.make_holdout(src, tmp_path / "a", fraction=0.3, seed=1)
    source = discover_dataset(src)
    assert len(test) == 3 and sorted(train + test) == source.case_ids
    found = discover_dataset(tmp_path / "a")
    assert found.problems == [] and found.case_ids == train
    held = discover_images(tmp_path / "a" / "imagesTs")
    assert [c.case_id for c in held] == test and all(len(c.images) == 2 for c in held)
    labels = sorted(p.name for p in (tmp_path / "a" / "labelsTs").iterdir())
    assert labels == [f"{c}.nii.gz" for c in test]
    by_id = {c.case_id: c for c in source.cases}
    for case in held:  # links to the source's files, nothing copied
        for image in case.images:
            assert (
                image.is_symlink() and image.resolve() == (src / "imagesTr" / image.name).resolve()
            )
        assert (tmp_path / "a" / "labelsTs" / f"{case.case_id}.nii.gz").resolve() == by_id[
            case.case_id
        ].label.resolve()
    meta = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert meta["numTraining"] == 7 and meta["numTest"] == 3
    assert meta["test"] == [f"imagesTs/{c}_0000.nii.gz" for c in test]
    assert meta["name"].endswith("(hold-out 3)")
    assert mho.make_holdout(src, tmp_path / "b", fraction=0.3, seed=1)[1] == test
    assert mho.make_holdout(src, tmp_path / "c", fraction=0.3, seed=2)[1] != test


def test_msd_training_list_is_reduced(tmp_path):
    raw = generate_synthetic_dataset(tmp_path / "raw", num_cases=5, seed=0, shape_range=(6, 7))
    root = tmp_path / "msd"
    root.mkdir()
    training = []
    for case in discover_dataset(raw).cases:
        for kind, path in (("imagesTr", case.images[0]), ("labelsTr", case.label)):
            (root / kind).mkdir(exist_ok=True)
            (root / kind / f"{case.case_id}.nii.gz").symlink_to(path.resolve())
        training.append(
            {
                "image": f"./imagesTr/{case.case_id}.nii.gz",
                "label": f"./labelsTr/{case.case_id}.nii.gz",
            }
        )
    meta = {"name": "msd", "labels": {"0": "background", "1": "a", "2": "b"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    train, test = mho.make_holdout(root, tmp_path / "out", fraction=0.4)
    out = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert len(test) == 2 and [Path(e["image"]).name for e in out["training"]] == [
        f"{c}.nii.gz" for c in train
    ]
    assert discover_dataset(tmp_path / "out").case_ids == train


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fraction", "1.0"], "--fraction must be in (0, 1)"),
        (["--fraction", "0"], "--fraction must be in (0, 1)"),
    ],
)
def test_cli_refuses_bad_fraction(src, tmp_path, args, message):
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "make_holdout.py"),
            str(src),
            str(tmp_path / "o"),
            *args,
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o").exists()


def test_refuses_existing_or_nested_destination(src, tmp_path):
    (tmp_path / "there").mkdir()
    with pytest.raises(ValueError, match="exists"):
        mho.make_holdout(src, tmp_path / "there")
    with pytest.raises(ValueError, match="inside"):
        mho.make_holdout(src, src / "sub")
    with pytest.raises(ValueError, match="does not exist"):
        mho.make_holdout(tmp_path / "missing", tmp_path / "o")


def _summary(folder: Path, scores: dict[str, float]) -> None:
    folder.mkdir(parents=True)
    cases = [{"case_id": c, "metrics": {"1": {"Dice": v}}} for c, v in scores.items()]
    mean = sum(scores.values()) / len(scores)
    summary = {"labels": [1], "foreground_mean": {"Dice": mean}, "metric_per_case": cases}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_holdout_table_compares_ensemble_with_folds(tmp_path):
    cases = [f"c{i}" for i in range(8)]
    for scheme, shift in (("none", 0.0), ("stage", 0.05)):
        for fold in range(3):
            _summary(tmp_path / scheme / str(fold), {c: 0.7 + 0.01 * fold + shift for c in cases})
        _summary(
            tmp_path / scheme / "ensemble",
            {c: 0.75 + shift + 0.001 * i for i, c in enumerate(cases)},
        )
    lines = hot.holdout_rows(tmp_path, ["none", "stage"])
    row = next(line for line in lines if line.startswith("| none |"))
    assert "0.7000, 0.7100, 0.7200" in row and "0.7100 (0.0100)" in row
    # the ensemble (0.7535 on average) beats the mean of the folds (0.71) and the best (0.72)
    assert "| +0.0435 [" in row and "| +0.0335 [" in row
    assert lines[-1].startswith("ensemble stage - ensemble none: +0.0500")


def test_holdout_table_names_a_missing_summary(tmp_path):
    _summary(tmp_path / "none" / "0", {"c0": 0.5})
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "holdout_table.py"), str(tmp_path), "none"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "ensemble/summary.json: missing" in run.stderr
