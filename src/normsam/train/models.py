"""Model zoo for the normsam experiments: one entry point, :func:`build_model`.

SAM-ON perturbs only the affine parameters (γ, β) of normalization layers, so what matters here is which
normalization layers a model has. Every model below takes its input channel count and class count from the
arguments (the data decides them), and 28×28 inputs (Fashion-MNIST) work as well as 32×32 (CIFAR).

Architectures
-------------
``resnet20``, ``resnet32``, ``resnet56`` (and ``resnet{depth}`` for any depth = 6n+2, e.g. ``resnet110``)
    The CIFAR ResNets of He et al. (2016, §4.2): a 3×3 stem conv with 16 channels, three stages of n
    post-activation basic blocks (conv→norm→ReLU→conv→norm, add the shortcut, ReLU) with 16/32/64
    channels, the first block of stages 2 and 3 downsampling by stride 2, then global average pooling
    and a linear head. Depth counts the 6n+1 3×3 convs plus the head. Where a block changes shape the
    shortcut is a 1×1 strided conv followed by a norm (the paper's option B), so that downsample norm is
    one of the layers SAM-ON perturbs. ResNet-20 with BatchNorm has 272,474 parameters (the paper's
    "0.27M" is for the parameter-free option-A shortcut; option B adds 2,752).

``wrn16-4``, ``wrn16-8``, ``wrn28-10`` (and ``wrn{depth}-{k}`` for any depth with (depth-4) % 6 == 0)
    Pre-activation Wide ResNets of Zagoruyko & Komodakis (2016): a 3×3 stem conv with 16 channels, three
    groups of n = (depth-4)/6 blocks of widths 16k, 32k, 64k (strides 1, 2, 2), each block
    norm→ReLU→conv3×3→norm→ReLU→conv3×3 added to the shortcut, then a final norm→ReLU, global
    average pooling and a linear head (6n+1 3×3 convs in all). Where a block changes shape, the shortcut
    is a 1×1 strided conv applied to the block's pre-activated input, as in the authors' code. No
    dropout. WRN-28-10 has 36.5M parameters, WRN-16-8 11.0M and WRN-16-4 2.75M, as in the paper.

``vit-tiny`` (embed 192, depth 12, 3 heads) and ``vit-small`` (384, 12, 6)
    timm's ``VisionTransformer`` with patch size 4 and ``img_size=image_size`` (which must therefore be a
    multiple of 4: 32 → 8×8 = 64 patches, 28 → 7×7 = 49), class token, MLP ratio 4, pre-norm blocks. Its
    normalization layers are timm's LayerNorms (two per block plus the final one); ``norm`` is not taken.

``timm:NAME``
    ``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=...)``. timm adapts the stem
    to ``in_channels`` itself. The model keeps timm's default configuration (``image_size`` is not passed),
    so a model with a fixed input size, such as a timm ViT, expects its own default resolution.

``torchvision:NAME``
    ``torchvision.models.get_model(NAME, weights=None, num_classes=...)``. torchvision models expect three
    input channels; for ``in_channels == 1`` the model is wrapped as
    ``Sequential(to_rgb=RepeatChannels(3), model=...)``, which repeats the grey channel three times (no
    parameters, so it changes nothing SAM sees except the ``model.`` prefix of the parameter names). Other
    channel counts are refused. Weights are never downloaded, for timm or torchvision.

Normalization (``norm``, ResNets and WRNs only)
-----------------------------------------------
``"batch"`` (default)
    ``BatchNorm2d(C)``.
``"group"``
    ``GroupNorm(G, C)`` with G = the largest divisor of C not above 8 (8 for every width used here,
    16k/32k/64k included), i.e. 2 channels per group in the 16-channel layers and 80 in WRN-28-10's
    640-channel ones. Eight is the most groups that still leaves every group of a 16-channel layer more
    than one channel; with a single channel per group GroupNorm would become InstanceNorm.
``"layer"``
    ``GroupNorm(1, C)``: each sample is normalized over all of C×H×W (LayerNorm over the feature map) with
    a per-channel γ and β, as with the other options. Unlike ``nn.LayerNorm([C, H, W])`` this does not fix
    the spatial size (28×28 and 32×32 inputs both work) and its affine parameters are per channel, so
    SAM-ON perturbs the same number of parameters for every norm choice.
``"none"``
    No normalization layer at all (the "no normalization" control): every norm becomes ``nn.Identity``
    and every conv gets a bias. To make that network trainable the residual branches use SkipInit
    (De & Smith, 2020): each branch is multiplied by a learnable scalar ``skip_gain`` initialized to 0,
    so every block starts as its shortcut and the network starts as a shallow one whose signal does not
    grow with depth. The gain receives a gradient from the first step, after which the branch weights do
    too. The last conv of a branch is deliberately *not* zero-initialized as well: with both the branch
    output and its gain at zero, neither would ever receive a gradient.
    Without normalization the largest stable learning rate is smaller than with it: on the synthetic
    problem of the tests, SGD with momentum 0.9 trained ResNet-20 reliably at lr 0.02 but diverged for
    some seeds at 0.1, as the branch gains grew.

Initialization
--------------
Convs: Kaiming-normal with ReLU gain in fan-in mode (He et al., 2015), which keeps the forward signal's
second moment constant through conv→ReLU pairs, the property that matters without normalization. Conv
biases start at 0; norm layers at γ = 1, β = 0; the linear head keeps PyTorch's default initialization.
The builders use the global torch RNG, so ``torch.manual_seed`` makes them reproducible.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "MODEL_NAMES",
    "MODEL_PREFIXES",
    "NORMS",
    "BasicBlock",
    "CifarResNet",
    "PreActBlock",
    "RepeatChannels",
    "WideResNet",
    "build_model",
    "list_models",
    "cifar_resnet",
    "wide_resnet",
    "vit",
]

#: The named models (the CLI's choices). ``resnet{6n+2}`` and ``wrn{6n+4}-{k}`` are accepted generally.
MODEL_NAMES: tuple[str, ...] = (
    "resnet20",
    "resnet32",
    "resnet56",
    "wrn16-4",
    "wrn16-8",
    "wrn28-10",
    "vit-tiny",
    "vit-small",
)
#: Prefixes that build any model of an external library by name.
MODEL_PREFIXES: tuple[str, ...] = ("timm:", "torchvision:")
#: Values of ``norm`` for the ResNets and WRNs.
NORMS: tuple[str, ...] = ("batch", "group", "layer", "none")

# ViT variants: (embed_dim, depth, num_heads).
_VIT_CONFIGS: dict[str, tuple[int, int, int]] = {
    "vit-tiny": (192, 12, 3),
    "vit-small": (384, 12, 6),
}
_VIT_PATCH_SIZE = 4
_GROUPS_MAX = 8

_RESNET_RE = re.compile(r"resnet(\d+)")
_WRN_RE = re.compile(r"wrn(\d+)-(\d+)")


def list_models() -> list[str]:
    """The named models plus the general patterns and prefixes, for help texts."""
    return [*MODEL_NAMES, "resnet{6n+2}", "wrn{6n+4}-{k}", *(f"{p}NAME" for p in MODEL_PREFIXES)]


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------

NormFactory = Callable[[int], nn.Module]


def _group_count(channels: int) -> int:
    """The largest divisor of ``channels`` not above 8 (see the module docstring)."""
    return max(g for g in range(1, min(_GROUPS_MAX, channels) + 1) if channels % g == 0)


def _norm_factory(norm: str) -> NormFactory:
    """A function ``channels -> normalization module`` for one of :data:`NORMS`."""
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return lambda c: nn.GroupNorm(_group_count(c), c)
    if norm == "layer":
        return lambda c: nn.GroupNorm(1, c)
    if norm == "none":
        return lambda c: nn.Identity()
    raise ValueError(f"Unknown norm {norm!r}; valid norms are {', '.join(map(repr, NORMS))}.")


def _conv(c_in: int, c_out: int, kernel: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=bias)


def _init_convs(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _SkipGain(nn.Module):
    """Multiplies its input by a learnable scalar initialized to 0 (SkipInit); identity when disabled."""

    def __init__(self, enabled: bool):
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(())) if enabled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.gain is None else x * self.gain


class BasicBlock(nn.Module):
    """Post-activation basic block of the CIFAR ResNet: relu(shortcut(x) + branch(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: NormFactory, skipinit: bool):
        super().__init__()
        bias = skipinit  # convs carry a bias exactly where no norm follows them
        self.conv1 = _conv(c_in, c_out, 3, stride, bias)
        self.norm1 = norm(c_out)
        self.conv2 = _conv(c_out, c_out, 3, 1, bias)
        self.norm2 = norm(c_out)
        self.skip_gain = _SkipGain(skipinit)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                OrderedDict(conv=_conv(c_in, c_out, 1, stride, bias), norm=norm(c_out))
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.skip_gain(self.norm2(self.conv2(out)))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al., 2016); see the module docstring."""

    def __init__(
        self, depth: int, *, num_classes: int, in_channels: int = 3, norm: str = "batch"
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}. "
                "ImageNet ResNets (resnet18, resnet50, ...) are available as 'timm:NAME' or "
                "'torchvision:NAME'."
            )
        make_norm = _norm_factory(norm)
        skipinit = norm == "none"
        n = (depth - 2) // 6
        self.depth, self.norm_kind = depth, norm
        self.conv1 = _conv(in_channels, 16, 3, 1, bias=skipinit)
        self.norm1 = make_norm(16)
        stages: list[nn.Sequential] = []
        c_in = 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(c_in, c_out, stride if i == 0 else 1, make_norm, skipinit))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.fc = nn.Linear(64, num_classes)
        _init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm1(self.conv1(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(x.mean(dim=(2, 3)))


class PreActBlock(nn.Module):
    """Pre-activation block of the WRN: shortcut(a) + branch(a) with a = relu(norm(x)).

    With an identity shortcut the un-activated ``x`` is added, as in He et al. (2016b).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, norm: NormFactory, skipinit: bool):
        super().__init__()
        bias = skipinit
        self.norm1 = norm(c_in)
        self.conv1 = _conv(c_in, c_out, 3, stride, bias)
        self.norm2 = norm(c_out)
        self.conv2 = _conv(c_out, c_out, 3, 1, bias)
        self.skip_gain = _SkipGain(skipinit)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = _conv(c_in, c_out, 1, stride, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.norm1(x))
        out = self.conv1(a)
        out = self.conv2(torch.relu(self.norm2(out)))
        skip = x if self.shortcut is None else self.shortcut(a)
        return skip + self.skip_gain(out)


class WideResNet(nn.Module):
    """Pre-activation WRN-depth-k (Zagoruyko & Komodakis, 2016); see the module docstring."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        *,
        num_classes: int,
        in_channels: int = 3,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(
                "WideResNet depth must satisfy (depth - 4) % 6 == 0 with depth >= 10 "
                f"(10, 16, 22, 28, 40, ...), got {depth}."
            )
        if widen_factor < 1:
            raise ValueError(f"WideResNet widen factor must be >= 1, got {widen_factor}.")
        make_norm = _norm_factory(norm)
        skipinit = norm == "none"
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.depth, self.widen_factor, self.norm_kind = depth, widen_factor, norm
        self.conv1 = _conv(in_channels, 16, 3, 1, bias=skipinit)
        stages: list[nn.Sequential] = []
        c_in = 16
        for c_out, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(PreActBlock(c_in, c_out, stride if i == 0 else 1, make_norm, skipinit))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.norm = make_norm(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)
        _init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.conv1(x))))
        x = torch.relu(self.norm(x))
        return self.fc(x.mean(dim=(2, 3)))


class RepeatChannels(nn.Module):
    """Repeats a single-channel image ``repeats`` times along the channel axis (grey → RGB)."""

    def __init__(self, repeats: int = 3):
        super().__init__()
        self.repeats = repeats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.repeats, *x.shape[2:])

    def extra_repr(self) -> str:
        return f"repeats={self.repeats}"


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------


def cifar_resnet(depth: int, *, num_classes: int, in_channels: int = 3, norm: str = "batch") -> CifarResNet:
    """CIFAR ResNet of the given depth (6n+2)."""
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, norm=norm)


def wide_resnet(
    depth: int, widen_factor: int, *, num_classes: int, in_channels: int = 3, norm: str = "batch"
) -> WideResNet:
    """Pre-activation WRN-depth-widen_factor."""
    return WideResNet(depth, widen_factor, num_classes=num_classes, in_channels=in_channels, norm=norm)


def vit(name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """``vit-tiny`` or ``vit-small`` with patch size 4 for ``image_size``×``image_size`` inputs."""
    from timm.models.vision_transformer import VisionTransformer

    if name not in _VIT_CONFIGS:
        raise ValueError(f"Unknown ViT {name!r}; valid: {', '.join(_VIT_CONFIGS)}.")
    if image_size < _VIT_PATCH_SIZE or image_size % _VIT_PATCH_SIZE:
        raise ValueError(
            f"{name} uses {_VIT_PATCH_SIZE}×{_VIT_PATCH_SIZE} patches, so image_size must be a positive "
            f"multiple of {_VIT_PATCH_SIZE}; got {image_size}."
        )
    embed_dim, depth, heads = _VIT_CONFIGS[name]
    return VisionTransformer(
        img_size=image_size,
        patch_size=_VIT_PATCH_SIZE,
        in_chans=in_channels,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
    )


def _timm_model(name: str, *, num_classes: int, in_channels: int) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"timm has no model {name!r} (see timm.list_models()).") from err
        raise


def _torchvision_model(name: str, *, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    if in_channels not in (1, 3):
        raise ValueError(
            f"torchvision models take 3 input channels (1 is adapted by repeating it 3 times); "
            f"got in_channels={in_channels}. Use a 'timm:' model, which adapts its stem to any count."
        )
    if name not in torchvision.models.list_models():
        raise ValueError(f"torchvision has no model {name!r} (see torchvision.models.list_models()).")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels == 1:
        model = nn.Sequential(OrderedDict(to_rgb=RepeatChannels(3), model=model))
    return model


def _unknown_name(name: str) -> ValueError:
    return ValueError(
        f"Unknown model {name!r}. Valid names: {', '.join(MODEL_NAMES)}; also resnet{{6n+2}} "
        f"(e.g. resnet110), wrn{{depth}}-{{k}} with (depth - 4) % 6 == 0, and the prefixes "
        f"'timm:NAME' and 'torchvision:NAME' for any timm or torchvision model."
    )


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    norm: str | None = None,
) -> nn.Module:
    """Build a freshly initialized model by name (see the module docstring for the choices).

    Args:
        name: one of :data:`MODEL_NAMES`, ``resnet{6n+2}``, ``wrn{depth}-{k}``, ``timm:NAME`` or
            ``torchvision:NAME``.
        num_classes: size of the output layer.
        in_channels: input channels (1 for Fashion-MNIST, 3 for CIFAR).
        image_size: input side length; used by the ViTs (must be a multiple of 4). The ResNets and WRNs
            pool globally and take any size; ``timm:``/``torchvision:`` models keep their defaults.
        norm: normalization of the ResNets and WRNs, one of :data:`NORMS` (``None`` means ``"batch"``).
            Other models have a fixed normalization and refuse any value but ``None``.

    Raises:
        ValueError: unknown name, bad depth, bad norm, a ``norm`` for a model that does not take one, or
            an input channel count a model cannot take.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}.")

    resnet, wrn = _RESNET_RE.fullmatch(name), _WRN_RE.fullmatch(name)
    if resnet or wrn:
        norm = "batch" if norm is None else norm
        if resnet:
            return cifar_resnet(
                int(resnet.group(1)), num_classes=num_classes, in_channels=in_channels, norm=norm
            )
        assert wrn is not None
        return wide_resnet(
            int(wrn.group(1)),
            int(wrn.group(2)),
            num_classes=num_classes,
            in_channels=in_channels,
            norm=norm,
        )

    known = name in _VIT_CONFIGS or name.startswith(MODEL_PREFIXES)
    if not known:
        raise _unknown_name(name)
    if norm is not None:
        raise ValueError(
            f"Model {name!r} has a fixed normalization and does not take norm={norm!r}; only the CIFAR "
            f"ResNets (resnet{{6n+2}}) and WideResNets (wrn{{depth}}-{{k}}) take norm "
            f"({', '.join(NORMS)})."
        )
    if name in _VIT_CONFIGS:
        return vit(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    prefix, _, inner = name.partition(":")
    if not inner:
        raise ValueError(f"Model name {name!r} needs a model after '{prefix}:', e.g. '{prefix}:resnet18'.")
    if prefix == "timm":
        return _timm_model(inner, num_classes=num_classes, in_channels=in_channels)
    return _torchvision_model(inner, num_classes=num_classes, in_channels=in_channels)

