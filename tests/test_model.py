"""Encoders and heads: shapes, stems, widths, and loading into torchvision without conversion."""

import pytest
import torch
import torchvision
from torch import nn

from simclr_cli.config import ModelConfig
from simclr_cli.models import ProjectionHead, ResNetEncoder, build_model


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_state_dict_loads_into_torchvision_strictly(arch, dim, stem):
    enc = ResNetEncoder(arch, stem)
    assert enc.feature_dim == dim
    tv = getattr(torchvision.models, arch)()
    if stem == "cifar":
        tv.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        tv.maxpool = nn.Identity()
    tv.fc = nn.Identity()
    tv.load_state_dict(enc.state_dict(), strict=True)
    enc.eval(), tv.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc(x), tv(x))


def test_cifar_stem_keeps_resolution_imagenet_stem_downsamples():
    x = torch.randn(2, 3, 32, 32)
    cifar, imagenet = ResNetEncoder(stem="cifar"), ResNetEncoder(stem="imagenet")
    assert cifar.maxpool(cifar.conv1(x)).shape[-1] == 32
    assert imagenet.maxpool(imagenet.conv1(x)).shape[-1] == 8


def test_width_scales_channels():
    enc = ResNetEncoder("resnet18", "cifar", width=16)
    assert enc.feature_dim == 128 and enc(torch.randn(3, 3, 32, 32)).shape == (3, 128)


def test_unknown_arch_or_stem():
    with pytest.raises(ValueError, match="resnet18"):
        ResNetEncoder("vgg")
    with pytest.raises(ValueError, match="cifar or imagenet"):
        ResNetEncoder(stem="tiny")


@pytest.mark.parametrize("layers", [2, 3])
def test_projection_head_layers_and_intermediate_outputs(layers):
    head = ProjectionHead(64, 32, 16, layers)
    h = torch.randn(5, 64)
    assert head(h).shape == (5, 16)
    assert torch.equal(head(h, layer=0), h)
    assert head(h, layer=1).shape == (5, 32)
    assert len(head.blocks) == layers
    assert sum(isinstance(m, nn.Linear) for m in head.modules()) == layers


def test_simclr_returns_h_before_the_head():
    model = build_model(ModelConfig(width=8, head_out=7)).eval()
    x = torch.randn(4, 3, 32, 32)
    h, z = model(x)
    assert h.shape == (4, 64) and z.shape == (4, 7)
    torch.testing.assert_close(h, model.encoder(x))
    torch.testing.assert_close(z, model.head(h))
