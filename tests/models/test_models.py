"""Registry, parameter counts and output shapes of spacedkd_fast.models.

Parameter counts are computed here from the layer shapes (arithmetic that does not read the
models), or taken from an independent implementation (torchvision), or from published numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from spacedkd_fast.models import create, list_models, load_checkpoint


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- arithmetic from layer shapes
def conv(cin: int, cout: int, k: int, bias: bool = False) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def bn(c: int) -> int:
    return 2 * c


def linear(cin: int, cout: int) -> int:
    return cin * cout + cout


RESNET_BLOCKS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                 50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
                 152: ("bottleneck", (3, 8, 36, 3))}  # fmt: skip


def resnet_trunk_params(depth: int, widths=(64, 128, 256, 512)) -> tuple[int, list[int]]:
    """(trunk parameters, channels leaving each stage) of a CIFAR ResNet."""
    kind, counts = RESNET_BLOCKS[depth]
    total = conv(3, widths[0], 3) + bn(widths[0])
    cin, outs = widths[0], []
    for stage, (planes, count) in enumerate(zip(widths, counts)):
        for i in range(count):
            stride = 2 if (stage > 0 and i == 0) else 1
            if kind == "basic":
                cout = planes
                total += conv(cin, planes, 3) + bn(planes) + conv(planes, planes, 3) + bn(planes)
            else:
                cout = 4 * planes
                total += conv(cin, planes, 1) + bn(planes) + conv(planes, planes, 3) + bn(planes)
                total += conv(planes, cout, 1) + bn(cout)
            if stride != 1 or cin != cout:
                total += conv(cin, cout, 1) + bn(cout)
            cin = cout
        outs.append(cin)
    return total, outs


def sepconv_params(cin: int, cout: int) -> int:
    return 9 * cin + cin * cin + bn(cin) + 9 * cin + cin * cout + bn(cout)


def byot_params(depth: int, num_classes: int) -> int:
    trunk, outs = resnet_trunk_params(depth)
    d = outs[3]
    total = trunk + 4 * linear(d, num_classes) + 3 * linear(d, d)
    for c in outs[:3]:
        total += sepconv_params(c, c) + bn(c)  # attention mask
        while c < d:  # SepConv stack doubling to 512e
            total += sepconv_params(c, 2 * c)
            c *= 2
    return total


def wrn_params(depth: int, k: int, num_classes: int) -> int:
    n = (depth - 4) // 6
    total, cin = conv(3, 16, 3), 16
    for g, cout in enumerate((16 * k, 32 * k, 64 * k)):
        for i in range(n):
            c_in = cin if i == 0 else cout
            total += bn(c_in) + conv(c_in, cout, 3) + bn(cout) + conv(cout, cout, 3)
            if c_in != cout or (g > 0 and i == 0):
                total += conv(c_in, cout, 1)
        cin = cout
    return total + bn(cin) + linear(cin, num_classes)


def deit_params(
    image_size: int, patch: int, num_classes: int, distilled: bool, d: int = 192
) -> int:
    tokens = (image_size // patch) ** 2 + (2 if distilled else 1)
    block = 2 * bn(d) + linear(d, 3 * d) + linear(d, d) + linear(d, 4 * d) + linear(4 * d, d)
    embed = conv(3, d, patch, bias=True) + tokens * d + (2 if distilled else 1) * d
    return embed + 12 * block + bn(d) + (2 if distilled else 1) * linear(d, num_classes)


# ---------------------------------------------------------------------------- registry & errors
def test_list_models_has_the_papers_architectures():
    names = list_models()
    assert names == sorted(names)
    for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "byot_resnet18",
                 "byot_resnet50", "mobilenetv2", "shufflenetv2", "vgg11", "vgg13", "vgg16", "vgg19",
                 "wrn_28_10", "wrn_40_2", "deit_tiny", "deit_tiny_distilled", "pit_tiny",
                 "pvt_v2_b0", "convit_tiny", "pvt_tiny", "t2t_vit_7", "t2t_vit_14", "cvt_13",
                 "resnet56"):  # fmt: skip
        assert name in names


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet19'") as info:
        create("resnet19", 10)
    for name in list_models():
        assert name in str(info.value)


@pytest.mark.parametrize(
    "name, size, pattern",
    [
        ("vgg11", 16, "at least 32"),
        ("byot_resnet18", 36, "multiple of 8"),
        ("byot_resnet18", 4, "at least 8"),
        ("resnet18", 4, "at least 8"),
        ("pvt_v2_b0", 24, "at least 32"),
        ("deit_tiny", 30, "divisible by the patch size 4"),
        ("convit_tiny", 100, "divisible by the patch size 8"),
        ("pit_tiny", 3, "smaller than its patch"),
        ("resnet18", 0, "positive int"),
        ("resnet18", 32.0, "positive int"),
    ],
)
def test_image_size_a_model_cannot_take_is_a_clear_error(name, size, pattern):
    with pytest.raises(ValueError, match=pattern):
        create(name, 10, image_size=size)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="num_classes"):
        create("resnet18", 0)
    with pytest.raises(ValueError, match="never"):
        create("resnet18", 10, pretrained=True)
    with pytest.raises(ValueError, match="never"):
        create("deit_tiny", 10, pretrained=True)
    with pytest.raises(ValueError, match="downsample_factor"):
        create("resnet18", 10, downsample_factor=0.5)
    with pytest.raises(TypeError):
        create("resnet18", 10, no_such_option=1)


def test_input_of_another_size_than_built_for_is_a_clear_error():
    model = create("deit_tiny", 10, image_size=32).eval()
    with pytest.raises(ValueError, match="built for 32x32"):
        model(torch.randn(1, 3, 64, 64))
    byot = create("byot_resnet18", 10, image_size=32, downsample_factor=16).eval()
    with pytest.raises(ValueError, match="multiples of 8"):
        byot(torch.randn(1, 3, 36, 36))


# ---------------------------------------------------------------------------- parameter counts
def test_cifar_resnet18_100_classes_has_the_known_count():
    # 11,220,132: the usual CIFAR ResNet-18 (11,173,962 at 10 classes + 90 * 513 more in fc).
    expected = resnet_trunk_params(18)[0] + linear(512, 100)
    assert expected == 11_220_132
    assert n_params(create("resnet18", 100)) == expected


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_cifar_resnet_counts(depth):
    trunk, outs = resnet_trunk_params(depth)
    model = create(f"resnet{depth}", 100)
    assert model.feature_dim == outs[3] == (512 if depth < 50 else 2048)
    assert n_params(model) == trunk + linear(outs[3], 100)


def test_resnet50_matches_the_published_cifar100_count():
    assert n_params(create("resnet50", 100)) == 23_705_252


@pytest.mark.parametrize("factor", [2, 4, 8.0])
def test_downsample_factor_divides_channels_by_its_square_root(factor):
    widths = tuple(int(c / math.sqrt(factor)) for c in (64, 128, 256, 512))
    trunk, outs = resnet_trunk_params(18, widths)
    model = create("resnet18", 100, downsample_factor=factor)
    assert model.feature_dim == widths[3]
    assert n_params(model) == trunk + linear(widths[3], 100)
    assert model.conv1.out_channels == widths[0]


@pytest.mark.parametrize("depth", [18, 50])
def test_byot_counts(depth):
    model = create(f"byot_resnet{depth}", 100)
    assert n_params(model) == byot_params(depth, 100)


@pytest.mark.parametrize("depth, k", [(16, 4), (28, 10), (40, 2)])
def test_wrn_counts(depth, k):
    model = create(f"wrn_{depth}_{k}", 100)
    assert model.feature_dim == 64 * k
    assert n_params(model) == wrn_params(depth, k, 100)


def test_mobilenetv2_and_shufflenetv2_match_torchvision_counts():
    # The 32x32 adaptation changes strides only, so the counts equal torchvision's networks.
    assert n_params(create("mobilenetv2", 100)) == n_params(
        torchvision.models.mobilenet_v2(num_classes=100)
    )
    assert n_params(create("shufflenetv2", 100)) == n_params(
        torchvision.models.shufflenet_v2_x1_0(num_classes=100)
    )


@pytest.mark.parametrize("depth, cfg", [(11, "A"), (13, "B"), (16, "D"), (19, "E")])
def test_vgg_features_are_torchvisions_vgg_bn_layers(depth, cfg):
    from torchvision.models.vgg import cfgs, make_layers

    reference = make_layers(cfgs[cfg], batch_norm=True)
    model = create(f"vgg{depth}", 100)
    model.features.load_state_dict(reference.state_dict(), strict=True)
    assert n_params(model) == n_params(reference) + linear(512, 100)


@pytest.mark.parametrize("size, patch", [(32, 4), (64, 8), (224, 16)])
@pytest.mark.parametrize("distilled", [False, True])
def test_deit_tiny_counts(size, patch, distilled):
    name = "deit_tiny_distilled" if distilled else "deit_tiny"
    model = create(name, 100, image_size=size)
    assert model.body.patch_embed.proj.kernel_size == (patch, patch)
    assert n_params(model) == deit_params(size, patch, 100, distilled)


@pytest.mark.parametrize(
    "name, millions, tolerance",
    # The papers' ImageNet (1000 classes, 224 px) sizes, as printed (rounded to 0.1M or 1M):
    # DeiT-Ti 5.7M, PiT-Ti 4.9M, PVTv2-b0 3.7M, ConViT-Ti 6M.
    [
        ("deit_tiny", 5.7, 0.06),
        ("pit_tiny", 4.9, 0.06),
        ("pvt_v2_b0", 3.7, 0.06),
        ("convit_tiny", 6, 0.5),
    ],  # fmt: skip
)
def test_transformers_match_published_sizes(name, millions, tolerance):
    assert abs(n_params(create(name, 1000, image_size=224)) / 1e6 - millions) <= tolerance


# ------------------------------------------------------------------------------ output shapes
def _check_outputs(model, x, num_classes, exits=None):
    features, logits = model(x)
    b = x.shape[0]
    if exits is None:
        assert features.shape == (b, model.feature_dim)
        assert logits.shape == (b, num_classes)
        assert torch.isfinite(logits).all()
    else:
        assert len(features) == len(logits) == exits == model.num_exits
        for f, z in zip(features, logits):
            assert f.shape == (b, model.feature_dim)
            assert z.shape == (b, num_classes)
            assert torch.isfinite(z).all()


CNN_SIZES = {
    name: [32] for name in list_models() if not name.startswith(("deit", "pit", "pvt", "convit"))
}
for _name in ("resnet18", "byot_resnet18", "mobilenetv2", "shufflenetv2", "vgg11", "wrn_16_2"):
    CNN_SIZES[_name] = [32, 64]
CASES = [(name, size) for name, sizes in CNN_SIZES.items() for size in sizes]
CASES += [(name, size) for name in ("deit_tiny", "deit_tiny_distilled", "pit_tiny",
          "pit_tiny_distilled", "pvt_v2_b0", "convit_tiny") for size in (32, 64, 224)]  # fmt: skip


# The deepest ResNets run their shape check at a quarter of the width (same layers, 16x fewer
# FLOPs) to keep the suite fast on 2 cores; their full-width builds are checked by the counts above.
NARROW = {"resnet101", "resnet152", "byot_resnet101", "byot_resnet152"}


@pytest.mark.parametrize("name, size", CASES)
def test_output_shapes(name, size):
    kw = {"downsample_factor": 16} if name in NARROW else {}
    model = create(name, 7, image_size=size, **kw).eval()
    assert model.image_size == size
    with torch.no_grad():
        _check_outputs(
            model, torch.randn(1, 3, size, size), 7, 4 if name.startswith("byot") else None
        )


# ---------------------------------------------------- forward and backward match independent nets
def _torchvision_cifar_resnet(depth: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet with the CIFAR stem (3x3 stride-1 conv, no max-pool)."""
    net = getattr(torchvision.models, f"resnet{depth}")(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


@pytest.mark.parametrize("depth", [18, 50])
def test_cifar_resnet_computes_what_torchvision_resnet_with_cifar_stem_computes(depth):
    ours = create(f"resnet{depth}", 10).double().eval()
    reference = _torchvision_cifar_resnet(depth, 10).double().eval()
    state = {k.replace(".shortcut.", ".downsample."): v for k, v in ours.state_dict().items()}
    reference.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    features, logits = ours(x)
    torch.testing.assert_close(logits, reference(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(features @ ours.fc.weight.T + ours.fc.bias, logits)


TRAIN_CASES = ["resnet18", "byot_resnet18", "mobilenetv2", "shufflenetv2", "vgg11", "wrn_16_2",
               "deit_tiny", "deit_tiny_distilled", "pit_tiny", "pvt_v2_b0", "convit_tiny",
               "pvt_tiny", "t2t_vit_7", "cvt_13", "resnet56"]  # fmt: skip


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_forward_backward_reaches_every_parameter(name):
    narrow = "resnet" in name and name != "resnet56"
    model = create(name, 5, image_size=32, **({"downsample_factor": 4} if narrow else {}))
    model.train()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 4])
    features, logits = model(x)
    if name.startswith("byot"):
        # every exit's CE plus a feature term through the adapters, as the self distiller uses it
        loss = sum(nn.functional.cross_entropy(z, y) for z in logits)
        loss = loss + sum(
            (a(f) - features[-1].detach()).norm() for a, f in zip(model.adapters, features)
        )
    elif getattr(model, "distilled", False):  # CE on the class head, a KD-like term on the other
        loss = nn.functional.cross_entropy(logits, y) + model.distill_logits.logsumexp(1).mean()
    else:
        loss = nn.functional.cross_entropy(logits, y) + features.square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing[:5]}"
    for n, p in model.named_parameters():
        assert torch.isfinite(p.grad).all() if p.requires_grad else p.grad is None, n


# ------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_with_ddp_prefix_and_wrapper_key(tmp_path):
    source = create("resnet18", 10, downsample_factor=16).eval()
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path
    )
    loaded = create("resnet18", 10, downsample_factor=16, checkpoint=path).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x)[1], source(x)[1], rtol=0, atol=0)


def test_checkpoint_of_a_plain_timm_model_loads_into_the_wrapper(tmp_path):
    import timm

    body = timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4
    )
    path = tmp_path / "deit.pth"
    torch.save(body.state_dict(), path)
    model = create("deit_tiny", 10, image_size=32, checkpoint=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x)[1], body.eval()(x), rtol=0, atol=0)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        create("resnet18", 10, checkpoint=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="URL"):
        create("resnet18", 10, checkpoint="https://example.org/w.pt")
    path = tmp_path / "r34.pt"
    torch.save(create("resnet34", 10, downsample_factor=16).state_dict(), path)
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(create("resnet18", 10, downsample_factor=16), path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        create("resnet34", 100, downsample_factor=16, checkpoint=path)
