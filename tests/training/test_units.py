"""Losses, schedules, checkpoints, strategies: small pure pieces of training."""

import json

import keras
import numpy as np
import pytest

from segshare.losses import DiceCELoss, deep_supervision_weights, dice_ce_loss, soft_dice_loss
from segshare.training.checkpoints import find_checkpoint, load_checkpoint, save_checkpoint
from segshare.training.loop import budget_epochs, dice_per_class
from segshare.training.schedules import learning_rate_at
from segshare.training.strategy import make_strategy


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_soft_dice_and_ce_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 6, 7, 3)).astype("float32")
    labels = rng.integers(0, 3, size=(2, 5, 6, 7))
    p = _softmax(logits.astype(np.float64))
    onehot = np.eye(3)[labels]
    inter = (p * onehot).sum((0, 1, 2, 3))
    dice = (2 * inter + 1e-5) / (p.sum((0, 1, 2, 3)) + onehot.sum((0, 1, 2, 3)) + 1e-5)
    ce = -np.log(np.take_along_axis(p, labels[..., None], -1)).mean()
    np.testing.assert_allclose(
        float(soft_dice_loss(labels, logits)), 1 - dice[1:].mean(), rtol=1e-5
    )
    np.testing.assert_allclose(
        float(dice_ce_loss(labels, logits, include_background=True)),
        ce + 1 - dice.mean(),
        rtol=1e-5,
    )


def test_perfect_prediction_has_low_loss_and_deep_supervision_weights():
    labels = np.zeros((1, 8, 8, 8), dtype="int32")
    labels[:, 2:6, 2:6, 2:6] = 1
    logits = (np.eye(2)[labels] * 40.0).astype("float32")
    assert float(DiceCELoss()(labels, logits)) < 1e-4
    weights = deep_supervision_weights(3)
    assert weights == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    coarse = logits[:, ::2, ::2, ::2]
    assert float(DiceCELoss()(labels, [logits, coarse])) < 1e-4
    wrong = [logits, -coarse]  # the coarse level is wrong: the loss sees it with weight 1/3
    assert float(DiceCELoss()(labels, wrong)) > 1.0 / 3


def test_deep_supervision_labels_follow_anisotropic_pooling():
    labels = np.zeros((1, 8, 8, 4), dtype="int32")
    labels[:, 2:6, 2:6, 1:3] = 1
    logits = (np.eye(2)[labels] * 40.0).astype("float32")
    coarse = logits[:, ::2, ::2, :]  # pooled in-plane only, as a thick-slice stage
    assert float(DiceCELoss()(labels, [logits, coarse])) < 1e-4
    assert float(DiceCELoss()(labels, [logits, -coarse])) > 1.0 / 3


def test_poly_schedule():
    assert learning_rate_at(0, 10, 0.01) == pytest.approx(0.01)
    assert learning_rate_at(5, 10, 0.01) == pytest.approx(0.01 * 0.5**0.9)
    assert learning_rate_at(10, 10, 0.01) == 0.0
    assert learning_rate_at(3, 10, 0.01, "constant") == 0.01
    with pytest.raises(ValueError, match="got 'cosine'"):
        learning_rate_at(1, 10, 0.01, "cosine")


def test_dice_per_class_counts_and_nan():
    ref = np.array([[0, 1, 1, 2]])
    pred = np.array([[0, 1, 0, 0]])
    d = dice_per_class(pred, ref, 4)
    assert d[0] == pytest.approx(2 / 3)
    assert d[1] == 0.0
    assert np.isnan(d[2])  # class 3 absent from both


def test_checkpoint_round_trip_and_interrupted_swap(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    opt.build(model.trainable_variables)
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
    model.compile(opt, "mse")
    model.train_on_batch(x, y)
    save_checkpoint(tmp_path / "latest", model, opt, {"epoch": 3, "best": 0.5})
    clone = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    clone_opt = keras.optimizers.SGD(0.1, momentum=0.9)
    state = load_checkpoint(tmp_path / "latest", clone, clone_opt)
    assert state["epoch"] == 3
    for a, b in zip(
        model.weights + opt.variables, clone.weights + clone_opt.variables, strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A swap interrupted after moving the old checkpoint aside still finds a whole one.
    (tmp_path / "latest").rename(tmp_path / "latest.old")
    assert find_checkpoint(tmp_path / "latest") == tmp_path / "latest.old"
    (tmp_path / "latest.old" / "state.json").unlink()
    assert find_checkpoint(tmp_path / "latest") is None
    assert json.loads("1") == 1


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="got 'tpu'"):
        make_strategy("tpu")


def test_nanmean_ignores_nan_without_warnings():
    import warnings

    from segshare.training.loop import _nanmean

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _nanmean(np.array([[0.5, np.nan], [1.0, np.nan]]))
    assert out[0] == pytest.approx(0.75) and np.isnan(out[1])
    assert float(_nanmean(np.array([0.2, np.nan, 0.4]))) == pytest.approx(0.3)


def test_budget_epochs_fill_the_time_left_after_epoch_0():
    # 10 min budget, epoch 0 took 70 s, then 50 s per epoch + 20 s validation every 2 epochs
    assert budget_epochs(600, 70, 50, 20, 2) == 1 + int(530 // 60) == 9
    assert budget_epochs(60, 70, 50, 20, 1) == 1  # epoch 0 alone overran: it is the run
    assert budget_epochs(600, 10, 0, 0, 1) == 1


def test_ignored_voxels_leave_the_loss_as_if_they_were_cut_away():
    """Labels >= K (the ignore label) weigh nothing: the loss of a patch with a large ignored
    region equals the loss of its annotated part alone, and the ignored logits get no gradient."""
    import tensorflow as tf

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 8, 6, 5, 3)).astype("float32")
    labels = rng.integers(0, 3, size=(2, 8, 6, 5)).astype("int32")
    ignored = labels.copy()
    ignored[:, 3:] = 3  # 5 of 8 slices not annotated: value K = 3
    cut_labels, cut_logits = labels[:, :3], logits[:, :3]
    for kwargs in ({}, {"include_background": True}, {"ce_weight": 0.0}, {"dice_weight": 0.0}):
        np.testing.assert_allclose(
            float(dice_ce_loss(ignored, logits, **kwargs)),
            float(dice_ce_loss(cut_labels, cut_logits, **kwargs)),
            rtol=1e-5,
        )
    variable = tf.Variable(logits)
    with tf.GradientTape() as tape:
        loss = DiceCELoss()(ignored, variable)
    grad = tape.gradient(loss, variable).numpy()
    assert np.all(grad[:, 3:] == 0) and np.any(grad[:, :3] != 0)
    # everything ignored: a zero loss, not a NaN
    assert float(dice_ce_loss(np.full_like(labels, 3), logits, dice_weight=0.0)) == 0.0


def test_dice_per_class_leaves_ignored_voxels_out():
    ref = np.array([[0, 1, 1, 3, 3, 3]])  # K = 3: value 3 is the ignore label
    pred = np.array([[0, 1, 1, 1, 2, 0]])  # what it predicts there does not count
    d = dice_per_class(pred, ref, 3)
    assert d[0] == pytest.approx(1.0) and np.isnan(d[1])
