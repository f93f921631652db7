"""Convolutional CIFAR classifiers, used as distillation teachers for the ViT students.

* `ResNetCifar` (He et al. 2016, CIFAR form): a 3x3 stride-1 stem and no max-pool, so stage 1 works on the full
  32x32 map. An ImageNet stem (7x7/2 conv + max-pool) shrinks the image to 8x8 before the first block: the
  torchvision ResNet-50 teacher of kiki101robo/AIRL_VIT-and-SAM2 (`q1.ipynb`) used it at 32 px and reached 88.71%.
* `AirbenchNet`: the layout of airbench94/96 (K. Jordan, KellerJordan/cifar10-airbench): a 2x2 conv stem + GELU,
  three groups of [3x3 conv -> 2x2 max-pool -> BN -> GELU] followed by one (airbench94) or two (airbench96, with a
  residual over them) more conv-BN-GELU layers, a 3x3 max-pool, a bias-free linear head and logits scaled by 1/9.
  BatchNorm has no learnable scale and fast running statistics (momentum 0.4); 3x3 filters start as the identity
  (dirac) on their first `in` channels. airbench's training tricks (whitened frozen stem, lookahead, bias lr scaling,
  alternating flips) are not reproduced; the network is trained by the ordinary vitforge loop.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vitforge.constants import CIFAR10_NORM
from vitforge.models.registry import register_model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv + BN when the shape changes), ReLU. (B, C_in, H, W) ->
    (B, C_out, H/s, W/s)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.shortcut(x))


class _ConvClassifier(nn.Module):
    """Shared classifier contract of the CNNs: `forward_features` gives a (B, C, h, w) map, the head pools it."""

    num_features: int
    head_scale: float = 1.0  # logits = head(features) * head_scale
    head_bias: bool = True

    def _init_contract(self, num_classes: int, img_size: int, in_chans: int) -> None:
        self.pretrained_cfg = {"input_size": (in_chans, img_size, img_size), **CIFAR10_NORM}
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes, bias=self.head_bias) if num_classes else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        return set()  # BN and biases are 1-D: the optimizer already exempts them

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> logits (B, classes), or pooled features (B, C) if `pre_logits`."""
        feat = self.pool(x)
        return feat if pre_logits else self.head(feat) * self.head_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, classes)."""
        return self.forward_head(self.forward_features(x))


class ResNetCifar(_ConvClassifier):
    """ResNet with BasicBlocks and a CIFAR stem.

    Args:
        layers: blocks per stage.
        widths: channels per stage (stages 2+ halve the resolution).
        num_classes: classes of the head (0 = pooled features).
        in_chans: input channels.
        img_size: nominal input size (any size works; recorded for preprocessing).
    """

    def __init__(self, *, layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes: int = 10, in_chans: int = 3,
                 img_size: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        stages, c_in = [], widths[0]
        for i, (n, c) in enumerate(zip(layers, widths, strict=True)):
            blocks = [BasicBlock(c_in if j == 0 else c, c, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            c_in = c
        self.stages = nn.Sequential(*stages)
        self.num_features = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self._init_contract(num_classes, img_size, in_chans)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H/8, W/8)."""
        return self.stages(self.stem(x))


def _bn(c: int) -> nn.BatchNorm2d:
    """airbench's BatchNorm: no learnable scale, running-statistics momentum 0.4 (airbench writes 0.6 = 1 − 0.4)."""
    bn = nn.BatchNorm2d(c, eps=1e-12, momentum=0.4)
    bn.weight.requires_grad_(False)
    return bn


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    """3x3 'same' conv without bias whose first `c_in` filters start as the identity (an implicit residual)."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(c_in, c_out)])
    return conv


class AirbenchGroup(nn.Module):
    """conv -> max-pool 2 -> BN -> GELU, then `extra` x (conv -> BN -> GELU); residual over the extras if >= 2.
    (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, c_in: int, c_out: int, extra: int = 1) -> None:
        super().__init__()
        self.conv = _conv(c_in, c_out)
        self.pool = nn.MaxPool2d(2)
        self.norm = _bn(c_out)
        self.act = nn.GELU()
        self.extra = nn.Sequential(*(nn.Sequential(_conv(c_out, c_out), _bn(c_out), nn.GELU()) for _ in range(extra)))
        self.residual = extra >= 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm(self.pool(self.conv(x))))
        y = self.extra(x)
        return x + y if self.residual else y


class AirbenchNet(_ConvClassifier):
    """airbench-style fast CIFAR CNN.

    Args:
        widths: channels of the three groups.
        extra: conv layers after the pooling conv in each group (1: airbench94, 2 with residual: airbench96).
        stem_width: channels of the 2x2 stem conv (airbench: 2·3·2² = 24).
        num_classes: classes of the head (0 = pooled features).
        in_chans: input channels.
        img_size: nominal input size (32 -> 31 after the stem -> 15 -> 7 -> 3, then a global max-pool).
    """

    head_scale = 1 / 9
    head_bias = False

    def __init__(self, *, widths=(128, 512, 512), extra: int = 2, stem_width: int = 24, num_classes: int = 10,
                 in_chans: int = 3, img_size: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_width, 2, bias=True), nn.GELU())  # (B, 24, H-1, W-1)
        chans = (stem_width, *widths)
        self.groups = nn.Sequential(*(AirbenchGroup(chans[i], chans[i + 1], extra) for i in range(len(widths))))
        self.num_features = widths[-1]
        self._init_contract(num_classes, img_size, in_chans)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) -> (B, C, 3, 3)."""
        return self.groups(self.stem(x))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3))  # global max = airbench's MaxPool2d(3) on the 3x3 map of a 32x32 input


@register_model
def resnet18_cifar(**kwargs) -> ResNetCifar:
    """ResNet-18 with the CIFAR stem (3x3/1 conv, no max-pool), 11,173,962 params at 10 classes."""
    return ResNetCifar(**{**dict(layers=(2, 2, 2, 2), widths=(64, 128, 256, 512)), **kwargs})


@register_model
def airbench_cifar(**kwargs) -> AirbenchNet:
    """airbench96 layout: widths 128-512-512, two residual conv layers per group, 10 convs."""
    return AirbenchNet(**{**dict(widths=(128, 512, 512), extra=2), **kwargs})


@register_model
def airbench94_cifar(**kwargs) -> AirbenchNet:
    """airbench94 layout: widths 64-256-256, one extra conv per group, 1,972,792 params at 10 classes."""
    return AirbenchNet(**{**dict(widths=(64, 256, 256), extra=1), **kwargs})
