"""Backbones from torchvision and timm: each family through the whole chain (pretrain -> extract -> probe ->
embed, the exported state dict loading strictly into the library's own constructor and giving the same h),
small images, warm start from files made here (never a download), the optimiser's groups, bad input."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import tiny_config, tiny_overrides
from PIL import Image

from simclr_cli.config import load_config
from simclr_cli.errors import CheckpointError, ConfigError, MissingExtraError
from simclr_cli.serve.embed import embed_images
from simclr_cli.exports.extract import extract_encoder
from simclr_cli.score.probe import run_probe
from simclr_cli.models import build_encoder, check_encoder, library
from simclr_cli.models.encoder_file import load_encoder
from simclr_cli.train import Trainer, pretrain
from simclr_cli.train.loop import start_panel
from simclr_cli.train.optim import param_groups
from simclr_cli.train.state import load_checkpoint

timm = pytest.importorskip("timm")  # the test extra installs it

pytestmark = pytest.mark.usefixtures("one_thread")

# on top of the shared tiny run (tests/conftest.py); None: the config's default
RUN = {"synthetic_size": 32, "image_size": 32, "epochs": 1, "log_every": 1, "width": None, "precision": None,
       "train.eval_every": 0, "data.val_size": 8}
FAMILIES = {  # model.arch and model.kwargs of one small model per family the README names
    "mobile net": ("torchvision:mobilenet_v3_small", {}),
    "EfficientNet": ("torchvision:efficientnet_b0", {}),
    "ConvNeXt": ("torchvision:convnext_tiny", {}),
    "torchvision ViT": ("torchvision:vit_b_16", {"image_size": 32}),
    "timm ViT": ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}),
}


def backbone(out: Path, arch: str, kwargs: dict, *extra: str):
    """The tiny run of this file with model.arch `arch` built with `kwargs`."""
    return tiny_config(out, f"model.arch={arch}", f"model.kwargs={json.dumps(kwargs)}", *extra, **RUN)


def library_model(arch: str, kwargs: dict, stem: str) -> torch.nn.Module:
    """The library's own constructor with the classifier removed (and, for 32-pixel runs, the stem changed
    the way the encoder was): what a user of the exported state dict builds."""
    family, _, name = arch.partition(":")
    if family == "timm":
        m = timm.create_model(name, num_classes=0, **kwargs)
    else:
        m = torchvision.models.get_model(name, **kwargs)
        library.drop_classifier(m, arch)
    if stem == "cifar":
        library.adapt_to_small_images(m)
    return m.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_runs_the_whole_chain(tmp_path, family):
    arch, kwargs = FAMILIES[family]
    summary = pretrain(backbone(tmp_path / "run", arch, kwargs))
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"]) and summary["knn_top1"] is not None
    fmt = arch.split(":")[0]
    info = extract_encoder(tmp_path / "run" / "checkpoint.pt", tmp_path / f"{fmt}.pth", fmt=fmt)
    assert info["arch"] == arch and info["kwargs"] == kwargs and fmt in info["load"]
    state = torch.load(tmp_path / f"{fmt}.pth", weights_only=True)
    theirs = library_model(arch, kwargs, info["stem"])
    theirs.load_state_dict(state, strict=True)  # the library's own model, classifier removed
    ours = load_encoder(tmp_path / "run" / "encoder.pth")  # rebuilt from the file alone
    assert ours.encoder.describe()["arch"] == arch and ours.image_size == 32
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours.encoder(x), rtol=1e-4, atol=1e-5)
    report = run_probe(tmp_path / "run" / "encoder.pth", "synthetic", device="cpu", synthetic_size=40)
    assert 0 <= report["results"]["trained"]["knn_top1"] <= 1
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    result = embed_images(tmp_path, tmp_path / "run" / "encoder.pth", tmp_path / "h.npy", device="cpu")
    assert np.load(tmp_path / "h.npy").shape == (3, ours.encoder.feature_dim) and result.rows == 3


def test_a_library_model_resumes_exactly(tmp_path):
    arch, kwargs = FAMILIES["mobile net"]
    straight = pretrain(backbone(tmp_path / "a", arch, kwargs, "train.epochs=2"))
    pretrain(backbone(tmp_path / "b", arch, kwargs))
    resumed = pretrain(backbone(tmp_path / "b", arch, kwargs, "train.epochs=2"), resume=True)
    assert resumed["final_loss"] == straight["final_loss"]
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt")["model"] for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_small_images_get_the_family_stem_and_the_panel_says_what_the_network_sees(tmp_path):
    cifar = build_encoder(backbone(tmp_path, "torchvision:mobilenet_v3_small", {}).model, 32)
    assert cifar.net.features[0][0].stride == (1, 1) and "2x2 at 32 px" in cifar.notes[-1]
    full = build_encoder(backbone(tmp_path, "torchvision:mobilenet_v3_small", {}, "model.stem=imagenet").model, 32)
    assert "1x1 at 32 px: the network sees one pixel" in full.notes[-1]
    resnet = build_encoder(backbone(tmp_path, "torchvision:resnet18", {}).model, 32)
    assert resnet.net.conv1.kernel_size == (3, 3) and isinstance(resnet.net.maxpool, torch.nn.Identity)
    trainer = Trainer(backbone(tmp_path / "run", "torchvision:mobilenet_v3_small", {}, "model.stem=imagenet"))
    assert "sees one pixel" in start_panel(trainer)["model"]


def test_a_vit_trains_contiguous_and_a_fixed_image_size_refuses_other_views(tmp_path):
    vit = Trainer(backbone(tmp_path / "vit", *FAMILIES["timm ViT"]))
    assert not vit.model.encoder.convolutional and vit.augment.memory_format == torch.contiguous_format
    conv = Trainer(backbone(tmp_path / "conv", *FAMILIES["mobile net"]))
    assert conv.augment.memory_format == torch.channels_last
    with pytest.raises(ConfigError, match="does not take 24-pixel images, which augment asks for"):
        Trainer(backbone(tmp_path / "fixed", *FAMILIES["torchvision ViT"], "augment.view_size=24"))
    dynamic = FAMILIES["timm ViT"][0], {**FAMILIES["timm ViT"][1], "dynamic_img_size": True}
    Trainer(backbone(tmp_path / "dynamic", *dynamic, "augment.view_size_start=16"))  # timm's ViT takes any size


def test_no_decay_on_norms_biases_class_tokens_and_position_embeddings():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4)
    decayed, excluded = (set(map(id, g["params"])) for g in param_groups(vit, 1e-4))
    names = dict(vit.named_parameters())
    for name in ("cls_token", "pos_embed", "norm.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"):
        assert id(names[name]) in excluded, name
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"):
        assert id(names[name]) in decayed, name


def test_warm_start_from_a_library_state_dict_made_here(tmp_path):
    torch.manual_seed(7)
    source = torchvision.models.mobilenet_v3_small()  # with its classifier, as torchvision saves it
    torch.save(source.state_dict(), tmp_path / "mobilenet.pth")
    cfg = backbone(tmp_path / "run", "torchvision:mobilenet_v3_small", {}, f"model.init={tmp_path / 'mobilenet.pth'}")
    trainer = Trainer(cfg)
    ours = trainer.model.encoder.net.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in source.state_dict().items() if k in ours)
    assert len(ours) == len(source.state_dict()) - 2  # all but the classifier's last linear (weight, bias)
    target = trainer.method.model.encoder.state_dict()
    assert all(torch.equal(target[k], ours[k.removeprefix("net.")]) for k in target if k.startswith("net."))


def test_warm_start_from_another_architecture_is_one_line_and_writes_nothing(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    cfg = backbone(tmp_path / "run", "torchvision:mobilenet_v3_small", {}, f"model.init={tmp_path / 'resnet18.pth'}")
    with pytest.raises(CheckpointError, match=r"does not fit torchvision:mobilenet_v3_small .*missing .*unexpected"):
        pretrain(cfg)
    assert not (tmp_path / "run").exists()
    built_in = load_config(None, tiny_overrides(f"model.init={tmp_path / 'resnet18.pth'}", "model.stem=imagenet",
                                                **RUN))
    encoder = build_encoder(built_in.model, 32)  # torchvision's ResNet-18 into the built-in one, width 64
    assert torch.equal(encoder.conv1.weight, torch.load(tmp_path / "resnet18.pth", weights_only=True)["conv1.weight"])
    cifar = load_config(None, tiny_overrides(f"model.init={tmp_path / 'resnet18.pth'}", **RUN))
    with pytest.raises(CheckpointError, match=r"another shape: conv1.weight \(64, 3, 7, 7\) \(expected \(64, 3, 3, 3\)\)"):
        build_encoder(cifar.model, 32)


def test_pretrained_weights_offline_is_one_line(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    for arch in ("torchvision:mobilenet_v3_small", "resnet18"):
        cfg = backbone(tmp_path, arch, {}, "model.init=pretrained", "model.stem=imagenet")
        with pytest.raises(ConfigError, match="could not fetch .*pretrained weights .*URLError.*give model.init a "
                                              "weights file instead"):
            build_encoder(cfg.model, 32)


@pytest.mark.parametrize("arch, kwargs, message", [
    ("torchvision:mobilenet_v3_smal", {}, "did you mean torchvision:mobilenet_v3_small"),
    ("timm:vit_tiny_patch16", {}, "did you mean .*timm:vit_tiny_patch16_224"),
    ("mobilenet", {}, "FAMILY:NAME"),
    ("torchvision:squeezenet1_0", {}, "has no nn.Linear classifier"),
    ("torchvision:resnet18", {"nonsense": 1}, "'model.kwargs.nonsense' is not a keyword"),
    ("torchvision:resnet18", {"groups": 2}, "refuses model.kwargs .* only supports groups=1"),  # a ValueError inside
    ("torchvision:googlenet", {"init_weights": False}, "gives GoogLeNetOutputs, not .batch, features."),
])
def test_bad_models_are_one_line_each(tmp_path, arch, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(backbone(tmp_path / "run", arch, kwargs))
    assert not (tmp_path / "run").exists()


def test_timm_without_timm_names_the_extra(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a))
    with pytest.raises(MissingExtraError, match=r"pip install 'simclr-cli\[timm\]'"):
        check_encoder("timm:vit_tiny_patch16_224")


@pytest.mark.parametrize("method", ["moco", "byol"])
def test_the_momentum_methods_train_a_library_model(tmp_path, method):
    summary = pretrain(backbone(tmp_path, *FAMILIES["mobile net"], f"method.name={method}"))
    assert np.isfinite(summary["final_loss"]) and load_encoder(tmp_path / "encoder.pth").encoder.feature_dim == 1024


def test_a_vit_that_takes_any_size_trains_on_progressive_and_small_views(tmp_path):
    arch, kwargs = FAMILIES["timm ViT"]
    cfg = backbone(tmp_path, arch, {**kwargs, "dynamic_img_size": True}, "augment.view_size_start=16",
                   "augment.view_size=24", "augment.small_crops=1", "augment.small_crop_size=16")
    assert np.isfinite(pretrain(cfg)["final_loss"])
