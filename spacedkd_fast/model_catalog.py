"""What every registered model is, without torch: names, one-line descriptions, the image sizes
each takes, the official parameter counts, and the family (convolutional or transformer).

``spacedkd_fast.models.registry`` pairs each entry with its builder (and refuses a builder without
an entry, and the reverse), so this table is the one definition; ``python -m spacedkd_fast.train
--list-models`` reads it alone and answers without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """Which square image sizes one registered name takes, and what it is."""

    min_image_size: int
    size_multiple: int  # image_size must be a multiple of this (1: any size)
    size_reason: str
    description: str
    drop_path: bool = False  # takes drop_path_rate
    official_params: tuple[int, int] | None = None  # (total, trainable), 100 classes
    official_size: int | None = None  # the official image size
    # "cnn" or "transformer": the trainer's --amp/--channels-last auto turn on bf16 + channels_last
    # on CUDA for runs whose models are all convolutional (train/speed_defaults.py)
    family: str = "transformer"

    @property
    def convolutional(self) -> bool:
        return self.family == "cnn"


FAMILIES = ("cnn", "transformer")
CATALOG: dict[str, ModelInfo] = {}

# (name, timm name, label, official parameter count) of the timm-based transformers
VIT_TIMM = (
    ("deit_tiny", "deit_tiny_patch16_224", "DeiT-Tiny", 5_543_716),
    ("deit_tiny_distilled", "deit_tiny_distilled_patch16_224",
     "DeiT-Tiny with distillation token", 5_563_400),
    ("convit_tiny", "convit_tiny", "ConViT-Tiny", 5_536_812),
    ("pit_tiny", "pit_ti_224", "PiT-Ti", 4_615_972),
    ("pit_tiny_distilled", "pit_ti_distilled_224",
     "PiT-Ti with distillation token, which the official code lacks", None),
)


def _info(
    name: str,
    description: str,
    *,
    family: str,
    min_size: int = 1,
    multiple: int = 1,
    reason: str = "",
    drop_path: bool = False,
    official: tuple[int, int] | int | None = None,
    official_size: int | None = None,
) -> None:
    if isinstance(official, int):
        official = (official, official)
    assert family in FAMILIES, family
    CATALOG[name] = ModelInfo(min_size, multiple, reason, description, drop_path, official,
                              official_size, family)


_VIT_KW = "kw: patch_size, drop_path_rate and other timm kwargs"

_STRIDE8 = "its three stride-2 stages need at least 8 px"
for _d in (18, 34, 50, 101, 152):
    _info(
        f"resnet{_d}",
        f"CIFAR ResNet-{_d} (3x3 stem, no max-pool); kw: downsample_factor",
        family="cnn",
        min_size=8,
        reason=_STRIDE8,
    )
    _info(
        f"byot_resnet{_d}",
        f"four-exit self-KD ResNet-{_d} (Be Your Own Teacher); kw: downsample_factor",
        family="cnn",
        min_size=8,
        multiple=8,
        reason="its attention masks (stride 2, then x2 upsampling) need even sizes at layer1..3",
    )
_info(
    "mobilenetv2",
    "MobileNetV2 for 32 px inputs (stem and first stride-2 stage at stride 1); kw: width_mult",
    family="cnn",
    min_size=8,
    reason=_STRIDE8,
)
_info(
    "shufflenetv2",
    "ShuffleNetV2 for 32 px inputs (3x3 stride-1 stem, no max-pool); kw: net_size",
    family="cnn",
    min_size=8,
    reason=_STRIDE8,
)
for _d in (11, 13, 16, 19):
    _info(
        f"vgg{_d}",
        f"VGG-{_d} with BatchNorm, global pooling + one linear classifier",
        family="cnn",
        min_size=32,
        reason="its five 2x2 max-pools need at least 32 px",
    )
for _d, _k in ((16, 2), (16, 4), (16, 8), (28, 4), (28, 10), (40, 2), (40, 4)):
    _info(
        f"wrn_{_d}_{_k}",
        f"WideResNet-{_d}-{_k}; kw: drop_rate",
        family="cnn",
        min_size=4,
        reason="its two stride-2 groups need at least 4 px",
    )
for _name, _timm_name, _label, _official in VIT_TIMM:
    # The builders check the size themselves: what they take depends on patch_size.
    _info(
        _name,
        f"{_label} (timm {_timm_name}); {_VIT_KW}",
        family="transformer",
        drop_path=True,
        official=_official,
        official_size=224 if _official else None,
    )
_info(
    "pvt_v2_b0",
    "PVTv2-b0 (timm pvt_v2_b0); kw: drop_path_rate and other timm kwargs",
    family="transformer",
    min_size=32,
    reason="its first stage's 8x8 spatial-reduction convolution needs 32 px",
    drop_path=True,
    official=3_435_460,
    official_size=224,
)
_info(
    "pvt_tiny",
    "PVT v1 Tiny (written from the official description; official tensor names); kw: drop_path_rate",
    family="transformer",
    min_size=32,
    multiple=32,
    reason="its patch embeddings have strides 4, 2, 2, 2; 224 is the official size",
    drop_path=True,
    official=12_767_588,
    official_size=224,
)
for _name, _official in (("t2t_vit_7", (4_078_922, 4_024_394)),
                         ("t2t_vit_14", (21_199_050, 21_119_306))):  # fmt: skip
    _info(
        _name,
        f"T2T-ViT-{_name.rsplit('_', 1)[1]} (written from the official description; frozen "
        "sinusoidal position embedding and Performer projections); kw: drop_path_rate",
        family="transformer",
        min_size=16,
        multiple=16,
        reason="its soft splits have strides 4, 2, 2; 224 is the official size",
        drop_path=True,
        official=_official,
        official_size=224,
    )
_info(
    "cvt_13",
    "CvT-13 (written from the official description; official tensor names); kw: drop_path_rate",
    family="transformer",
    min_size=16,
    reason="total stride 16; 224 is the official size",
    drop_path=True,
    official=19_650_980,
    official_size=224,
)
_info(
    "resnet56",
    "CIFAR ResNet-56 of the official ViT code (16/32/64 channels, 9 blocks per stage), the "
    "intermediate-feature KD teacher",
    family="cnn",
    min_size=4,
    reason="its two stride-2 stages need at least 4 px; 32 is the official size",
    official=861_620,
    official_size=32,
)


def is_convolutional(name: str) -> bool:
    """Whether the registered model ``name`` is a CNN (False for transformers and unknown names)."""
    info = CATALOG.get(name)
    return info is not None and info.convolutional


def multi_exit_name(name: str) -> str:
    """The network self KD trains for ``--arch name``: ``resnet18`` means ``byot_resnet18``."""
    if not name.startswith("byot_") and f"byot_{name}" in CATALOG:
        return f"byot_{name}"
    return name


def describe_models() -> dict[str, str]:
    """``{name: one-line description}`` for help texts (with the official parameter count)."""
    out = {}
    for name in sorted(CATALOG):
        info = CATALOG[name]
        text = info.description
        if info.official_params is not None:
            total, trainable = info.official_params
            count = f"{total:,}" + (f" ({trainable:,} trainable)" if trainable != total else "")
            text += f"; official: {count} params (100 classes, {info.official_size} px)"
        out[name] = text
    return out
