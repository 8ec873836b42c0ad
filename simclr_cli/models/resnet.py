"""ResNet encoders (CIFAR or ImageNet stem, any width), and reading torchvision-style ResNet state dicts.

The ResNet here uses torchvision's module names and initialisation, so at width 64 an encoder's state
dict loads into `torchvision.models.resnet18()` (stem adjusted, `fc = nn.Identity()`) with strict=True.
Widths other than 64 are this project's own: on a 2-core CPU a width-32 ResNet-18 trains about 3x
faster than width 64, which decides what a CPU budget can learn. The original design saved its encoder
as `nn.Sequential(*list(resnet18.children())[:-1])`; `torchvision_keys` renames such a state dict.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from simclr_cli.errors import CheckpointError

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
        """What rebuilds it (`models.encoder_from_spec`), and the size of h."""
        return {"arch": self.arch, "stem": self.stem, "width": self.width, "feature_dim": self.feature_dim}


def sequential_to_torchvision(state: dict, path: Path) -> dict:
    """Keys of nn.Sequential(*list(resnet.children())[:-1]) -> torchvision's: the conv with 3 input channels
    is conv1, the batch norm after it bn1, and the four indices holding blocks (N.0.conv1.weight) layer1-4;
    found by content rather than fixed indices 0, 1, 4-7, so a copy that dropped the max-pool loads too."""
    indices = sorted({int(k.split(".", 1)[0]) for k in state})
    stages = [i for i in indices if f"{i}.0.conv1.weight" in state]
    convs = [i for i in indices if getattr(state.get(f"{i}.weight"), "ndim", 0) == 4]
    norms = [i for i in indices if f"{i}.running_mean" in state]
    if len(stages) != 4 or len(convs) != 1 or len(norms) != 1:
        raise CheckpointError(f"{path} has numbered keys but is not nn.Sequential(*list(resnet.children())[:-1]) "
                              f"(found {len(convs)} stem conv, {len(norms)} stem norm, {len(stages)} of 4 stages)")
    names = {convs[0]: "conv1", norms[0]: "bn1", **{i: f"layer{n + 1}" for n, i in enumerate(stages)}}
    out = {}
    for key, value in state.items():
        index, rest = key.split(".", 1)
        if int(index) not in names:
            raise CheckpointError(f"{path}: unexpected key {key} for a ResNet without its classifier")
        out[f"{names[int(index)]}.{rest}"] = value
    return out


def infer_resnet(state: dict, path: Path) -> tuple[str, str, int]:
    """(arch, stem, width) of a torchvision-style ResNet state dict, from its shapes and block counts."""
    w = state["conv1.weight"]
    if w.ndim != 4 or w.shape[1] != 3:
        raise CheckpointError(f"{path}: conv1.weight has shape {tuple(w.shape)}; expected (width, 3, k, k)")
    stem = {3: "cifar", 7: "imagenet"}.get(w.shape[-1])
    if stem is None:
        raise CheckpointError(f"{path}: a {w.shape[-1]}x{w.shape[-1]} first conv is neither the CIFAR stem (3x3) "
                              "nor the ImageNet stem (7x7)")
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    depths = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    for arch, spec in ARCHS.items():
        if spec == (block, depths):
            return arch, stem, int(w.shape[0])
    raise CheckpointError(f"{path}: a ResNet with {depths} {block} blocks per stage is none of {', '.join(ARCHS)}")


class BuiltInResNets:
    """The policy of the built-in ResNets (model.arch resnet18, resnet34, resnet50), as a family declares
    its own (`models.library.LibraryFamily`): at width 64 their state dict is torchvision's ResNet's, whose
    classifier is `fc`."""

    prefix = ""
    formats = ("torchvision",)

    @staticmethod
    def classifier_keys(encoder: nn.Module) -> tuple[str, ...]:
        return ("fc.",)

    @staticmethod
    def library_state(encoder: nn.Module, fmt: str) -> dict:
        width = encoder.describe().get("width")
        if width != 64:
            raise CheckpointError(f"the torchvision format needs width 64 (torchvision's ResNet); this encoder has width "
                                  f"{width}: use --format native")
        return {k: v.detach().cpu() for k, v in encoder.state_dict().items()}

    @staticmethod
    def from_library_keys(state: dict) -> dict:
        return state  # torchvision's keys are ours

    def warm_state(self, state: dict, encoder: nn.Module, path: Path) -> dict:
        """torchvision's ResNet state dict (or the original design's nn.Sequential one) without its classifier."""
        if all(k.split(".", 1)[0].isdigit() for k in state):
            state = sequential_to_torchvision(state, path)
        return {k: v for k, v in state.items() if not k.startswith(self.classifier_keys(encoder))}

    @staticmethod
    def load_hint(encoder: nn.Module, fmt: str, load: str) -> str:
        spec = encoder.describe()
        cifar = ("; m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); m.maxpool = torch.nn.Identity()"
                 if spec["stem"] == "cifar" else "")
        return f"m = torchvision.models.{spec['arch']}(){cifar}; m.fc = torch.nn.Identity(); m.{load}"


RESNETS = BuiltInResNets()
