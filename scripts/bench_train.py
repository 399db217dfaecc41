"""Training-step throughput of the U-Net per sharing scheme (a benchmark, not a test).

Prints patches/s and voxels/s of full training steps (forward, Dice+CE loss, backward, SGD update)
on in-memory random batches, after warm-up, in rounds that interleave the schemes (so the drift
of a shared machine hits all of them alike; the median round is shown, and the best).
Runs on whatever Keras backend is active:

    python scripts/bench_train.py                                  # TensorFlow, CPU
    KERAS_BACKEND=jax python scripts/bench_train.py --precision mixed_bfloat16   # e.g. on a GPU

Defaults: the issue's architecture, patch 64^3, batch 2, widths 16-32-64-128, two conv-norm-act
per stage (``block=plain``: a strided entry conv and one plain block per encoder stage; two convs
per decoder stage), every scheme, and first the same network in stock Keras layers (``reference``,
no custom layers) for comparison. ``--block residual`` measures the residual encoder instead (an
entry conv and a two-conv residual block per stage: 24 % more convolution work).

A scheme may name its own dtype policy, ``SCHEME@POLICY``, to compare precisions in one run
(the stock network in float32 against segshare's in bfloat16, issue 15)::

    python scripts/bench_train.py --schemes reference@float32 none@float32 none@mixed_bfloat16

``SCHEME+groupnorm`` builds segshare's network with the norm it had before issue 15 (Keras'
``GroupNormalization(groups=-1)``, 6-D reshape) instead of ``InstanceNormalization``;
``SCHEME+autodiff`` with ``InstanceNormalization`` differentiated through its forward ops
instead of its closed-form gradient::

    python scripts/bench_train.py --schemes none+groupnorm none+autodiff none

The last column is each entry's speed relative to the first entry's (median s/step ratio).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from segshare.losses import DiceCELoss  # noqa: E402
from segshare.models import SHARING_SCHEMES, build_unet, count_unique_params  # noqa: E402


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--blocks", type=int, nargs="+", default=None, help="blocks per stage")
    p.add_argument("--block", choices=["plain", "residual"], default="plain")
    p.add_argument("--decoder-blocks", type=int, default=2)
    p.add_argument(
        "--schemes",
        nargs="+",
        default=["reference", *SHARING_SCHEMES],
        help="sharing schemes; 'reference' = the plain Keras network of the issue (no sharing)",
    )
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="rounds over all schemes (median shown)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--precision", default="float32")
    p.add_argument("--jit", choices=["on", "off"], default=None, help="default: off for TF on CPU")
    return p.parse_args()


def build_reference_unet(features, classes: int) -> keras.Model:
    """The issue's reference network in plain Keras layers (no sharing, no custom layers): two
    3x3x3 conv-instance norm-LeakyReLU per stage, strided-conv down, transposed-conv up."""
    from keras import layers

    def unit(x, width, stride=1):
        x = layers.Conv3D(width, 3, strides=stride, padding="same")(x)
        return layers.LeakyReLU(0.01)(layers.GroupNormalization(groups=-1)(x))

    inputs = keras.Input((None, None, None, 1))
    x, skips = inputs, []
    for i, width in enumerate(features):
        x = unit(unit(x, width, 1 if i == 0 else 2), width)
        skips.append(x)
    for i in range(len(features) - 2, -1, -1):
        x = layers.Conv3DTranspose(features[i], 2, strides=2)(x)
        x = unit(unit(layers.Concatenate()([x, skips[i]]), features[i]), features[i])
    return keras.Model(inputs, layers.Conv3D(classes, 1)(x), name="plain_keras_reference")


@contextlib.contextmanager
def _norm(kind: str):
    """Build with Keras' ``GroupNormalization(groups=-1)`` (``kind="groupnorm"``), the norm of
    segshare's networks before issue 15, or with ``InstanceNormalization`` without its
    closed-form gradient (``"autodiff"``); ``""``: today's ``InstanceNormalization``."""
    import segshare.models.encoder as encoder
    import segshare.models.unet as unet
    from segshare.models.norm import InstanceNormalization

    class AutodiffNorm(InstanceNormalization):
        def call(self, inputs, training=None):
            return super().call(inputs, training=False)  # the forward ops, differentiated

    makers = {
        "groupnorm": lambda _kind, name: keras.layers.GroupNormalization(
            groups=-1, epsilon=1e-5, name=name
        ),
        "autodiff": lambda _kind, name: AutodiffNorm(epsilon=1e-5, name=name),
    }
    if kind not in ("", *makers):
        raise SystemExit(f"unknown norm {kind!r} (SCHEME+groupnorm, SCHEME+autodiff)")
    saved = encoder.make_norm
    if kind:
        encoder.make_norm = unet.make_norm = makers[kind]
    try:
        yield
    finally:
        encoder.make_norm = unet.make_norm = saved


def _tf_step(model, optimizer, loss_fn, jit: bool):
    import tensorflow as tf

    @tf.function(jit_compile=jit)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    return lambda x, y: float(step(x, y))


def _generic_step(model, optimizer, loss_fn, jit: bool):
    model.compile(optimizer=optimizer, loss=loss_fn, jit_compile=jit)
    return lambda x, y: float(model.train_on_batch(x, y))


def prepare(args: argparse.Namespace, entry: str, jit: bool, x, y) -> dict:
    """Build one entry's model (``SCHEME`` or ``SCHEME@POLICY``) and train step, and warm it up
    (tracing included)."""
    scheme, _, policy = entry.partition("@")
    scheme, _, norm = scheme.partition("+")
    policy = policy or args.precision
    keras.mixed_precision.set_global_policy(policy)  # the layers keep the policy built with
    keras.utils.set_random_seed(0)
    blocks = args.blocks or [1] * len(args.features)
    if scheme == "reference":
        model = build_reference_unet(args.features, args.classes)
    else:
        with _norm(norm):
            model = build_unet(
                in_channels=1,
                num_classes=args.classes,
                features=args.features,
                blocks_per_stage=blocks,
                block=args.block,
                decoder_blocks=args.decoder_blocks,
                sharing=scheme,
            )
    optimizer = keras.optimizers.SGD(0.01, momentum=0.99, nesterov=True)
    if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    maker = _tf_step if keras.backend.backend() == "tensorflow" else _generic_step
    step = maker(model, optimizer, DiceCELoss(), jit)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step(x, y)
    keras.mixed_precision.set_global_policy(args.precision)
    return {
        "scheme": entry,
        "step": step,
        "unique_params": count_unique_params(model),
        "warmup_s": time.perf_counter() - t0,
        "rounds": [],
    }


def time_round(run: dict, steps: int, x, y) -> None:
    """Append the mean seconds per step of ``steps`` steps to ``run["rounds"]``."""
    t0 = time.perf_counter()
    for _ in range(steps):
        run["step"](x, y)
    run["rounds"].append((time.perf_counter() - t0) / steps)


def main() -> None:
    args = _parse()
    keras.mixed_precision.set_global_policy(args.precision)
    devices = "cpu"
    if keras.backend.backend() == "jax":
        import jax

        devices = ",".join(sorted({d.platform for d in jax.devices()}))
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        devices = "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    # XLA off on CPU for TensorFlow (10x slower there); JAX always compiles (eager JAX is slower).
    jit = (args.jit == "on") if args.jit else (devices != "cpu" or keras.backend.backend() == "jax")
    print(
        f"backend={keras.backend.backend()} devices={devices} precision={args.precision} "
        f"jit={jit} patch={args.patch} batch={args.batch} features={args.features} "
        f"block={args.block} blocks={args.blocks or [1] * len(args.features)} "
        f"decoder_blocks={args.decoder_blocks}"
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, *args.patch, 1)).astype("float32")
    y = rng.integers(0, args.classes, size=(args.batch, *args.patch)).astype("int32")
    runs = [prepare(args, scheme, jit, x, y) for scheme in args.schemes]
    for _ in range(args.rounds):  # schemes interleaved: the machine's drift hits all alike
        for run in runs:
            time_round(run, args.steps, x, y)
    voxels = args.batch * int(np.prod(args.patch))
    header = (
        "scheme", "params", "median s/step", "patches/s", "Mvox/s", "best Mvox/s", "warmup s",
        "x first",
    )  # fmt: skip
    width = max(10, *(len(r["scheme"]) + 2 for r in runs))
    print("".join(f"{h:<{width}}" if i == 0 else f"{h:>14}" for i, h in enumerate(header)))
    first = float(np.median(runs[0]["rounds"]))
    for run in runs:
        median, best = float(np.median(run["rounds"])), min(run["rounds"])
        print(
            f"{run['scheme']:<{width}}{run['unique_params']:>14,}{median:>14.3f}"
            f"{args.batch / median:>14.2f}{voxels / median / 1e6:>14.3f}"
            f"{voxels / best / 1e6:>14.3f}{run['warmup_s']:>14.1f}{first / median:>14.2f}"
        )


if __name__ == "__main__":
    main()
