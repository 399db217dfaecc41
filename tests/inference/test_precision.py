"""precision=auto|float32|bfloat16: the CPU's bfloat16 flags, the choice, and a model whose body
computes in bfloat16 while its heads and probabilities stay float32."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import segshare.devices as devices
from segshare.devices import cpu_bf16_flags, resolve_precision
from segshare.inference.model_io import make_predict_fn, with_precision


def test_bf16_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_bf16_flags.__wrapped__(str(info)) == ("avx512_bf16",)
    info.write_text("flags : fpu avx2 amx_bf16 amx_tile\n")
    assert cpu_bf16_flags.__wrapped__(str(info)) == ("amx_bf16",)
    info.write_text("flags : fpu avx2 avx512f\n")
    assert cpu_bf16_flags.__wrapped__(str(info)) == ()
    assert cpu_bf16_flags.__wrapped__(str(tmp_path / "missing")) == ()


@pytest.mark.parametrize(
    ("flags", "accelerator", "training", "want"),
    [
        (("avx512_bf16",), False, False, "bfloat16"),
        ((), False, False, "float32"),
        ((), True, False, "bfloat16"),
        (("amx_bf16",), False, True, "mixed_bfloat16"),
        ((), False, True, "float32"),
    ],
)
def test_auto_chooses_bfloat16_where_the_hardware_has_it(
    monkeypatch, flags, accelerator, training, want
):
    monkeypatch.setattr(devices, "cpu_bf16_flags", lambda: flags)
    monkeypatch.setattr(devices, "accelerator_present", lambda: accelerator)
    monkeypatch.setattr(devices, "_keras_backend", lambda: "tensorflow")
    precision, why = resolve_precision("auto", training=training)
    assert precision == want and why.startswith("auto")
    monkeypatch.setattr(devices, "_keras_backend", lambda: "jax")
    on_jax = resolve_precision("auto", training=training)[0]
    assert on_jax == (want if accelerator else "float32")
    assert resolve_precision("float32", training=training) == ("float32", "as set")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_precision("float16", training=training)


def test_a_bfloat16_copy_keeps_the_weights_and_float32_heads():
    from segshare.models.unet import build_unet

    model = build_unet(spatial_dims=3, in_channels=1, num_classes=3, features=(8, 16))
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
    copy = with_precision(model, "bfloat16")
    assert with_precision(model, "float32") is model
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    policies = {layer.name: layer.dtype_policy.name for layer in copy._flatten_layers()}
    assert policies["head"] == "float32"
    assert "mixed_bfloat16" in policies.values()
    for a, b in zip(copy.weights, model.weights, strict=True):
        assert a.dtype == b.dtype  # float32 variables
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    p32 = make_predict_fn(model)(x)
    p16 = make_predict_fn(copy)(x)
    assert p16.dtype == np.float32
    np.testing.assert_allclose(p16.sum(-1), 1.0, atol=1e-5)  # softmax taken in float32
    assert np.abs(p16 - p32).max() < 0.05  # bfloat16 rounding, not another model
    assert not np.array_equal(p16, p32)  # it did compute in bfloat16
    assert with_precision(copy, "bfloat16") is copy  # already mixed: unchanged
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        with_precision(model, "float16")


def test_predict_prints_its_precision(tmp_path, compose_cfg, run_dir, capsys):
    from segshare.predict import run

    from .conftest import random_scan, write_scan

    scans = tmp_path / "scans"
    scans.mkdir()
    write_scan(scans / "a.nii.gz", random_scan((18, 17, 19)), np.eye(4))
    outputs = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / precision
        report = run(
            compose_cfg(
                f"model_path={run_dir}", f"input={scans}", f"output={out}", f"precision={precision}"
            )
        )
        assert report.written == ["a"]
        assert f"precision: {precision} (as set)" in capsys.readouterr().out
        import nibabel as nib

        outputs[precision] = np.asarray(nib.load(out / "a.nii.gz").dataobj)
    assert np.mean(outputs["float32"] == outputs["bfloat16"]) > 0.99
