"""build_unet: shapes, names, closed-form parameter counts, validation, the Hydra configs."""

import keras
import numpy as np
import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from segshare.models import (
    SHARING_SCHEMES,
    SharedEncoder,
    build_unet,
    count_unique_params,
    parameter_report,
)
from segshare.models.unet import check_patch_size

ANISO_3D = dict(kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3]], strides=[1, [1, 2, 2], [2, 2, 2]])
# 2D, non-default strides; kernels that make the global bank (5, 3) and use two kinds of slice.
ANISO_2D = dict(spatial_dims=2, kernel_sizes=[3, [1, 3], [5, 3]], strides=[1, [2, 1], 2])
GEOMETRIES = {"default": {}, "aniso3d": ANISO_3D, "strides2d": ANISO_2D}


def _per_axis(values, default, n, dims):
    values = [default] * n if values is None else values
    return [(v,) * dims if isinstance(v, int) else tuple(v) for v in values]


def _closed_form(
    scheme,
    c_in,
    f,
    blocks,
    classes,
    dec_blocks,
    templates,
    spatial_dims=3,
    per_block=2,
    kernel_sizes=None,
    strides=None,
):
    """Unique trainable parameters of build_unet, written out (bias on, instance norm);
    ``per_block`` convs per block (2 residual, 1 plain); per-stage kernels and strides."""
    n, dims = len(f), spatial_dims
    ks = _per_axis(kernel_sizes, 3, n, dims)
    st = _per_axis(strides, 2, n, dims)
    k = [int(np.prod(ks[s])) for s in range(n)]
    norm = lambda c: 2 * c  # noqa: E731  gamma + beta
    conv = lambda a, b, s: k[s] * a * b  # noqa: E731  kernel only, stage s's kernel size
    total = 0
    # Encoder: per-conv bias and norm always; kernels by scheme.
    stem = conv(c_in, f[0], 0)
    entries = [conv(f[s - 1], f[s], s) for s in range(1, n)]
    block_convs = [per_block * blocks[s] for s in range(n)]
    total += sum(f[s] + norm(f[s]) for s in range(n))  # entry convs' bias + norm
    total += sum(block_convs[s] * (f[s] + norm(f[s])) for s in range(n))
    if scheme == "none":
        total += stem + sum(entries) + sum(block_convs[s] * conv(f[s], f[s], s) for s in range(n))
    elif scheme == "stage":
        total += stem + sum(entries) + sum(conv(f[s], f[s], s) for s in range(n) if blocks[s])
    elif scheme == "global":  # one bank: widest width, per-axis largest kernel (all stages use it)
        total += stem + int(np.prod(np.max(ks, axis=0))) * max(f) ** 2
    elif scheme == "template":
        total += stem + sum(entries)
        total += sum(
            templates * conv(f[s], f[s], s) + block_convs[s] * templates
            for s in range(n)
            if blocks[s]
        )
    # Decoder: transposed conv (kernel = stride of the stage below, + bias), then dec_blocks
    # conv+bias+norm units with the stage's kernel size.
    for s in range(n - 2, -1, -1):
        total += int(np.prod(st[s + 1])) * f[s + 1] * f[s] + f[s]
        total += conv(2 * f[s], f[s], s) + f[s] + norm(f[s])
        total += (dec_blocks - 1) * (conv(f[s], f[s], s) + f[s] + norm(f[s]))
    total += f[0] * classes + classes  # 1x1 head
    return total


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("block", ["residual", "plain"])
@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
def test_unique_params_match_closed_form_and_weights_are_listed_once(scheme, block, geometry):
    f, blocks = (4, 8, 16), (1, 2, 2)
    geo = GEOMETRIES[geometry]
    model = build_unet(
        in_channels=2,
        num_classes=3,
        features=f,
        blocks_per_stage=blocks,
        block=block,
        sharing=scheme,
        num_templates=2,
        decoder_blocks=2,
        **geo,
    )
    per_block = 2 if block == "residual" else 1
    expected = _closed_form(scheme, 2, f, blocks, 3, 2, 2, per_block=per_block, **geo)
    assert model.count_params() == expected
    assert count_unique_params(model) == expected
    ids = [id(v) for v in model.weights]
    assert len(ids) == len(set(ids))
    paths = [v.path for v in model.weights]
    assert len(paths) == len(set(paths))


def test_plain_block_default_is_two_convs_per_stage():
    model = build_unet(features=(4, 8, 16), block="plain", num_classes=3)
    assert model.get_layer("encoder").blocks_per_stage == (1, 1, 1)
    assert count_unique_params(model) == _closed_form(
        "none", 1, (4, 8, 16), (1, 1, 1), 3, 2, 2, per_block=1
    )


# README's table: build_unet() with each scheme (the default network must not change).
README_UNIQUE = {"none": 12_709_394, "stage": 5_652_242, "global": 3_889_682, "template": 8_009_270}


def test_default_model_every_scheme_saves_parameters_and_matches_readme():
    counts = {s: parameter_report(build_unet(sharing=s)) for s in SHARING_SCHEMES}
    assert {s: r["unique_trainable"] for s, r in counts.items()} == README_UNIQUE
    base = counts["none"]["unique_trainable"]
    assert counts["none"]["saved"] == 0
    for scheme in ("stage", "global", "template"):
        report = counts[scheme]
        assert report["unique_trainable"] < base
        assert report["baseline_unique_trainable"] == base
        assert report["saved"] == base - report["unique_trainable"]


def test_anisotropic_parameter_report_counts_against_the_same_geometry():
    reports = {
        s: parameter_report(build_unet(features=(4, 8, 16), sharing=s, **ANISO_3D))
        for s in SHARING_SCHEMES
    }
    base = reports["none"]["unique_trainable"]
    assert base == _closed_form("none", 1, (4, 8, 16), (1, 2, 2), 2, 2, 2, **ANISO_3D)
    for report in reports.values():
        assert report["baseline_unique_trainable"] == base
        assert report["saved"] == base - report["unique_trainable"]


DEFAULT_KERNELS = {  # encoder kernel variables of build_unet(features=(4, 8), blocks=(1, 1))
    "none": [
        ("encoder_stage0_conv1_kernel/kernel", (3, 3, 3, 1, 4)),
        ("encoder_stage0_conv2_kernel/kernel", (3, 3, 3, 4, 4)),
        ("encoder_stage0_conv3_kernel/kernel", (3, 3, 3, 4, 4)),
        ("encoder_stage1_conv1_kernel/kernel", (3, 3, 3, 4, 8)),
        ("encoder_stage1_conv2_kernel/kernel", (3, 3, 3, 8, 8)),
        ("encoder_stage1_conv3_kernel/kernel", (3, 3, 3, 8, 8)),
    ],
    "stage": [
        ("encoder_stage0_conv1_kernel/kernel", (3, 3, 3, 1, 4)),
        ("encoder_stage0_bank/kernel", (3, 3, 3, 4, 4)),
        ("encoder_stage1_conv1_kernel/kernel", (3, 3, 3, 4, 8)),
        ("encoder_stage1_bank/kernel", (3, 3, 3, 8, 8)),
    ],
    "global": [
        ("encoder_global_bank/kernel", (3, 3, 3, 8, 8)),
        ("encoder_stage0_conv1_kernel/kernel", (3, 3, 3, 1, 4)),
    ],
    "template": [
        ("encoder_stage0_conv1_kernel/kernel", (3, 3, 3, 1, 4)),
        ("encoder_stage0_bank/templates", (2, 3, 3, 3, 4, 4)),
        ("encoder_stage1_conv1_kernel/kernel", (3, 3, 3, 4, 8)),
        ("encoder_stage1_bank/templates", (2, 3, 3, 3, 8, 8)),
    ],
}
DEFAULT_LAYERS = ["image", "encoder", "decoder_stage0_upconv", "decoder_stage0_concat"] + [
    f"decoder_stage0_conv{j}{part}" for j in (1, 2) for part in ("", "_norm", "_act")
]


@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
def test_default_geometry_keeps_names_weights_and_outputs(scheme):
    """kernel_sizes/strides None is today's network: same names, weights and (same seed)
    outputs as writing 3 and [1, 2] out; an old encoder config (kernel_size, no kernel_sizes or
    strides) still builds it."""
    models = []
    for geometry in ({}, {"kernel_sizes": [3, [3, 3, 3]], "strides": [[1, 1, 1], 2]}):
        keras.utils.set_random_seed(5)
        models.append(
            build_unet(features=(4, 8), blocks_per_stage=(1, 1), sharing=scheme, **geometry)
        )
    default, explicit = models
    assert [layer.name for layer in default.layers] == DEFAULT_LAYERS + ["head"]
    enc = default.get_layer("encoder")
    kernels = [
        (v.path, tuple(v.shape)) for v in enc.weights if v.path.endswith(("kernel", "templates"))
    ]
    assert kernels == DEFAULT_KERNELS[scheme]
    assert tuple(default.get_layer("decoder_stage0_upconv").kernel.shape) == (2, 2, 2, 4, 8)
    assert tuple(default.get_layer("decoder_stage0_conv1").kernel.shape) == (3, 3, 3, 8, 4)
    describe = lambda m: [(v.path, tuple(v.shape)) for v in m.weights]  # noqa: E731
    assert describe(explicit) == describe(default)
    x = np.random.default_rng(0).normal(size=(1, 6, 4, 8, 1)).astype("float32")
    np.testing.assert_array_equal(np.asarray(explicit(x)), np.asarray(default(x)))
    config = enc.get_config()
    assert config["kernel_sizes"] == [[3, 3, 3]] * 2 and config["strides"] == [[1] * 3, [2] * 3]
    old = {k: v for k, v in config.items() if k not in ("kernel_sizes", "strides")}
    rebuilt = SharedEncoder.from_config({**old, "kernel_size": 3})
    rebuilt.build((None, 6, 4, 8, 1))
    assert [tuple(v.shape) for v in rebuilt.weights] == [tuple(v.shape) for v in enc.weights]
    rebuilt.set_weights(enc.get_weights())
    for a, b in zip(rebuilt(x), enc(x), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dims", [2, 3])
def test_forward_shapes_names_and_deep_supervision(dims):
    model = build_unet(
        spatial_dims=dims,
        in_channels=2,
        num_classes=4,
        features=(4, 8, 16),
        blocks_per_stage=(1, 1, 1),
        sharing="global",
        deep_supervision=True,
    )
    x = np.random.default_rng(0).normal(size=(2,) + (16,) * (dims - 1) + (24, 2)).astype("float32")
    outputs = model(x)
    assert [tuple(o.shape) for o in outputs] == [
        (2,) + (16 // 2**i,) * (dims - 1) + (24 // 2**i, 4)
        for i in range(2)  # one output per decoder level
    ]
    names = [layer.name for layer in model.layers]
    assert "encoder" in names and "decoder_stage1_concat" in names and "head_ds1" in names
    encoder = model.get_layer("encoder")
    conv_names = [u.conv.name for u in encoder.stages[1][:1]]
    assert conv_names == ["encoder_stage1_conv1"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sharing": "tied"}, "sharing must be one of .* got 'tied'"),
        ({"block": "dense"}, "block must be one of .* got 'dense'"),
        ({"sharing": "template", "num_templates": 0}, "num_templates must be >= 1, got 0"),
        ({"features": (8, 16, 32), "blocks_per_stage": (1, 2)}, "same length, got 3 .* and 2"),
        (
            {"features": (8, 16, 32), "patch_size": (32, 30, 32)},
            r"\(32, 30, 32\) must be divisible .* strides, \(4, 4, 4\)",
        ),
        (
            {"features": (4, 8, 16), "patch_size": (8, 30, 24), **ANISO_3D},
            r"\(8, 30, 24\) must be divisible .* strides, \(2, 4, 4\), .* \[1, 2, 2\], \[2",
        ),
        ({"features": (4, 8, 16), "kernel_sizes": [3, 3]}, r"one entry per stage \(3, .*\[3, 3\]"),
        ({"features": (4, 8), "strides": [1, 2, 2]}, r"one entry per stage \(2, .*\[1, 2, 2\]"),
        (
            {"features": (4, 8), "kernel_sizes": [3, [1, 2, 3]]},
            r"odd .* got \[1, 2, 3\] at stage 1",
        ),
        ({"features": (4, 8), "kernel_sizes": [0, 3]}, r"positive integers, got 0 in \[0, 3\]"),
        ({"features": (4, 8), "strides": [1, [2, 0, 2]]}, r"positive integers, got \[2, 0, 2\]"),
        (
            {"features": (4, 8), "strides": [1, [2, 2]]},
            r"strides\[1\] must .* 3 entries .* \[2, 2\]",
        ),
        (
            {"spatial_dims": 2, "features": (4, 8), "kernel_sizes": [3, [1, 3, 3]]},
            r"kernel_sizes\[1\] must be an int or have 2 entries .* got \[1, 3, 3\]",
        ),
        ({"features": (4, 8), "strides": [2, 2]}, r"strides\[0\] must be 1 .* got \[2, 2, 2\]"),
        ({"spatial_dims": 4}, "spatial_dims must be 2 or 3, got 4"),
        ({"num_classes": 0}, "num_classes must be >= 1, got 0"),
    ],
)
def test_bad_configuration_is_refused_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_unet(**kwargs)


def test_check_patch_size_accepts_divisible_sizes():
    check_patch_size((48, 64, 48), 5, 3)
    with pytest.raises(ValueError, match="must have 3 entries"):
        check_patch_size((48, 64), 5, 3)


def test_check_patch_size_multiplies_each_axis_strides():
    strides = [1, [1, 2, 2], [1, 2, 2], [2, 2, 2]]  # per-axis factors (2, 8, 8)
    check_patch_size((6, 40, 56), 4, 3, strides)
    check_patch_size((6, 40), 4, 2, [1, [1, 2], [3, 2], 2])  # factors (6, 8)
    with pytest.raises(ValueError, match=r"\(6, 40, 52\) must be .* strides, \(2, 8, 8\)"):
        check_patch_size((6, 40, 52), 4, 3, strides)
    with pytest.raises(ValueError, match=r"\(3, 40, 56\) must be .* strides, \(2, 8, 8\)"):
        check_patch_size((3, 40, 56), 4, 3, strides)
    with pytest.raises(ValueError, match="strides must have one entry per stage"):
        check_patch_size((8, 8, 8), 3, 3, [1, 2])


@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
def test_anisotropic_forward_shapes_follow_the_strides(scheme):
    model = build_unet(
        in_channels=2,
        num_classes=3,
        features=(4, 8, 16),
        sharing=scheme,
        deep_supervision=True,
        patch_size=(8, 32, 24),
        **ANISO_3D,
    )
    x = np.random.default_rng(0).normal(size=(2, 8, 32, 24, 2)).astype("float32")
    shapes = [tuple(o.shape) for o in model(x)]
    assert shapes == [(2, 8, 32, 24, 3), (2, 8, 16, 12, 3)]  # one per decoder level
    assert [tuple(s) for s in model.output_shape] == [(None, *s[1:]) for s in shapes]
    encoder = model.get_layer("encoder")
    skips = [tuple(s.shape) for s in encoder(x)]
    assert skips == [(2, 8, 32, 24, 4), (2, 8, 16, 12, 8), (2, 4, 8, 6, 16)]
    assert tuple(model.get_layer("decoder_stage1_upconv").kernel.shape) == (2, 2, 2, 8, 16)
    assert tuple(model.get_layer("decoder_stage0_upconv").kernel.shape) == (1, 2, 2, 4, 8)
    assert tuple(model.get_layer("decoder_stage0_conv1").kernel.shape) == (1, 3, 3, 8, 4)
    convs = [u.conv for u in encoder.stages[1][:1]] + [encoder.stages[2][0].conv]
    assert [(c.kernel_size, c.strides) for c in convs] == [
        ((1, 3, 3), (1, 2, 2)),
        ((3, 3, 3), (2, 2, 2)),
    ]
    assert all(tuple(c.kernel().shape[:3]) == c.kernel_size for c in convs)


def test_two_dimensional_strides_and_global_bank_shape():
    model = build_unet(features=(4, 8, 16), sharing="global", num_classes=2, **ANISO_2D)
    bank = model.get_layer("encoder").banks[0]
    assert bank.name == "encoder_global_bank" and bank.kernel_size == (5, 3)
    x = np.zeros((1, 12, 10, 1), "float32")  # factors (4, 2)
    assert tuple(model(x).shape) == (1, 12, 10, 2)


@pytest.mark.parametrize("model_name", ["unet", "unet_small", "unet_plain"])
@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
def test_hydra_model_and_sharing_configs_build(model_name, scheme):
    with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
        overrides = [f"model={model_name}", f"sharing={scheme}", "model.features=[4,8,16,32]"]
        cfg = compose(config_name="train", overrides=overrides)  # features null = planned
    assert cfg.model.sharing == scheme  # conf/sharing/ merges into the model group
    model = instantiate(cfg.model, in_channels=1, num_classes=3)
    assert parameter_report(model)["sharing"] == scheme
    assert model.output_shape == (None, None, None, None, 3)


def test_kernel_sizes_and_strides_accept_numpy_and_omegaconf_values():
    from omegaconf import OmegaConf

    plain = build_unet(features=(4, 8, 16), sharing="global", **ANISO_3D)
    as_numpy = dict(
        kernel_sizes=np.array(ANISO_3D["kernel_sizes"]),
        strides=[np.int64(1), np.array([1, 2, 2]), np.int64(2)],
    )
    for geometry in (as_numpy, OmegaConf.create(ANISO_3D)):
        model = build_unet(features=(4, 8, 16), sharing="global", **geometry)
        config = model.get_layer("encoder").get_config()
        assert config == plain.get_layer("encoder").get_config()
        assert all(type(k) is int for stage in config["kernel_sizes"] for k in stage)
