"""Training under ``KERAS_BACKEND=jax``: the same loop, run folder, resume and model file as under
TensorFlow. JAX runs in one subprocess (the backend is fixed at import); this process (TensorFlow)
trains the reference run and checks what came back."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hydra import compose, initialize_config_module

from segshare.predict import run as predict_run
from segshare.train import train

from .conftest import TINY

#: Runs in the JAX subprocess: three trainings (straight, then resumed in two invocations) and a
#: prediction with the TensorFlow-trained run.
JAX_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from hydra import compose, initialize_config_module
    import keras
    assert keras.backend.backend() == "jax"
    from segshare.train import train
    from segshare.predict import run as predict_run

    args = json.loads(sys.argv[1])

    def cfg(name, *extra):
        with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
            return compose(name, overrides=[*args["common"], *extra])

    runs = args["runs"]
    train(cfg("train", f"paths.output_dir={runs}/straight", *args["train"]))
    for _ in range(2):
        train(cfg("train", f"paths.output_dir={runs}/resumed", "trainer.epochs_per_run=1",
                  *args["train"]))
    with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
        predict = compose("predict", overrides=args["predict"])
    report = predict_run(predict)
    print(json.dumps({"written": len(report.written), "failed": len(report.failed)}))
    """
)


def _log(run: Path) -> list[dict]:
    with open(run / "train_log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _predict(model_path: Path, images: Path, output: Path) -> None:
    with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
        cfg = compose(
            "predict",
            overrides=[
                f"model_path={model_path}",
                f"input={images}",
                f"output={output}",
                "precision=float32",  # the backends compared, not bfloat16's rounding
            ],  # fmt: skip
        )
    predict_run(cfg)


def _jax_env(**extra: str) -> dict:
    """This environment under JAX on the CPU, without any cluster variable but those in
    ``extra``."""
    cluster = ("TF_CONFIG", "SLURM_NTASKS", "KERAS_DISTRIBUTION_JOB_ADDRESSES")
    env = {k: v for k, v in os.environ.items() if k not in cluster}
    return {**env, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", **extra}


def test_jax_trains_resumes_exactly_and_models_cross_backends(make_cfg, tiny_data_root, tmp_path):
    # The TensorFlow reference run (this process), on the same tiny data.
    tf_run = tmp_path / "tf_run"
    train(make_cfg("trainer.max_epochs=1", run_dir=tf_run))
    images = tiny_data_root / "synthetic" / "imagesTr"
    common = [*TINY, f"paths.root_dir={tiny_data_root}", f"paths.data_dir={tiny_data_root}"]
    args = {
        "common": common,
        "runs": str(tmp_path / "jax"),
        "train": ["trainer.max_epochs=2", "trainer.deterministic=true"],
        "predict": [
            f"model_path={tf_run}",
            f"input={images}",
            f"output={tmp_path / 'jax_of_tf'}",
            "precision=float32",
        ],  # fmt: skip
    }
    done = subprocess.run(
        [sys.executable, "-c", JAX_SCRIPT, json.dumps(args)],
        capture_output=True,
        text=True,
        env=_jax_env(),
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"written": 6, "failed": 0}
    straight, resumed = tmp_path / "jax" / "straight", tmp_path / "jax" / "resumed"
    # The run folder a JAX training leaves is the TensorFlow one.
    for name in ("model.keras", "plan.json", "run.json", "config.yaml", "train_log.csv"):
        assert (straight / name).is_file(), name
    for ckpt in ("latest", "best"):
        assert (straight / "checkpoints" / ckpt / "optimizer.npz").is_file()
    assert any((straight / "tensorboard").iterdir())
    # Stopped after epoch 0 and resumed: the same losses and learning rates as straight through.
    a, b = _log(straight), _log(resumed)
    assert [r["epoch"] for r in b] == ["0", "1"]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    np.testing.assert_allclose(
        [float(r["train_loss"]) for r in b], [float(r["train_loss"]) for r in a], rtol=1e-5
    )
    assert float(a[1]["train_loss"]) != float(a[0]["train_loss"])  # it learned something
    # The JAX model predicts under TensorFlow, and the TensorFlow one predicted under JAX.
    _predict(straight, images, tmp_path / "tf_of_jax")
    _predict(tf_run, images, tmp_path / "tf_of_tf")
    for path in sorted((tmp_path / "tf_of_tf").glob("*.nii.gz")):
        ours = np.asarray(nib.load(path).dataobj)
        theirs = np.asarray(nib.load(tmp_path / "jax_of_tf" / path.name).dataobj)
        assert np.mean(ours == theirs) > 0.999, path.name
        assert nib.load(tmp_path / "tf_of_jax" / path.name).shape == ours.shape


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.strategy=multi_worker", "needs a cluster: TF_CONFIG with several workers"),
        ("trainer.precision=mixed_float16", "use trainer.precision=mixed_bfloat16"),
    ],
)
def test_what_jax_cannot_train_is_refused_up_front(tmp_path, override, message):
    done = subprocess.run(
        [
            sys.executable, "-m", "segshare.train", "debug=fast", override,
            f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path}",
        ],
        capture_output=True, text=True, env=_jax_env(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "synthetic").exists()  # refused before any data was made


def test_the_data_pipeline_never_imports_tensorflow_under_jax(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from segshare.data.synthetic import generate_synthetic_dataset
        from segshare.data.prepare import prepare_dataset
        from segshare.data.pipeline import make_training_data
        from tests.data.conftest import data_settings
        import dataclasses
        root = generate_synthetic_dataset({str(tmp_path / "syn")!r}, num_cases=3, seed=1,
                                          shape_range=(12, 14))
        data = dataclasses.replace(data_settings(), root=str(root),
                                   preprocessed_dir={str(tmp_path / "pre")!r}, num_workers=1,
                                   num_folds=2)
        prepared = prepare_dataset(data, progress=False)
        batches = make_training_data(prepared.cache_dir, prepared.train_ids, (8, 8, 8), 2,
                                     steps_per_epoch=2, num_workers=1)
        x, y = batches[0]
        assert x.shape == (2, 8, 8, 8, 1), x.shape
        print("tensorflow" in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=_jax_env(),
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.slow
def test_the_gpu_check_runs_on_a_cpu_in_its_tiny_form(tmp_path):
    """scripts/gpu_check.py --tiny: the GPU script's every part, in about a minute on a CPU."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"
    done = subprocess.run(
        [
            sys.executable, str(script), "--tiny", "--out", str(tmp_path / "out"),
            "--budget-minutes", "0.1", "--schemes", "none,stage",
        ],
        capture_output=True, text=True, env=_jax_env(), timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["scheme"] for r in results["throughput"]] == ["none", "stage"]
    assert all(r["patches_per_s"] > 0 for r in results["throughput"])
    none, stage = results["throughput"]
    assert stage["unique_parameters"] < none["unique_parameters"]
    assert results["training"]["epochs"] >= 1
    assert results["training"]["final_val_dice_fg_mean"] is not None


def test_jax_splits_each_batch_over_the_local_devices():
    """Two (simulated) local devices: the batch is split across them, and one step gives the loss
    and weights of the one-device step; an aborted epoch keeps the variables; the validation
    function sees the weights a step wrote back."""
    script = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import keras, numpy as np
        from segshare.losses import DiceCELoss
        from segshare.models import build_unet
        from segshare.training.steps import JaxSteps
        from segshare.inference.model_io import make_predict_fn
        from segshare.training.strategy import JaxStrategy, check_batch_split

        rng = np.random.default_rng(0)
        batch = (rng.normal(size=(2, 8, 8, 8, 1)).astype("float32"),
                 rng.integers(0, 2, size=(2, 8, 8, 8)).astype("int32"))
        results = []
        for parallel in (False, True):
            strategy = JaxStrategy(data_parallel=parallel)
            with strategy.scope():
                keras.utils.set_random_seed(1)
                model = build_unet(in_channels=1, num_classes=2, features=[4, 8],
                                   blocks_per_stage=[1, 1], patch_size=[8, 8, 8])
                optimizer = keras.optimizers.SGD(learning_rate=0.1)  # Adam would amplify noise
                optimizer.build(model.trainable_variables)
            steps = JaxSteps(model, optimizer, DiceCELoss(), strategy, 1)
            predict = make_predict_fn(model)  # built once, as the trainer's validation
            before = predict(batch[0])
            start = [np.asarray(v.value) for v in model.trainable_variables]
            steps.start([batch] * 6)
            steps.abort()  # a failed epoch: workers released, the variables as they were
            assert steps._pool is None and not steps._pending
            for v, w in zip(model.trainable_variables, start):
                np.testing.assert_array_equal(np.asarray(v.value), w)
            steps.start([batch])
            if parallel:
                placed = steps._place(batch[0])
                assert len(placed.sharding.device_set) == 2, placed.sharding
                assert strategy.num_replicas_in_sync == 2
                check_batch_split(strategy, 2)
                try:
                    check_batch_split(strategy, 3)
                    raise AssertionError("an odd batch over 2 devices was accepted")
                except ValueError as err:
                    assert "data.batch_size=3 does not split over the 2" in str(err)
            loss = steps.step()
            steps.finish()
            # validation sees the trained weights, not the ones the function was built with
            assert not np.allclose(predict(batch[0]), before)
            results.append((loss, [np.asarray(v.value) for v in model.trainable_variables]))
        (a, wa), (b, wb) = results
        assert abs(a - b) < 1e-4 * abs(a), (a, b)
        for x, y in zip(wa, wb):
            np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_jax_env(), timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ok"


def test_a_jax_cluster_is_read_from_the_variables_the_tensorflow_path_reads(monkeypatch):
    from segshare.training.strategy import jax_cluster

    for name in ("TF_CONFIG", "SLURM_NTASKS", "KERAS_DISTRIBUTION_JOB_ADDRESSES"):
        monkeypatch.delenv(name, raising=False)
    assert jax_cluster() is None
    cluster = {"chief": ["a:1"], "worker": ["b:2", "c:3"]}
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}})
    )
    assert jax_cluster() == {"job_addresses": "a:1,b:2,c:3", "num_processes": 3, "process_id": 2}
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "chief", "index": 0}})
    )
    assert jax_cluster()["process_id"] == 0
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {}}))
    with pytest.raises(ValueError, match="TF_CONFIG names no task"):
        jax_cluster()
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert jax_cluster() == {}  # Keras and JAX read SLURM's variables themselves
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", "a:1,b:2")
    assert jax_cluster() == {}


JAX_WORKER = textwrap.dedent(
    """
    import json, sys
    import keras
    assert keras.backend.backend() == "jax"
    from hydra import compose, initialize_config_module
    from segshare.train import train
    overrides, out = json.loads(sys.argv[1]), sys.argv[2]
    with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
        cfg = compose(config_name="train", overrides=overrides)
    _, objects = train(cfg)
    import jax
    objects["model"].save_weights(out)
    print("WORKER_DONE", jax.process_count(), len(jax.devices()))
    """
)


@pytest.mark.slow  # about a minute; pytest -m slow (the suite stays under 10 minutes)
def test_two_jax_processes_on_loopback_train_one_model(make_cfg, tmp_path):
    """keras.distribution.initialize from TF_CONFIG: two processes of one CPU device each train
    data parallel over both devices; only process 0 writes the run; the weights agree."""
    import keras

    from segshare.cli import instantiate
    from segshare.data.prepare import prepare_dataset

    from .test_train_app import _free_ports

    prepare_dataset(instantiate(make_cfg().data), progress=False)  # both reuse one cache
    script = tmp_path / "worker.py"
    script.write_text(JAX_WORKER)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = []
    for index in range(2):
        overrides = [
            *TINY,
            "trainer.strategy=multi_worker",
            "trainer.max_epochs=1",
            f"paths.root_dir={tmp_path}",
            f"paths.data_dir={make_cfg().paths.data_dir}",
            f"paths.output_dir={tmp_path / f'run{index}'}",
        ]
        task = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = _jax_env(TF_CONFIG=json.dumps(task))
        out = tmp_path / f"worker{index}.weights.h5"
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), json.dumps(overrides), str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    results = [p.communicate(timeout=420) for p in procs]
    for proc, (stdout, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        assert "WORKER_DONE 2 2" in stdout  # two processes, two devices in all
    assert (tmp_path / "run0" / "model.keras").exists()  # process 0 writes the run
    assert not (tmp_path / "run1" / "model.keras").exists()
    weights = []
    for index in range(2):
        model = keras.models.load_model(tmp_path / "run0" / "model.keras")
        model.load_weights(tmp_path / f"worker{index}.weights.h5")
        weights.append([np.asarray(w) for w in model.weights])
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)
