"""Models: ResNet encoders (CIFAR or ImageNet stem, any width), projection heads, and the SimCLR module.

The ResNet here uses torchvision's module names and initialisation, so at width 64 an encoder's state
dict loads into `torchvision.models.resnet18()` (stem adjusted, `fc = nn.Identity()`) with strict=True.
Widths other than 64 are this project's own: on a 2-core CPU a width-32 ResNet-18 trains about 3x
faster than width 64, which decides what a CPU budget can learn.
"""

from __future__ import annotations

import torch
from torch import nn

ARCHS = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]), "resnet50": ("bottleneck", [3, 4, 6, 3])}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1, self.bn1 = _conv1x1(cin, planes), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)  # stride here: ResNet v1.5
        self.conv3, self.bn3 = _conv1x1(planes, planes * 4), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNetEncoder(nn.Module):
    """ResNet without its classifier: image (B, 3, H, W) -> representation h (B, feature_dim)."""

    def __init__(self, arch: str = "resnet18", stem: str = "cifar", width: int = 64):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture '{arch}': use one of {', '.join(ARCHS)}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"unknown stem '{stem}': use cifar or imagenet")
        kind, depths = ARCHS[arch]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.arch, self.stem, self.width = arch, stem, width
        if stem == "cifar":  # 32x32 inputs keep their resolution: 3x3 stride 1, no max-pool
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1, self.relu = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        self.inplanes = width
        for i, depth in enumerate(depths):
            setattr(self, f"layer{i + 1}", self._make_layer(block, width * 2**i, depth, 1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = width * 8 * block.expansion
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type, planes: int, depth: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(depth - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)  # (B, feature_dim)

    def describe(self) -> dict:
        return {"arch": self.arch, "stem": self.stem, "width": self.width, "feature_dim": self.feature_dim}


def stem_of(model_cfg) -> str:
    """model.stem, where "auto" is left only in a ModelConfig built outside `load_config` (which knows the
    image size and resolves it): 32-pixel images, the CIFAR stem, are assumed there."""
    return "cifar" if model_cfg.stem == "auto" else model_cfg.stem


def encoder_from(model_cfg) -> ResNetEncoder:
    return ResNetEncoder(model_cfg.arch, stem_of(model_cfg), model_cfg.width)


def describe_encoder(model_cfg) -> dict:
    """What `ResNetEncoder(...).describe()` returns for this config, without building the network."""
    block = Bottleneck if ARCHS[model_cfg.arch][0] == "bottleneck" else BasicBlock
    return {"arch": model_cfg.arch, "stem": stem_of(model_cfg), "width": model_cfg.width,
            "feature_dim": model_cfg.width * 8 * block.expansion}


class ProjectionHead(nn.Module):
    """g(h) = z. Two layers: Linear-ReLU-Linear (SimCLR v1). Three: two Linear-BN-ReLU blocks, then Linear (v2).

    `forward(h, layer=k)` returns the output of the first k blocks (k=0 is h itself), for probing from a
    chosen head layer as SimCLR v2 does.
    """

    def __init__(self, dim_in: int, hidden: int | None = None, dim_out: int = 128, layers: int = 2):
        super().__init__()
        hidden = hidden or dim_in
        self.layers = layers
        dims = [dim_in] + [hidden] * (layers - 1)
        blocks: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            norm = nn.BatchNorm1d(b) if layers > 2 else nn.Identity()
            blocks.append(nn.Sequential(nn.Linear(a, b, bias=layers == 2), norm, nn.ReLU(inplace=True)))
        blocks.append(nn.Sequential(nn.Linear(dims[-1], dim_out)))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, h: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        for block in self.blocks[: self.layers if layer is None else layer]:
            h = block(h)
        return h


class SimCLR(nn.Module):
    """Encoder f and projection head g: x -> h = f(x) -> z = g(h). The loss sees z; users get h."""

    def __init__(self, encoder: ResNetEncoder, head: ProjectionHead):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)  # (B, feature_dim)
        return h, self.head(h)  # (B, head_out)


def build_model(model_cfg) -> SimCLR:
    """ModelConfig -> SimCLR module (encoder + projection head)."""
    encoder = encoder_from(model_cfg)
    head = ProjectionHead(encoder.feature_dim, model_cfg.head_hidden, model_cfg.head_out, model_cfg.head_layers)
    return SimCLR(encoder, head)
