"""Tests of the pure sliding-window inference (NumPy only, no model)."""

import numpy as np
import pytest

from segshare.inference.sliding_window import (
    gaussian_importance_map,
    sliding_window_inference,
    window_starts,
)


def identity(batch: np.ndarray) -> np.ndarray:
    return batch.copy()


def one_hot_of_channel0(num_classes: int):
    def fn(batch: np.ndarray) -> np.ndarray:
        labels = np.rint(batch[..., 0]).astype(int)
        return np.eye(num_classes, dtype=np.float32)[labels]

    return fn


@pytest.mark.parametrize(
    "shape,roi,overlap,sw",
    [
        ((33, 34, 35), (16, 16, 16), 0.5, 2),
        ((33, 34, 35), (16, 12, 20), 0.25, 3),
        ((7, 40, 9), (16, 16, 16), 0.5, 4),  # smaller than the window on two axes
        ((16, 16, 16), (16, 16, 16), 0.5, 1),  # exactly one window
        ((31, 17, 23), (8, 8, 8), 0.0, 5),  # no overlap, last window shifted back
    ],
)
def test_identity_model_reproduces_input(shape, roi, overlap, sw):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(*shape, 2)).astype(np.float32)
    out = sliding_window_inference(volume, identity, roi, overlap=overlap, sw_batch_size=sw)
    assert out.shape == volume.shape
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, volume, rtol=1e-5, atol=1e-5)


def test_one_hot_model_reproduces_labels_exactly():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=(33, 34, 35))
    volume = labels[..., None].astype(np.float32)
    out = sliding_window_inference(volume, one_hot_of_channel0(3), 16, num_classes=3)
    assert out.shape == (33, 34, 35, 3)
    np.testing.assert_array_equal(out.argmax(-1), labels)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


def test_windows_are_batched():
    sizes = []

    def fn(batch):
        sizes.append(batch.shape[0])
        return batch

    sliding_window_inference(np.zeros((32, 32, 33, 1), np.float32), fn, 16, sw_batch_size=5)
    # 3 x 3 x 4 starts -> 36 windows -> 7 full batches of 5 and one of 1.
    assert sizes == [5] * 7 + [1]


def test_gaussian_weights_blend_position_dependent_predictions():
    """A model that returns the window-local coordinate: the centre must dominate the blend."""

    def fn(batch):
        out = np.zeros((*batch.shape[:4], 1), np.float32)
        out[..., 0] = np.arange(batch.shape[1])[None, :, None, None]
        return out

    out = sliding_window_inference(np.zeros((24, 8, 8, 1), np.float32), fn, (16, 8, 8))
    # Windows start at 0 and 8; voxel 12 is local 12 in the first and local 4 in the second
    # window, equally far from the centres (8): the Gaussian blend gives the mean, 8.
    np.testing.assert_allclose(out[12, 4, 4, 0], 8.0, atol=1e-4)
    # Voxel 10: local 10 (2 from centre) vs local 2 (6 from centre): near the first window's value.
    assert 9.0 < out[10, 4, 4, 0] < 10.0


def test_gaussian_map_peak_and_sigma():
    g = gaussian_importance_map((16, 16, 16), 0.125)
    assert g.max() == pytest.approx(1.0)
    assert np.unravel_index(g.argmax(), g.shape) == (8, 8, 8)
    # sigma = 2 voxels: one sigma from the centre along one axis -> exp(-1/2).
    assert g[10, 8, 8] == pytest.approx(np.exp(-0.5), rel=1e-5)
    assert g.min() > 0


def test_window_starts_cover_the_axis():
    assert window_starts(160, 64, 0.5) == [0, 32, 64, 96]
    assert window_starts(33, 16, 0.5) == [0, 6, 11, 17]
    assert window_starts(32, 16, 0.5) == [0, 8, 16]
    assert window_starts(16, 16, 0.5) == [0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"overlap": 1.0}, "overlap must be in"),
        ({"sw_batch_size": 0}, "sw_batch_size"),
        ({"num_classes": 5}, "expected num_classes=5"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sliding_window_inference(np.zeros((8, 8, 8, 1), np.float32), identity, 8, **kwargs)


def test_bad_volume_and_prediction_shape():
    with pytest.raises(ValueError, match=r"\(D, H, W, C\)"):
        sliding_window_inference(np.zeros((8, 8, 8), np.float32), identity, 8)
    with pytest.raises(ValueError, match="predict_fn must return"):
        sliding_window_inference(np.zeros((8, 8, 8, 1), np.float32), lambda b: b[:, :4], 8)
    with pytest.raises(ValueError, match="roi_size"):
        sliding_window_inference(np.zeros((8, 8, 8, 1), np.float32), identity, (8, 8))


def test_window_bar_only_on_a_terminal(monkeypatch):
    import io
    import sys

    from segshare.inference.sliding_window import _progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file: no inner bar
    assert _progress_bar(8, True).disable
    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = _progress_bar(8, True)
    assert not bar.disable
    bar.close()
    assert _progress_bar(8, False).disable


@pytest.mark.parametrize(
    "shape,roi,patch,stride,expected",
    [
        ((35, 51, 35), (80, 112, 80), (40, 56, 40), (8, 8, 8), (40, 56, 40)),  # below the patch
        ((43, 51, 35), (80, 112, 80), (40, 56, 40), (8, 8, 8), (48, 56, 40)),  # 43 -> 48, not 80
        ((43, 51, 35), (80, 112, 80), (40, 56, 40), None, (80, 56, 40)),  # gcd(80, 40) steps
        ((100, 60, 200), (128, 128, 128), (64, 64, 64), (16, 16, 16), (112, 64, 128)),
        ((100, 60, 200), (128, 128, 128), (64, 64, 64), None, (128, 64, 128)),
        ((160, 160, 160), (128, 128, 128), (64, 64, 64), (16, 16, 16), (128, 128, 128)),
        ((20, 20, 20), (48, 48, 48), (32, 32, 32), None, (32, 32, 32)),  # never below the patch
        ((7, 50, 50), (1, 96, 96), (1, 64, 64), (1, 16, 16), (1, 64, 64)),  # a 2D network
        ((10, 10, 10), (16, 16, 16), (16, 16, 16), (8, 8, 8), (16, 16, 16)),  # the patch
        ((10, 10, 10), (8, 8, 8), (16, 16, 16), (8, 8, 8), (8, 8, 8)),  # narrower: as asked
    ],
)
def test_a_wide_window_is_fitted_to_the_volume(shape, roi, patch, stride, expected):
    from segshare.inference.sliding_window import WindowSettings, fitted_roi

    assert fitted_roi(shape, roi, patch, stride) == expected
    window = WindowSettings(roi, 0.5, 2, 0.125).with_default_roi(patch, stride)
    assert window.roi_size == roi and window.roi_for(shape) == expected
    calls = []

    def record(batch):
        calls.append(batch.shape[1:4])
        return np.ones((*batch.shape[:4], 2), np.float32)

    window.predict(np.zeros((*shape, 1), np.float32), record)
    assert set(calls) == {expected}
    # without a patch (a bare WindowSettings) the window is taken as given
    assert WindowSettings(roi, 0.5, 2, 0.125).roi_for(shape) == roi


def test_a_wider_window_leaves_a_small_case_as_the_patch_predicts_it():
    """Instance norm sees the whole window: a 2x window over a volume smaller than the patch
    would be mostly padding. Fitted, it is the patch, so the probabilities are the patch's."""
    import keras

    from segshare.inference.model_io import make_predict_fn
    from segshare.inference.sliding_window import WindowSettings
    from segshare.models import build_unet

    keras.utils.set_random_seed(0)
    model = build_unet(in_channels=1, num_classes=3, features=(4, 8), blocks_per_stage=(1, 1))
    predict_fn = make_predict_fn(model)
    volume = np.random.default_rng(0).normal(size=(13, 15, 11, 1)).astype(np.float32)
    patch = WindowSettings(None, 0.5, 2, 0.125).with_default_roi((16, 16, 16))
    wide = WindowSettings((32, 32, 32), 0.5, 2, 0.125).with_default_roi((16, 16, 16))
    np.testing.assert_array_equal(
        wide.predict(volume, predict_fn), patch.predict(volume, predict_fn)
    )
    unfitted = WindowSettings((32, 32, 32), 0.5, 2, 0.125).predict(volume, predict_fn)
    assert np.abs(unfitted - patch.predict(volume, predict_fn)).max() > 1e-3  # padding counts
