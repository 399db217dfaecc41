"""A damaged resume point never restarts a run over the old one (issue #16): the run folder is
refused naming the damaged file, checkpoints carry checksums checked before use, and
``trainer.resume_from=best`` is the explicit way out."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from segshare.train import train


def _log_epochs(run: Path) -> list[int]:
    with open(run / "train_log.csv", newline="") as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh)]


def _snapshot(run: Path) -> dict[str, bytes]:
    files = [run / "train_log.csv", run / "model.keras", *(run / "checkpoints").rglob("*")]
    return {str(p.relative_to(run)): p.read_bytes() for p in files if p.is_file()}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _change_a_weight(path: Path) -> None:
    """Alter one stored value, keeping the HDF5 file valid (what a flipped bit does)."""
    import h5py

    datasets = []

    def collect(name, obj):  # returning None: visititems goes on
        if isinstance(obj, h5py.Dataset) and obj.size > 1:
            datasets.append(obj)

    with h5py.File(path, "r+") as fh:
        fh.visititems(collect)
        target = datasets[0]
        values = target[()]
        values.flat[0] = values.flat[0] + 1.0
        target[...] = values


DAMAGES = {
    "missing state.json": ("latest/state.json", lambda p: p.unlink()),
    "truncated state.json": ("latest/state.json", _truncate),
    "truncated weights": ("latest/model.weights.h5", _truncate),
    "truncated optimizer": ("latest/optimizer.npz", _truncate),
    "a changed weight": ("latest/model.weights.h5", _change_a_weight),
}


@pytest.fixture
def trained(make_cfg, tmp_path) -> Path:
    """A finished 2-epoch run (validated every epoch: checkpoints/best exists)."""
    train(make_cfg(run_dir=tmp_path / "trained"))
    return tmp_path / "trained"


def test_a_damaged_latest_checkpoint_is_refused_naming_the_file(trained, make_cfg, tmp_path):
    state = json.loads((trained / "checkpoints" / "latest" / "state.json").read_text())
    assert set(state["checksums"]) == {"model.weights.h5", "optimizer.npz"}
    for name, (relative, damage) in DAMAGES.items():
        run = tmp_path / name.replace(" ", "_")
        shutil.copytree(trained, run)
        damage(run / "checkpoints" / relative)
        before = _snapshot(run)
        with pytest.raises(ValueError) as info:
            train(make_cfg("trainer.max_epochs=3", run_dir=run))
        message = str(info.value)
        assert str(run / "checkpoints" / relative) in message, (name, message)
        assert "trainer.resume_from=best" in message and "\n" not in message, (name, message)
        assert _snapshot(run) == before, name  # log, model and best untouched


def test_resume_from_best_continues_from_the_best_checkpoint(trained, make_cfg, capsys):
    (trained / "checkpoints" / "latest" / "state.json").unlink()
    best = json.loads((trained / "checkpoints" / "best" / "state.json").read_text())
    with pytest.raises(ValueError, match="another preprocessing plan"):  # the plan is checked
        train(make_cfg("trainer.resume_from=best", "data.target_spacing=[2,2,2]", run_dir=trained))
    capsys.readouterr()
    train(make_cfg("trainer.resume_from=best", "trainer.max_epochs=3", run_dir=trained))
    assert f"Resuming from {trained / 'checkpoints' / 'best'} at epoch {best['epoch'] + 1}" in (
        capsys.readouterr().out
    )
    assert _log_epochs(trained) == [0, 1, 2]
    latest = json.loads((trained / "checkpoints" / "latest" / "state.json").read_text())
    assert latest["epoch"] == 2 and latest["best"] >= best["best"]


def test_a_run_folder_with_a_log_but_no_checkpoint_is_refused(trained, make_cfg):
    shutil.rmtree(trained / "checkpoints")
    before = _snapshot(trained)
    with pytest.raises(ValueError, match=r"checkpoints/latest.*(train_log\.csv|model\.keras)"):
        train(make_cfg(run_dir=trained))
    with pytest.raises(ValueError, match=r"checkpoints/best"):
        train(make_cfg("trainer.resume_from=best", run_dir=trained))
    assert _snapshot(trained) == before


def test_resume_from_must_be_latest_or_best(make_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"trainer.resume_from must be 'latest' or 'best'"):
        train(make_cfg("trainer.resume_from=last", run_dir=tmp_path / "r"))


def test_a_run_is_never_resumed_as_another_fold_or_another_network(make_cfg, tmp_path):
    """Resuming fold 0's run as fold 1 would validate on its own training cases; resuming it
    with other widths (another device's plan, changed defaults) would be another experiment."""
    run = tmp_path / "run"
    train(make_cfg("trainer.max_epochs=1", run_dir=run))
    before = _snapshot(run)
    with pytest.raises(ValueError, match=r"run.json: this run was trained with another split "
                                         r"\(fold: 0 -> 1"):  # fmt: skip
        train(make_cfg("trainer.max_epochs=2", "data.fold=1", run_dir=run))
    with pytest.raises(ValueError, match=r"another network \(features: \[4, 8\] -> \[8, 16\]"):
        train(make_cfg("trainer.max_epochs=2", "model.features=[8,16]", run_dir=run))
    assert _snapshot(run) == before  # nothing written
    info = json.loads((run / "run.json").read_text())
    assert info["network"]["features"] == [4, 8] and info["network"]["batch_size"] == 2


def test_resume_from_best_killed_before_its_first_checkpoint_loses_nothing(
    trained, make_cfg, monkeypatch
):
    """best becomes the resume point before the log is cut back, so a kill in between and a
    plain rerun resume from the same epoch the log ends at."""
    from segshare.training.loop import Trainer

    best_state = trained / "checkpoints" / "best" / "state.json"
    best = json.loads(best_state.read_text())
    best["epoch"] = 0  # best older than latest (epoch 1), as after a worse last epoch
    best_state.write_text(json.dumps(best))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg("trainer.resume_from=best", "trainer.max_epochs=3", run_dir=trained))
    latest = json.loads((trained / "checkpoints" / "latest" / "state.json").read_text())
    assert latest["epoch"] == best["epoch"]
    assert _log_epochs(trained)[-1] <= best["epoch"]
