"""The training app end to end on tiny synthetic data: outputs, resume, SIGKILL, two workers."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from hydra import compose, initialize_config_module

from segshare.predict import run as predict_run
from segshare.train import train


def _log(run_dir: Path) -> list[dict]:
    with open(run_dir / "train_log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_train_writes_a_usable_run_folder(make_cfg, tmp_path):
    import nibabel as nib

    last, objects = train(make_cfg("final_evaluation=true"))
    run = tmp_path / "run"
    # Final step: the validation cases predicted on their own grids, then evaluated.
    summary = json.loads((run / "validation" / "summary.json").read_text())
    assert summary["foreground_mean"]["Dice"] == pytest.approx(last["final_val_dice_fg_mean"])
    val_cases = [
        c for c in objects["prepared"].dataset.cases if c.case_id in objects["prepared"].val_ids
    ]
    assert len(summary["metric_per_case"]) == len(val_cases) > 0
    for case in val_cases:
        pred = nib.load(run / "validation" / "predictions" / f"{case.case_id}.nii.gz")
        image = nib.load(case.images[0])
        assert pred.shape == image.shape[:3]
        np.testing.assert_allclose(pred.affine, image.affine)
    for name in ("model.keras", "plan.json", "run.json", "config.yaml", "parameters.json"):
        assert (run / name).is_file(), name
    for ckpt in ("latest", "best"):
        assert (run / "checkpoints" / ckpt / "state.json").is_file()
    assert any((run / "tensorboard").iterdir())
    rows = _log(run)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert {"train_loss", "lr", "val_dice_fg_mean", "seconds"} <= set(rows[0])
    assert any(k.startswith("val_dice_") and k != "val_dice_fg_mean" for k in rows[0])
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])  # poly decay
    # The final evaluation and segshare-predict use the same trained-run loader: same labels.
    with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
        predict_cfg = compose(
            "predict",
            overrides=[
                f"model_path={run}",
                f"input={val_cases[0].images[0].parent}",
                f"output={tmp_path / 'predicted'}",
                f"paths.root_dir={tmp_path}",
                "inference.progress=false",
                "precision=float32",  # as the final evaluation (auto may pick bfloat16)
            ],
        )
    assert {c.case_id for c in val_cases} <= set(predict_run(predict_cfg).written)
    for case in val_cases:
        name = f"{case.case_id}.nii.gz"
        np.testing.assert_array_equal(
            np.asarray(nib.load(tmp_path / "predicted" / name).dataobj),
            np.asarray(nib.load(run / "validation" / "predictions" / name).dataobj),
        )
    info = json.loads((run / "run.json").read_text())
    assert info["patch_size"] == [16, 16, 16] and info["in_channels"] == 1
    model = keras.models.load_model(run / "model.keras")  # plain load, no custom_objects
    assert model.output_shape[-1] == json.loads((run / "plan.json").read_text())["num_classes"]
    assert json.loads((run / "parameters.json").read_text())["sharing"] == "stage"


def _weights(run_dir: Path) -> list[np.ndarray]:
    model = keras.models.load_model(run_dir / "model.keras")
    model.load_weights(run_dir / "checkpoints" / "latest" / "model.weights.h5")
    return [np.asarray(w) for w in model.weights]


def test_settings_left_null_come_from_the_plan_and_explicit_ones_are_reported(
    make_cfg, tmp_path, capsys
):
    planned = ["data.patch_size=null", "data.batch_size=null", "model.features=null"]
    planned += ["model.blocks_per_stage=null", "plan.base_features=4", "trainer.max_epochs=1"]
    _, objects = train(make_cfg(*planned, run_dir=tmp_path / "planned"))
    out = capsys.readouterr().out
    assert "plan (3d_fullres is trained):" in out and "override:" not in out
    plan = json.loads((tmp_path / "planned" / "plan.json").read_text())["configurations"]
    info = json.loads((tmp_path / "planned" / "run.json").read_text())
    assert info["patch_size"] == plan["3d_fullres"]["patch_size"]
    assert info["trained_with"]["configuration"] == "3d_fullres"
    encoder = objects["model"].get_layer("encoder")
    assert list(encoder.features) == plan["3d_fullres"]["features"]
    train(make_cfg("trainer.max_epochs=1", run_dir=tmp_path / "explicit"))
    planned_patch = plan["3d_fullres"]["patch_size"]
    assert f"override: data.patch_size=[16, 16, 16] (planned {planned_patch})" in (
        capsys.readouterr().out
    )
    with pytest.raises(ValueError, match=r"patch_size must have 2 entries, got \(16, 16, 16\)"):
        train(make_cfg("configuration=2d", run_dir=tmp_path / "two_d"))  # a 3D patch set


def test_the_2d_configuration_trains_on_slices_and_predicts_whole_volumes(make_cfg, tmp_path):
    import nibabel as nib

    run = tmp_path / "two_d"
    cfg = make_cfg(
        "configuration=2d",
        "data.patch_size=null",
        "data.batch_size=null",
        "trainer.max_epochs=1",
        "final_evaluation=true",
        run_dir=run,
    )
    _, objects = train(cfg)
    plan = json.loads((run / "plan.json").read_text())["configurations"]["2d"]
    info = json.loads((run / "run.json").read_text())
    assert info["patch_size"] == plan["patch_size"] and len(plan["patch_size"]) == 2
    assert info["slice_axis"] == plan["slice_axis"]
    assert len(objects["model"].inputs[0].shape) == 4  # (B, H, W, C): a 2D network
    summary = json.loads((run / "validation" / "summary.json").read_text())
    val = [c for c in objects["prepared"].dataset.cases if c.case_id in objects["prepared"].val_ids]
    assert len(summary["metric_per_case"]) == len(val)
    for case in val:  # whole volumes on their own grids, from slices
        pred = nib.load(run / "validation" / "predictions" / f"{case.case_id}.nii.gz")
        image = nib.load(case.images[0])
        assert pred.shape == image.shape[:3]
        np.testing.assert_allclose(pred.affine, image.affine)


def test_a_time_budget_derives_the_epochs_once_and_resume_keeps_them(make_cfg, tmp_path, capsys):
    run = tmp_path / "budget"
    # 3 s: the epoch count is derived from epoch 0's steps and validation, printed and kept
    train(make_cfg("trainer.budget_minutes=0.05", "trainer.epochs_per_run=1", run_dir=run))
    state = json.loads((run / "checkpoints" / "latest" / "state.json").read_text())
    epochs = state["max_epochs"]
    assert epochs >= 1 and f"Budget 0.05 min: {epochs} epochs of 3 steps" in capsys.readouterr().out
    best = json.loads((run / "checkpoints" / "best" / "state.json").read_text())
    assert best["max_epochs"] == epochs  # resume_from=best keeps the budget's epochs too
    train(make_cfg("trainer.budget_minutes=0.05", run_dir=run))  # resumes: the same epoch count
    assert [int(r["epoch"]) for r in _log(run)] == list(range(epochs))
    with pytest.raises(ValueError, match="trainer.budget_minutes must be > 0"):
        train(make_cfg("trainer.budget_minutes=0", run_dir=tmp_path / "zero"))


def test_resume_2_then_4_epochs_equals_uninterrupted_4(make_cfg, tmp_path):
    det = [
        "trainer.deterministic=true", "trainer.max_epochs=4", "data.augment.light.p_rotation=0.5"
    ]  # fmt: skip
    train(make_cfg(*det, run_dir=tmp_path / "straight"))
    # A job that may run 2 epochs at a time (as under a SLURM time limit), started twice.
    train(make_cfg(*det, "trainer.epochs_per_run=2", run_dir=tmp_path / "resumed"))
    assert [r["epoch"] for r in _log(tmp_path / "resumed")] == ["0", "1"]
    train(make_cfg(*det, "trainer.epochs_per_run=2", run_dir=tmp_path / "resumed"))
    straight, resumed = _log(tmp_path / "straight"), _log(tmp_path / "resumed")
    assert [r["epoch"] for r in resumed] == ["0", "1", "2", "3"]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in straight]
    for a, b in zip(_weights(tmp_path / "straight"), _weights(tmp_path / "resumed"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_raising_max_epochs_extends_a_finished_run(make_cfg, tmp_path, capsys):
    train(make_cfg("trainer.max_epochs=1", run_dir=tmp_path / "run"))
    train(make_cfg("trainer.max_epochs=2", run_dir=tmp_path / "run"))
    assert "Resuming" in capsys.readouterr().out
    rows = _log(tmp_path / "run")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    lr = float(rows[0]["lr"])  # the optimizer's learning rate (epoch 0 of poly decay)
    assert float(rows[1]["lr"]) == pytest.approx(lr * 0.5**0.9)  # the extended schedule


def test_resume_with_another_preprocessing_plan_is_refused(make_cfg, tmp_path):
    train(make_cfg("trainer.max_epochs=1", run_dir=tmp_path / "run"))
    before = (tmp_path / "run" / "plan.json").read_text()
    with pytest.raises(
        ValueError, match=r"plan.json: .*another preprocessing plan .*target_spacing"
    ):
        train(
            make_cfg(
                "trainer.max_epochs=2", "data.target_spacing=[2,2,2]", run_dir=tmp_path / "run"
            )
        )
    assert (tmp_path / "run" / "plan.json").read_text() == before  # the run is left as it was
    assert [r["epoch"] for r in _log(tmp_path / "run")] == ["0"]
    # another planner budget changes only the planned networks: the run resumes
    train(make_cfg("trainer.max_epochs=2", "plan.memory_gb=0.5", run_dir=tmp_path / "run"))
    assert [r["epoch"] for r in _log(tmp_path / "run")] == ["0", "1"]


def _cli(overrides: list[str], run_dir: Path, data_root: Path) -> list[str]:
    from tests.training.conftest import TINY

    return [
        sys.executable,
        "-m",
        "segshare.train",
        *TINY,
        *overrides,
        f"paths.data_dir={data_root}",
        f"hydra.run.dir={run_dir}",
    ]


@pytest.mark.slow  # about a minute; pytest -m slow (the suite stays under 10 minutes)
def test_sigkill_during_an_epoch_resumes_from_last_completed_epoch(tiny_data_root, tmp_path):
    run = tmp_path / "killed"
    cmd = _cli(["trainer.max_epochs=3", "trainer.steps_per_epoch=40"], run, tiny_data_root)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = run / "checkpoints" / "latest" / "state.json"
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert state.exists(), proc.communicate()[0].decode()[-3000:]
    time.sleep(1.0)  # now inside epoch 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["epoch"] == 0
    # epoch 1's log row may precede its checkpoint: the resume cuts the log back to the checkpoint
    assert [r["epoch"] for r in _log(run)] in (["0"], ["0", "1"])
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "at epoch 1" in rerun.stdout
    assert [r["epoch"] for r in _log(run)] == ["0", "1", "2"]
    assert not list(run.glob("**/*.tmp*"))


WORKER = """
import json, os, sys
from hydra import compose, initialize_config_module
from hydra import compose, initialize_config_module

from segshare.predict import run as predict_run
from segshare.train import train
overrides, out = json.loads(sys.argv[1]), sys.argv[2]
with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
    cfg = compose(config_name="train", overrides=overrides)
_, objects = train(cfg)
objects["model"].save_weights(out)
print("WORKER_DONE", objects["prepared"].plan.num_classes)
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow  # about a minute; pytest -m slow (the suite stays under 10 minutes)
def test_two_workers_on_loopback_end_with_identical_weights(make_cfg, tmp_path):
    from segshare.cli import instantiate
    from segshare.data.prepare import prepare_dataset

    prepare_dataset(
        instantiate(make_cfg().data), progress=False
    )  # both workers reuse the same cache
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        from tests.training.conftest import TINY

        overrides = [
            *TINY,
            "trainer.strategy=multi_worker",
            "trainer.max_epochs=1",
            f"paths.root_dir={tmp_path}",
            f"paths.data_dir={make_cfg().paths.data_dir}",
            f"paths.output_dir={tmp_path / f'run{index}'}",
        ]
        env = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
        }
        out = tmp_path / f"worker{index}.weights.h5"
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), json.dumps(overrides), str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [p.communicate(timeout=420) for p in procs]
    for proc, (stdout, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        assert "WORKER_DONE" in stdout
    assert (tmp_path / "run0" / "model.keras").exists()  # the chief writes the run
    assert not (tmp_path / "run1" / "model.keras").exists()  # the other worker does not
    models = []
    for index in range(2):
        model = keras.models.load_model(tmp_path / "run0" / "model.keras")
        model.load_weights(tmp_path / f"worker{index}.weights.h5")
        models.append([np.asarray(w) for w in model.weights])
    initial = keras.models.load_model(tmp_path / "run0" / "model.keras")
    for a, b in zip(*models, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(models[0]) == len(initial.weights)


@pytest.mark.parametrize(
    "overrides",
    [
        ["optimizer=adamw", "model.deep_supervision=true"],
        ["trainer.precision=mixed_bfloat16", "loss=ce", "sharing=template"],
    ],
)
def test_training_options_run(make_cfg, tmp_path, overrides):
    last, objects = train(make_cfg("trainer.max_epochs=1", *overrides))
    assert np.isfinite(last["train_loss"])
    assert (tmp_path / "run" / "model.keras").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(make_cfg, tmp_path, monkeypatch):
    import segshare.losses

    train(make_cfg("trainer.max_epochs=1"))
    state = json.loads((tmp_path / "run" / "checkpoints" / "latest" / "state.json").read_text())

    class NaNLoss(segshare.losses.DiceCELoss):
        def __call__(self, y_true, y_pred, sample_weight=None):
            return super().__call__(y_true, y_pred) * float("nan")

    monkeypatch.setattr(segshare.losses, "DiceCELoss", NaNLoss)
    from segshare.training.loop import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="Loss became nan in epoch 1"):
        train(make_cfg("trainer.max_epochs=2"))
    after = json.loads((tmp_path / "run" / "checkpoints" / "latest" / "state.json").read_text())
    assert after == state
    assert [r["epoch"] for r in _log(tmp_path / "run")] == ["0"]


def test_log_keeps_columns_when_validation_is_not_every_epoch(make_cfg, tmp_path):
    train(make_cfg("trainer.max_epochs=3", "trainer.val_every=2", "trainer.steps_per_epoch=1"))
    rows = _log(tmp_path / "run")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["val_dice_fg_mean"] == ""  # no validation in epoch 0
    assert rows[1]["val_dice_fg_mean"] != "" and rows[2]["val_dice_fg_mean"] != ""  # 2nd and last


def test_multirun_sweep_puts_each_scheme_in_its_own_folder(tiny_data_root, tmp_path):
    from tests.training.conftest import TINY

    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "segshare.train",
        "-m",
        *TINY,
        "trainer.max_epochs=1",
        "trainer.steps_per_epoch=1",
        "sharing=none,global",
        f"paths.data_dir={tiny_data_root}",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.glob("*/model.keras"))
    assert [p.name for p in runs] == ["0", "1"]
    schemes = [json.loads((p / "parameters.json").read_text())["sharing"] for p in runs]
    assert schemes == ["none", "global"]
