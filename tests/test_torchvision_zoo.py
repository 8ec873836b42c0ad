"""Every classification model of torchvision at 32 pixels, as a user would name it (`model.arch:
torchvision:NAME`): built with its small-image stem, one forward in training and in eval mode, and its state
round-tripped through the encoder file (torch.save, a weights_only load, a strict load) to the same h. One
family's quirk cannot hide: MNASNet's loader needs the state's `_metadata`, which a plain dict copy lost.
The models that cannot be an encoder at 32 px are listed with the one line they get. Slow: about 3 minutes
on two cores, most of it building the largest models. The largest models of a family are left out: the same
class and code paths as the family's smaller ones, only wider and deeper, and each 9 to 80 s of CI to build:
regnet_y_128gf (637M parameters) and regnet_y_32gf (thirteen other RegNets stay), vit_h_14 (632M), vit_l_16 and
vit_l_32 (vit_b_16 and vit_b_32 stay), convnext_large (three other ConvNeXts), efficientnet_v2_l (the _s and
_m stay), and vgg16, vgg19 with their _bn twins (vgg11 and vgg13, plain and _bn, stay)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torchvision

from simclr_cli.config import load_config
from simclr_cli.errors import ConfigError
from simclr_cli.models import build_encoder
from simclr_cli.models.encoder_file import encoder_payload, read_encoder

KEYWORDS = {  # what a user gives a model for 32-pixel images; (keywords, image size)
    **{name: ({"image_size": 32}, 32) for name in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32")},
    "googlenet": ({"aux_logits": False}, 32),  # else training returns (logits, aux1, aux2)
    "inception_v3": ({"aux_logits": False}, 32),  # its auxiliary head's 5x5 convolution needs 75 px and up
}
REFUSED = {  # the models that are no encoder at 32 px, and the line each gets
    "squeezenet1_0": "has no nn.Linear classifier to remove",  # a convolutional classifier
    "squeezenet1_1": "has no nn.Linear classifier to remove",
    "maxvit_t": "does not run on 32-pixel images",  # 7x7 window partitions of a 224-pixel grid
}
LEFT_OUT = {"regnet_y_128gf", "regnet_y_32gf", "vit_h_14", "vit_l_16", "vit_l_32", "convnext_large",  # see the
            "efficientnet_v2_l", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"}  # module docstring


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in torchvision.models.list_models(module=torchvision.models)
                                  if n not in LEFT_OUT])
def test_every_torchvision_model_at_32_pixels(name):
    kwargs, size = KEYWORDS.get(name, ({}, 32))
    cfg = load_config(None, [f"model.arch=torchvision:{name}", f"data.image_size={size}",
                             f"model.kwargs={json.dumps(kwargs)}"])
    torch.manual_seed(0)
    if name in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[name]):
            build_encoder(cfg.model, size)
        return
    encoder = build_encoder(cfg.model, size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert encoder.train()(x).shape == (2, encoder.feature_dim)
        h = encoder.eval()(x)
    buffer = io.BytesIO()
    torch.save(encoder_payload(encoder, cfg), buffer)
    buffer.seek(0)
    loaded = read_encoder(torch.load(buffer, weights_only=True), Path(f"{name}.pth"))
    with torch.no_grad():
        assert torch.equal(loaded.encoder(x), h)
