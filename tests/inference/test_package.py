"""segshare-export packages: what they hold, predicting from one, and the zips they refuse."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segshare.evaluation.postprocessing import FORMAT
from segshare.inference.package import MANIFEST, export_package, open_package, package_runs
from segshare.predict import run as predict_run

from .conftest import make_run_dir, random_scan, write_scan


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture()
def scans(tmp_path) -> Path:
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(2):
        data = np.zeros((20, 21, 22))
        data[2:18, 2:19, 2:20] = random_scan((16, 17, 18), seed=i)
        write_scan(folder / f"s{i}.nii.gz", data, np.eye(4))
    return folder


@pytest.fixture()
def crossval(tmp_path) -> Path:
    """A segshare-crossval-like folder: two fold runs and a postprocessing decision."""
    folder = tmp_path / "crossval"
    folder.mkdir()
    runs = [make_run_dir(tmp_path / f"fold{i}") for i in range(2)]
    (folder / "folds.json").write_text(json.dumps({"folds": [{"run": str(r)} for r in runs]}))
    decision = {"format": FORMAT, "steps": [{"kind": "largest_component", "labels": [1]}]}
    (folder / "postprocessing.json").write_text(json.dumps(decision))
    return folder


def _predict(compose_cfg, model_path, scans, out, *extra):
    report = predict_run(
        compose_cfg(f"model_path={model_path}", f"input={scans}", f"output={out}", *extra)
    )
    assert not report.failed
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(out.glob("*.nii.gz"))}


def test_a_package_predicts_as_its_run(tmp_path, run_dir, scans, compose_cfg):
    zip_path = tmp_path / "model.zip"
    meta = {"name": "bright", "licence": "CC-BY-4.0", "authors": ["A. B."]}
    manifest = export_package(run_dir, zip_path, metadata=meta)
    assert manifest["runs"] == ["runs/0"] and manifest["postprocessing"] is None
    assert manifest["metadata"]["name"] == "bright" and manifest["metadata"]["citation"] is None
    assert manifest["labels"] == {"background": 0, "bright": 1}
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
    assert {MANIFEST, "runs/0/model.keras", "runs/0/plan.json", "runs/0/run.json"} <= names
    ours = _predict(compose_cfg, zip_path, scans, tmp_path / "from_zip")
    theirs = _predict(compose_cfg, run_dir, scans, tmp_path / "from_run")
    assert ours.keys() == theirs.keys() and len(ours) == 2
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])
    folder = open_package(zip_path)  # extracted once, then reused
    assert folder.parent == tmp_path / "cache" / "segshare" / "packages"
    assert open_package(zip_path) == folder and package_runs(folder) == [folder / "runs/0"]


def test_a_crossval_package_is_an_ensemble_with_its_postprocessing(
    tmp_path, crossval, scans, compose_cfg, capsys
):
    zip_path = tmp_path / "cv.zip"
    manifest = export_package(crossval, zip_path)
    assert manifest["runs"] == ["runs/0", "runs/1"]
    assert manifest["postprocessing"] == "postprocessing.json"
    _predict(compose_cfg, zip_path, scans, tmp_path / "out")
    out = capsys.readouterr().out
    assert "ensemble of 2 models" in out and "postprocessing: the package's" in out


def test_openvino_ir_is_packed_and_used_as_it_is(tmp_path, run_dir, scans, compose_cfg):
    pytest.importorskip("openvino")
    zip_path = tmp_path / "ov.zip"
    export_package(run_dir, zip_path, openvino=True)
    with zipfile.ZipFile(zip_path) as zf:
        assert any(
            n.startswith("runs/0/openvino/") and n.endswith("model.xml") for n in zf.namelist()
        )
    ours = _predict(compose_cfg, zip_path, scans, tmp_path / "ov_out", "runtime=openvino")
    assert not (tmp_path / "cache" / "segshare" / "openvino").exists()  # nothing converted
    theirs = _predict(compose_cfg, run_dir, scans, tmp_path / "keras_out")
    for name in ours:
        assert np.mean(ours[name] == theirs[name]) > 0.999


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of the zip ``src`` with ``edit(name, data) -> [(name, data, info_or_None)]``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            for name, data, new_info in edit(info.filename, zin.read(info.filename)):
                zout.writestr(new_info or name, data)
    return dst


def test_bad_packages_are_refused_naming_the_member(tmp_path, run_dir):
    good = tmp_path / "good.zip"
    export_package(run_dir, good)

    def tamper(name, data):
        return [(name, data + b"x" if name == "runs/0/plan.json" else data, None)]

    def climb(name, data):
        extra = [("../evil.txt", b"x", None)] if name == MANIFEST else []
        return [(name, data, None), *extra]

    def link(name, data):
        if name != MANIFEST:
            return [(name, data, None)]
        info = zipfile.ZipInfo("runs/0/link")
        info.external_attr = 0o120777 << 16  # a symbolic link
        return [(name, data, None), ("", b"/etc/passwd", info)]

    def unlisted(name, data):
        return [
            (name, data, None),
            *([("runs/0/extra.bin", b"1", None)] if name == MANIFEST else []),
        ]

    cases = {
        tamper: "checksum of runs/0/plan.json does not match",
        climb: "climbs out of the package",
        link: "is a symbolic link",
        unlisted: "members not in the manifest",
    }
    for i, (edit, message) in enumerate(cases.items()):
        bad = _rewrite(good, tmp_path / f"bad{i}.zip", edit)
        with pytest.raises(ValueError, match=message):
            open_package(bad)
    (tmp_path / "notzip.zip").write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a segshare package"):
        open_package(tmp_path / "notzip.zip")
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache").rglob("*"))


def test_export_refusals(tmp_path, run_dir):
    with pytest.raises(ValueError, match="must be a .zip"):
        export_package(run_dir, tmp_path / "model.tar")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['owner'\]"):
        export_package(run_dir, tmp_path / "m.zip", metadata={"owner": "x"})
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "plan.json").unlink()
    with pytest.raises(ValueError):
        export_package(broken, tmp_path / "b.zip")
    assert not (tmp_path / "b.zip").exists()


def test_the_export_app_exits_2_in_one_line(tmp_path, run_dir, capsys, monkeypatch):
    import sys

    from segshare.export import main

    argv = [
        "segshare-export", f"model_path={run_dir}", f"output={tmp_path / 'x.tar'}",
        f"hydra.run.dir={tmp_path / 'h'}", "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    # Hydra's logging setup would close pytest's capture (see tests/inference/test_cli.py)
    monkeypatch.setattr("hydra.core.utils.configure_log", lambda *a, **k: None)
    monkeypatch.setattr("hydra._internal.hydra.configure_log", lambda *a, **k: None)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "segshare-export: error:" in err and "must be a .zip" in err and "Traceback" not in err
