"""build_unet: shapes, names, closed-form parameter counts, validation, the Hydra configs."""

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from segshare.models import SHARING_SCHEMES, build_unet, count_unique_params, parameter_report
from segshare.models.unet import check_patch_size

K = 3  # kernel size


def _closed_form(scheme, c_in, f, blocks, classes, dec_blocks, templates, dims=3, per_block=2):
    """Unique trainable parameters of build_unet, written out (bias on, instance norm);
    ``per_block`` convs per block (2 residual, 1 plain)."""
    k = K**dims
    norm = lambda c: 2 * c  # noqa: E731  gamma + beta
    conv = lambda a, b: k * a * b  # noqa: E731  kernel only
    n = len(f)
    total = 0
    # Encoder: per-conv bias and norm always; kernels by scheme.
    stem = conv(c_in, f[0])
    entries = [conv(f[s - 1], f[s]) for s in range(1, n)]
    block_convs = [per_block * blocks[s] for s in range(n)]
    total += sum(f[s] + norm(f[s]) for s in range(n))  # entry convs' bias + norm
    total += sum(block_convs[s] * (f[s] + norm(f[s])) for s in range(n))
    if scheme == "none":
        total += stem + sum(entries) + sum(block_convs[s] * conv(f[s], f[s]) for s in range(n))
    elif scheme == "stage":
        total += stem + sum(entries) + sum(conv(f[s], f[s]) for s in range(n) if blocks[s])
    elif scheme == "global":
        total += stem + conv(max(f), max(f))
    elif scheme == "template":
        total += stem + sum(entries)
        total += sum(
            templates * conv(f[s], f[s]) + block_convs[s] * templates for s in range(n) if blocks[s]
        )
    # Decoder: transposed conv (2^dims kernel + bias), then dec_blocks conv+bias+norm units.
    for s in range(n - 2, -1, -1):
        total += 2**dims * f[s + 1] * f[s] + f[s]
        total += conv(2 * f[s], f[s]) + f[s] + norm(f[s])
        total += (dec_blocks - 1) * (conv(f[s], f[s]) + f[s] + norm(f[s]))
    total += f[0] * classes + classes  # 1x1 head
    return total


@pytest.mark.parametrize("block", ["residual", "plain"])
@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
def test_unique_params_match_closed_form_and_weights_are_listed_once(scheme, block):
    f, blocks = (4, 8, 16), (1, 2, 2)
    model = build_unet(
        in_channels=2,
        num_classes=3,
        features=f,
        blocks_per_stage=blocks,
        block=block,
        sharing=scheme,
        num_templates=2,
        decoder_blocks=2,
    )
    per_block = 2 if block == "residual" else 1
    expected = _closed_form(scheme, 2, f, blocks, 3, 2, 2, per_block=per_block)
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


def test_default_model_every_scheme_saves_parameters():
    counts = {s: parameter_report(build_unet(sharing=s)) for s in SHARING_SCHEMES}
    base = counts["none"]["unique_trainable"]
    assert counts["none"]["saved"] == 0
    for scheme in ("stage", "global", "template"):
        report = counts[scheme]
        assert report["unique_trainable"] < base
        assert report["baseline_unique_trainable"] == base
        assert report["saved"] == base - report["unique_trainable"]


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
            r"\(32, 30, 32\) must be divisible by 2\*\*\(stages-1\) = 4",
        ),
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


@pytest.mark.parametrize("model_name", ["unet", "unet_small", "unet_plain"])
@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
def test_hydra_model_and_sharing_configs_build(model_name, scheme):
    with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
        cfg = compose(config_name="train", overrides=[f"model={model_name}", f"sharing={scheme}"])
    assert cfg.model.sharing == scheme  # conf/sharing/ merges into the model group
    model = instantiate(cfg.model, in_channels=1, num_classes=3)
    assert parameter_report(model)["sharing"] == scheme
    assert model.output_shape == (None, None, None, None, 3)
