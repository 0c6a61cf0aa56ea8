"""The official ViT-code architectures: parameter counts, tensor shapes, init, drop path, deltas.

Every expected number here is computed from OFFICIAL_VIT_FACTS.md (table A, sections 2 and 3): the
per-layer formulas are written out below without reading the models, and the state-dict tables are
copied from the facts. Counts, shapes and the forward at the official size use ``meta`` tensors
(no memory, no init, no arithmetic); init statistics and numerical checks build real models at
32 px (the same tensors apart from position embeddings), once per module.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from spacedkd_fast.models.block_features import BlockFeatures
from spacedkd_fast.models.registry import create, describe_models, official_params

NEW = ["pvt_tiny", "t2t_vit_7", "t2t_vit_14", "cvt_13", "resnet56"]
TIMM = ["deit_tiny", "deit_tiny_distilled", "pit_tiny", "pvt_v2_b0", "convit_tiny"]
SIZE = {"resnet56": 32}  # the official image size; 224 for every transformer


def size_of(name: str) -> int:
    return SIZE.get(name, 224)


def linear(cin: int, cout: int, bias: bool = True) -> int:
    return cin * cout + (cout if bias else 0)


def conv(cin: int, cout: int, k: int, bias: bool = True, groups: int = 1) -> int:
    return cout * (cin // groups) * k * k + (cout if bias else 0)


def ln(c: int) -> int:
    return 2 * c


# ------------------------------------------------------------- counts from the facts' formulas
def pvt_tiny_params(classes: int) -> int:
    dims, mlp, sr, patch = (64, 128, 320, 512), (8, 8, 4, 4), (8, 4, 2, 1), (4, 2, 2, 2)
    tokens = (56 * 56, 28 * 28, 14 * 14, 7 * 7 + 1)
    total, cin = 0, 3
    for c, r, s, p, n in zip(dims, mlp, sr, patch, tokens):
        total += conv(cin, c, p) + ln(c) + n * c  # patch embed, its LN, pos embed
        block = 4 * c + (c * c + c) + (2 * c * c + 2 * c) + (c * c + c)  # norms, q, kv, proj
        block += (c * c * s * s + c + 2 * c) if s > 1 else 0  # sr conv + sr LN
        block += (r * c * c + r * c) + (r * c * c + c)  # fc1, fc2
        total += 2 * block
        cin = c
    return total + 512 + ln(512) + linear(512, classes)  # cls token, norm, head


def performer_params(d_in: int) -> int:
    return ln(d_in) + 32 * 64 + linear(d_in, 192) + linear(64, 64) + ln(64) + 2 * linear(64, 64)


def t2t_params(d: int, depth: int, r: int, classes: int) -> tuple[int, int]:
    layer = 4 * d + 3 * d * d + (d * d + d) + (r * d * d + r * d) + (r * d * d + d)
    frozen = 197 * d + 2 * 32 * 64  # sinusoid + the two Performer projections
    total = performer_params(147) + performer_params(576) + linear(576, d) + d + 197 * d
    total += depth * layer + ln(d) + linear(d, classes)
    return total, total - frozen


def cvt13_params(classes: int) -> int:
    def block(c: int) -> int:
        return 4 * c + 3 * (9 * c + 2 * c) + 4 * (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c)

    embed = conv(3, 64, 7) + ln(64) + conv(64, 192, 3) + ln(192) + conv(192, 384, 3) + ln(384)
    blocks = block(64) + 2 * block(192) + 10 * block(384)
    return embed + 384 + blocks + ln(384) + linear(384, classes)


def resnet56_params(classes: int) -> int:
    bn = ln
    total, cin = conv(3, 16, 3, bias=False) + bn(16), 16
    for cout in (16, 32, 64):
        for i in range(9):
            c_in = cin if i == 0 else cout
            total += conv(c_in, cout, 3, False) + bn(cout) + conv(cout, cout, 3, False) + bn(cout)
            if c_in != cout:
                total += conv(c_in, cout, 1, False) + bn(cout)
        cin = cout
    return total + linear(64, classes)


# (total, trainable) with 100 and 200 classes. Table A gives the 100-class counts of every model
# and the 200-class counts of DeiT and PiT; elsewhere "with 200 classes only the head grows".
EXPECTED = {
    "pvt_tiny": {c: (pvt_tiny_params(c),) * 2 for c in (100, 200)},
    "t2t_vit_7": {c: t2t_params(256, 7, 2, c) for c in (100, 200)},
    "t2t_vit_14": {c: t2t_params(384, 14, 3, c) for c in (100, 200)},
    "cvt_13": {c: (cvt13_params(c),) * 2 for c in (100, 200)},
    "resnet56": {c: (resnet56_params(c),) * 2 for c in (100, 200)},
    "deit_tiny": {100: (5_543_716,) * 2, 200: (5_563_016,) * 2},
    "deit_tiny_distilled": {100: (5_563_400,) * 2, 200: (5_602_000,) * 2},
    "pit_tiny": {100: (4_615_972,) * 2, 200: (4_641_672,) * 2},
    "pvt_v2_b0": {100: (3_435_460,) * 2, 200: (3_435_460 + 100 * 257,) * 2},
    "convit_tiny": {100: (5_536_812,) * 2, 200: (5_536_812 + 100 * 193,) * 2},
}
# Table A of the facts, for the formulas above.
TABLE_A = {
    "pvt_tiny": (12_767_588, 12_767_588),
    "t2t_vit_7": (4_078_922, 4_024_394),
    "t2t_vit_14": (21_199_050, 21_119_306),
    "cvt_13": (19_650_980, 19_650_980),
    "resnet56": (861_620, 861_620),
}


def meta_model(name: str, classes: int = 100, **kw) -> nn.Module:
    with torch.device("meta"):
        return create(name, classes, image_size=size_of(name), **kw)


def std(t: torch.Tensor) -> float:
    return float(t.std())


def counts(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


@functools.cache
def built(name: str) -> nn.Module:
    """A real 100-class model at 32 px, built once per module (seeded), for reading its init."""
    torch.manual_seed(0)
    return create(name, 100, image_size=32).requires_grad_(False)


def test_the_formulas_give_table_a():
    for name, expected in TABLE_A.items():
        assert EXPECTED[name][100] == expected, name


@pytest.mark.parametrize("classes", [100, 200])
@pytest.mark.parametrize("name", NEW + TIMM)
def test_parameter_counts_total_and_trainable(name, classes):
    assert counts(meta_model(name, classes)) == EXPECTED[name][classes]


@pytest.mark.parametrize("name", NEW + TIMM)
def test_registry_knows_the_official_counts(name):
    assert official_params(name) == EXPECTED[name][100]
    assert f"{EXPECTED[name][100][0]:,}" in describe_models()[name]
    assert official_params("pit_tiny_distilled") is None  # not in the official code


# --------------------------------------------------------------------- state-dict names, shapes
def shapes(model: nn.Module, prefix: str) -> dict[str, tuple[int, ...]]:
    return {
        k[len(prefix) :]: tuple(v.shape)
        for k, v in model.state_dict().items()
        if k.startswith(prefix)
    }


def test_pvt_tiny_tensors():
    m = meta_model("pvt_tiny")
    assert shapes(m, "block1.0.") == {
        "norm1.weight": (64,), "norm1.bias": (64,),
        "attn.q.weight": (64, 64), "attn.q.bias": (64,),
        "attn.kv.weight": (128, 64), "attn.kv.bias": (128,),
        "attn.proj.weight": (64, 64), "attn.proj.bias": (64,),
        "attn.sr.weight": (64, 64, 8, 8), "attn.sr.bias": (64,),
        "attn.norm.weight": (64,), "attn.norm.bias": (64,),
        "norm2.weight": (64,), "norm2.bias": (64,),
        "mlp.fc1.weight": (512, 64), "mlp.fc1.bias": (512,),
        "mlp.fc2.weight": (64, 512), "mlp.fc2.bias": (64,),
    }  # fmt: skip
    assert shapes(m, "block4.0.") == {
        "norm1.weight": (512,), "norm1.bias": (512,),
        "attn.q.weight": (512, 512), "attn.q.bias": (512,),
        "attn.kv.weight": (1024, 512), "attn.kv.bias": (1024,),
        "attn.proj.weight": (512, 512), "attn.proj.bias": (512,),
        "norm2.weight": (512,), "norm2.bias": (512,),
        "mlp.fc1.weight": (2048, 512), "mlp.fc1.bias": (2048,),
        "mlp.fc2.weight": (512, 2048), "mlp.fc2.bias": (512,),
    }  # fmt: skip
    sd = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    top = {
        "pos_embed1": (1, 3136, 64), "pos_embed2": (1, 784, 128), "pos_embed3": (1, 196, 320),
        "pos_embed4": (1, 50, 512), "cls_token": (1, 1, 512),
        "patch_embed1.proj.weight": (64, 3, 4, 4), "patch_embed1.proj.bias": (64,),
        "patch_embed2.proj.weight": (128, 64, 2, 2), "patch_embed3.proj.weight": (320, 128, 2, 2),
        "patch_embed4.proj.weight": (512, 320, 2, 2), "patch_embed4.norm.weight": (512,),
        "norm.weight": (512,), "head.weight": (100, 512), "head.bias": (100,),
    }  # fmt: skip
    assert {k: sd[k] for k in top} == top
    assert not list(m.buffers())
    block_params = [sum(p.numel() for p in getattr(m, f"block{s}")[0].parameters())
                    for s in (1, 2, 3, 4)]  # fmt: skip
    assert block_params == [345_344, 592_384, 1_643_520, 3_152_384]


@pytest.mark.parametrize("name, d, hidden", [("t2t_vit_7", 256, 512), ("t2t_vit_14", 384, 1152)])
def test_t2t_tensors(name, d, hidden):
    m = meta_model(name)
    assert shapes(m, "layers.0.") == {
        "norm1.weight": (d,), "norm1.bias": (d,),
        "attn.qkv_transform.weight": (3 * d, d),
        "attn.projection.weight": (d, d), "attn.projection.bias": (d,),
        "norm2.weight": (d,), "norm2.bias": (d,),
        "mlp.fc1.weight": (hidden, d), "mlp.fc1.bias": (hidden,),
        "mlp.fc2.weight": (d, hidden), "mlp.fc2.bias": (d,),
    }  # fmt: skip
    for i, d_in in ((0, 147), (1, 576)):
        assert shapes(m, f"t2t_module.attention.{i}.") == {
            "norm1.weight": (d_in,), "norm1.bias": (d_in,),
            "attn.w": (32, 64),
            "attn.qkv_transform.weight": (192, d_in), "attn.qkv_transform.bias": (192,),
            "attn.projection.weight": (64, 64), "attn.projection.bias": (64,),
            "norm2.weight": (64,), "norm2.bias": (64,),
            "mlp.fc1.weight": (64, 64), "mlp.fc1.bias": (64,),
            "mlp.fc2.weight": (64, 64), "mlp.fc2.bias": (64,),
        }  # fmt: skip
    sd = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    top = {"cls_token": (1, 1, d), "pos_embed": (1, 197, d),
           "t2t_module.projection.weight": (d, 576), "t2t_module.projection.bias": (d,),
           "norm.weight": (d,), "head.weight": (100, d), "head.bias": (100,)}  # fmt: skip
    assert {k: sd[k] for k in top} == top
    frozen = sorted(k for k, p in m.named_parameters() if not p.requires_grad)
    assert frozen == ["pos_embed", "t2t_module.attention.0.attn.w", "t2t_module.attention.1.attn.w"]
    assert not list(m.buffers())


def test_cvt13_tensors():
    m = meta_model("cvt_13")
    bn = {f"bn.{s}": (384,) for s in ("weight", "bias", "running_mean", "running_var")}
    bn["bn.num_batches_tracked"] = ()
    expected = {"norm1.weight": (384,), "norm1.bias": (384,)}
    for p in "qkv":
        expected[f"attn.conv_proj_{p}.conv.weight"] = (384, 1, 3, 3)
        expected.update({f"attn.conv_proj_{p}.{k}": v for k, v in bn.items()})
        expected[f"attn.proj_{p}.weight"], expected[f"attn.proj_{p}.bias"] = (384, 384), (384,)
    expected.update({
        "attn.proj.weight": (384, 384), "attn.proj.bias": (384,),
        "norm2.weight": (384,), "norm2.bias": (384,),
        "mlp.fc1.weight": (1536, 384), "mlp.fc1.bias": (1536,),
        "mlp.fc2.weight": (384, 1536), "mlp.fc2.bias": (384,),
    })  # fmt: skip
    assert shapes(m, "stage2.blocks.0.") == expected
    sd = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    top = {
        "stage0.patch_embed.proj.weight": (64, 3, 7, 7), "stage0.patch_embed.proj.bias": (64,),
        "stage0.patch_embed.norm.weight": (64,),
        "stage1.patch_embed.proj.weight": (192, 64, 3, 3), "stage1.patch_embed.proj.bias": (192,),
        "stage2.patch_embed.proj.weight": (384, 192, 3, 3), "stage2.patch_embed.proj.bias": (384,),
        "stage2.cls_token": (1, 1, 384), "norm.weight": (384,),
        "head.weight": (100, 384), "head.bias": (100,),
    }  # fmt: skip
    assert {k: sd[k] for k in top} == top
    assert not any(k.startswith(("stage0.cls", "stage1.cls")) for k in sd)
    block_params = [sum(p.numel() for p in getattr(m, f"stage{s}").blocks[0].parameters())
                    for s in range(3)]  # fmt: skip
    assert block_params == [52_096, 451_200, 1_787_136]
    buffers = list(m.buffers())
    assert (len(buffers), sum(b.numel() for b in buffers)) == (117, 25_767)


def test_resnet56_tensors():
    m = meta_model("resnet56")
    bn = ("weight", "bias", "running_mean", "running_var")
    assert shapes(m, "stem.") == {"conv.weight": (16, 3, 3, 3), **{f"bn.{k}": (16,) for k in bn},
                                  "bn.num_batches_tracked": ()}  # fmt: skip
    expected = {"f.a.weight": (16, 16, 3, 3), "f.b.weight": (16, 16, 3, 3)}
    for name in ("f.a_bn", "f.b_bn"):
        expected.update({f"{name}.{k}": (16,) for k in bn}, **{f"{name}.num_batches_tracked": ()})
    assert shapes(m, "s1.b1.") == expected
    s2 = shapes(m, "s2.b1.")
    assert (s2["proj.weight"], s2["bn.weight"]) == ((32, 16, 1, 1), (32,))
    assert (s2["f.a.weight"], s2["f.b.weight"]) == ((32, 16, 3, 3), (32, 32, 3, 3))
    assert shapes(m, "head.") == {"fc.weight": (100, 64), "fc.bias": (100,)}
    blocks = {
        k.split(".")[0] + "." + k.split(".")[1]
        for k in m.state_dict()
        if k[:2] in ("s1", "s2", "s3")
    }
    assert blocks == {f"s{s}.b{i}" for s in (1, 2, 3) for i in range(1, 10)}
    buffers = list(m.buffers())
    assert (len(buffers), sum(b.numel() for b in buffers)) == (171, 4_313)


# ---------------------------------------------------------------------------------- drop path
def drop_rates(blocks) -> list[float]:
    out = []
    for b in blocks:
        mods = [getattr(b, a) for a in ("drop_path", "drop_path1", "drop_path2") if hasattr(b, a)]
        rates = {float(getattr(m, "drop_prob", 0.0)) for m in mods}
        assert len(rates) == 1, rates  # both residual branches use the block's rate
        out.append(rates.pop())
    return out


def linspace(end: float, n: int) -> list[float]:
    return [end * i / (n - 1) for i in range(n)]


@pytest.mark.parametrize(
    "name, blocks, expected",
    [
        ("pvt_tiny", lambda m: [b for s in (1, 2, 3, 4) for b in getattr(m, f"block{s}")],
         linspace(0.1, 8)),
        ("t2t_vit_7", lambda m: m.layers, linspace(0.1, 7)),
        ("t2t_vit_14", lambda m: m.layers, linspace(0.1, 14)),
        ("cvt_13", lambda m: [b for s in range(3) for b in getattr(m, f"stage{s}").blocks],
         [0.0, 0.0, 0.0] + linspace(0.1, 10)),
        ("pit_tiny", lambda m: [b for s in m.body.transformers for b in s.blocks],
         [0.1 * i / 12 for i in range(12)]),
        ("deit_tiny_distilled", lambda m: m.body.blocks, linspace(0.1, 12)),
        ("convit_tiny", lambda m: m.body.blocks, linspace(0.1, 12)),
        ("pvt_v2_b0", lambda m: [b for s in m.body.stages for b in s.blocks], linspace(0.1, 8)),
    ],
)  # fmt: skip
def test_drop_path_rates_per_block(name, blocks, expected):
    model = meta_model(name, drop_path_rate=0.1)
    assert drop_rates(blocks(model)) == pytest.approx(expected, abs=1e-7)
    assert drop_rates(blocks(meta_model(name))) == [0.0] * len(expected)  # default 0


def test_t2t_module_has_no_drop_path():
    m = meta_model("t2t_vit_7", drop_path_rate=0.1)
    assert not any(type(x).__name__ == "DropPath" for x in m.t2t_module.modules())


def test_drop_path_rate_is_refused_by_models_without_it():
    with pytest.raises(ValueError, match="resnet56 has no stochastic depth"):
        create("resnet56", 10, drop_path_rate=0.1)
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\)"):
        create("pvt_tiny", 10, image_size=32, drop_path_rate=1.5)


def test_drop_path_is_random_in_train_mode_only():
    # the smallest model; the rates of every model are checked above
    model = create("t2t_vit_7", 5, image_size=32, drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x)[1], model(x)[1])
        model.eval()
        torch.testing.assert_close(model(x)[1], model(x)[1], rtol=0, atol=0)
        assert model(x[:1])[1].shape == (1, 5)  # batch 1 stays [B, C]


# ------------------------------------------------------------------------------------ the deltas
def test_pvt_v2_layer_norms_all_have_eps_1e6():
    model = meta_model("pvt_v2_b0")
    norms = {n: m.eps for n, m in model.body.named_modules() if isinstance(m, nn.LayerNorm)}
    assert set(norms.values()) == {1e-6}
    import timm

    with torch.device("meta"):
        plain = timm.create_model("pvt_v2_b0", num_classes=100)
    changed = [n for n, m in plain.named_modules() if isinstance(m, nn.LayerNorm) and m.eps != 1e-6]
    assert len(changed) == 10  # the facts' list: patch embeddings and spatial-reduction norms
    assert all(n in norms for n in changed)


@pytest.mark.parametrize("name", ["deit_tiny", "deit_tiny_distilled"])
def test_deit_official_init(name):
    model = built(name).body
    for head in (model.head, getattr(model, "head_dist", None)):
        if head is not None:
            assert not head.weight.any() and not head.bias.any()
    for tensor in (model.cls_token, model.pos_embed):  # trunc_normal(0.02); timm: cls normal(1e-6)
        assert 0.016 < std(tensor) < 0.024
    fc1 = model.blocks[0].mlp.fc1
    assert abs(std(fc1.weight) - 0.02) < 0.001 and not fc1.bias.any()
    conv_w = model.patch_embed.proj.weight  # PyTorch default: U(+-1/sqrt(fan_in))
    assert float(conv_w.abs().max()) <= 1 / math.sqrt(conv_w[0].numel())


def test_pit_init_is_the_official_one():
    model = built("pit_tiny").body
    assert abs(std(model.pos_embed) - 0.02) < 0.002
    block = model.transformers[1].blocks[0]
    bound = 1 / math.sqrt(128)  # Linear: PyTorch default U(+-1/sqrt(fan_in))
    assert float(block.attn.qkv.weight.abs().max()) <= bound
    assert std(block.attn.qkv.weight) > 0.5 * bound / math.sqrt(3)
    assert torch.equal(block.norm1.weight, torch.ones(128)) and not block.norm1.bias.any()


def test_pvt_tiny_init():
    m = built("pvt_tiny")
    q = m.block1[0].attn.q
    assert abs(std(q.weight) - 0.02) < 0.002 and not q.bias.any()
    assert abs(std(m.pos_embed3) - 0.02) < 0.005
    sr = m.block1[0].attn.sr  # convolutions keep PyTorch's default: U(+-1/sqrt(fan_in))
    assert float(sr.weight.abs().max()) <= 1 / math.sqrt(64 * 8 * 8)
    assert float(m.patch_embed1.proj.bias.abs().max()) > 0
    assert torch.equal(m.norm.weight, torch.ones(512)) and not m.norm.bias.any()
    assert m.norm.eps == 1e-6


def test_t2t_init():
    m = built("t2t_vit_7")
    fc1 = m.layers[0].mlp.fc1
    assert abs(std(fc1.weight) - 0.02) < 0.001 and not fc1.bias.any()
    # normal, not truncated: some weights lie beyond 2 std (about 4.6% of 131k)
    assert float((fc1.weight.abs() > 0.04).float().mean()) > 0.03
    for layer in m.t2t_module.attention:
        w = layer.attn.w
        torch.testing.assert_close(w @ w.t(), 32 * torch.eye(32), atol=1e-4, rtol=0)
    assert m.pos_embed.shape == (1, 5, 256)  # 2 x 2 tokens at 32 px, + class token
    p = torch.arange(5, dtype=torch.float64)[:, None]
    i = torch.arange(128, dtype=torch.float64)[None, :]
    angle = p / 10000 ** (2 * i / 256)
    torch.testing.assert_close(
        m.pos_embed[0, :, 0::2].double(), torch.sin(angle), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        m.pos_embed[0, :, 1::2].double(), torch.cos(angle), atol=1e-6, rtol=0
    )


def test_cvt_init():
    m = built("cvt_13")
    blk = m.stage2.blocks[0]
    assert abs(std(blk.attn.proj_q.weight) - 0.02) < 0.001 and not blk.attn.proj_q.bias.any()
    bn = blk.attn.conv_proj_k.bn
    assert torch.equal(bn.weight, torch.ones(384)) and not bn.bias.any()
    assert float(blk.attn.conv_proj_k.conv.weight.abs().max()) <= 1 / 3  # default, fan_in 9
    assert abs(std(m.head.weight) - 0.02) < 0.002
    assert m.head.bias.any() and float(m.head.bias.abs().max()) <= 1 / math.sqrt(384)
    assert {x.eps for x in m.modules() if isinstance(x, nn.LayerNorm)} == {1e-5}


def test_resnet56_init():
    m = built("resnet56")
    conv_w = m.s3.b5.f.a.weight
    assert abs(std(conv_w) - math.sqrt(2 / (9 * 64))) < 0.003
    assert abs(std(m.head.fc.weight) - 0.01) < 0.001 and not m.head.fc.bias.any()


# --------------------------------------------------------------------------- outputs and errors
@pytest.mark.parametrize("name", NEW + TIMM)
def test_outputs_at_the_official_size(name):
    model = meta_model(name).eval()
    s = size_of(name)
    features, logits = model(torch.empty(2, 3, s, s, device="meta"))
    assert features.shape == (2, model.feature_dim) and logits.shape == (2, 100)
    assert (model.distill_logits is None) == (name != "deit_tiny_distilled")


@pytest.mark.parametrize(
    "name, size, pattern",
    [
        ("pvt_tiny", 48, "pvt_tiny cannot take image_size=48: it needs at least 32 px and a multiple of 32"),
        ("pvt_tiny", 16, "at least 32 px"),
        ("t2t_vit_7", 40, "multiple of 16"),
        ("t2t_vit_14", 8, "at least 16 px"),
        ("cvt_13", 8, "cvt_13 cannot take image_size=8: it needs at least 16 px"),
        ("resnet56", 2, "at least 4 px"),
    ],
)  # fmt: skip
def test_sizes_a_model_cannot_take(name, size, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        create(name, 10, image_size=size)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, size, grids", [
    ("pvt_tiny", 64, [16, 8, 4, 2]), ("t2t_vit_7", 48, [3]), ("cvt_13", 48, [12, 6, 3]),
    ("resnet56", 64, [64, 32, 16]),
])  # fmt: skip
def test_other_sizes(name, size, grids):
    with torch.device("meta"):
        model = create(name, 7, image_size=size).eval()
        with BlockFeatures(model) as rec:
            _, logits = model(torch.empty(1, 3, size, size))
    assert sorted({m.shape[-1] for m in rec.features}, reverse=True) == grids
    assert logits.shape == (1, 7)  # batch 1 stays [B, C] (the official CvT squeezes it to [C])


@pytest.mark.parametrize("name", ["pvt_tiny", "t2t_vit_7"])
def test_input_of_another_size_is_refused(name):
    model = create(name, 7, image_size=32)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 32, 32\]"):
        model(torch.randn(1, 3, 64, 64))


# ------------------------------------------------------------------- DeiT distillation convention
def test_deit_distilled_train_mode_returns_the_class_head_and_keeps_the_distillation_head():
    model = create("deit_tiny_distilled", 6, image_size=32).train()
    for head in (model.body.head, model.body.head_dist):  # official init zeroes them
        nn.init.normal_(head.weight, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    features, logits = model(x)
    torch.manual_seed(1)  # the same drop path masks (none at rate 0, but be exact)
    tokens = model.body.forward_features(x)
    torch.testing.assert_close(logits, model.body.head(tokens[:, 0]))
    torch.testing.assert_close(model.distill_logits, model.body.head_dist(tokens[:, 1]))
    assert model.distill_logits.grad_fn is not None  # a KD loss on it trains the student
    model.eval()
    with torch.no_grad():
        _, eval_logits = model(x)
    torch.testing.assert_close(eval_logits, (logits + model.distill_logits).detach() / 2)
    torch.testing.assert_close(eval_logits, model.body(x))  # timm's own evaluation output


def test_single_head_transformers_have_no_distill_logits():
    model = create("deit_tiny", 6, image_size=32).train()
    model(torch.randn(1, 3, 32, 32))
    assert model.distill_logits is None
