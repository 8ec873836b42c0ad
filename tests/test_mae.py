"""MAE (method.name=mae): the masked pass through timm's and torchvision's own ViT layers and the loss against
a per-image oracle written from the paper, the loss scoring hidden patches only, every parameter trained, the
one-line refusals, two gloo ranks, bit-exact resume, the CLI chain on an MAE run, and the reconstructions."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from conftest import straight_and_resumed, tiny_config, tiny_set_args
from PIL import Image
from ranks import run_ranks  # tests/ranks.py
from typer.testing import CliRunner

from simclr_cli.augment import Augmenter
from simclr_cli.cli import app
from simclr_cli.config import load_config
from simclr_cli.errors import ConfigError
from simclr_cli.methods.mae import MAEMethod, mae_from_checkpoint, masked_mse
from simclr_cli.methods.masked_vit import MaskedAutoencoder, patchify, unpatchify
from simclr_cli.models.library import LibraryEncoder, drop_classifier
from simclr_cli.train.state import load_checkpoint

pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

# A ViT of 16 patches of 4 px at 16 px, one block of width 32; a decoder of one block of width 32.
VIT = "{img_size: 16, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2}"
RUN = {"method.name": "mae", "model.arch": "timm:vit_tiny_patch16_224", "model.kwargs": VIT,
       "method.mae.decoder_depth": 1, "method.mae.decoder_width": 32, "method.mae.decoder_heads": 2,
       "optim.name": "adamw", "optim.lr": 1e-3, "optim.warmup_epochs": 1, "augment.crop_scale_min": 0.2}
NO_AUTOCAST = contextlib.nullcontext()


def timm_mae(tmp_path, *extra: str) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MAEMethod(tiny_config(tmp_path, *extra, **RUN)).model


def torchvision_mae() -> MaskedAutoencoder:
    """torchvision's VisionTransformer at tiny sizes, built directly: its builders (vit_b_16, ...) fix the
    patch size and width, so a config can ask for ViT-B and up only (tested below)."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    net = VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64)
    removed = drop_classifier(net, "torchvision:vit")
    return MaskedAutoencoder(LibraryEncoder("torchvision:vit", net, {}, "cifar", removed, [], 16), "torchvision",
                             0.75, 1, 32, 2)


@pytest.fixture(params=["timm", "torchvision"])
def mae(request, tmp_path) -> MaskedAutoencoder:
    return (timm_mae(tmp_path) if request.param == "timm" else torchvision_mae()).eval()


def batch(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(views (B, 3, 16, 16) as normalised pixels, masking noise (B, 16))."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 16, 16, generator=g), torch.rand(b, 16, generator=g)


# --- the masked pass and the loss against the paper ----------------------------------------------------------

def sincos_oracle(n: int, grid: int, width: int) -> torch.Tensor:
    """MAE's 2-D sin-cos embedding of patch n, channel by channel: row then column, each sin then cos."""
    r, c = divmod(n, grid)
    q = width // 4
    w = [1.0 / 10000 ** (i / q) for i in range(q)]
    return torch.tensor([f(pos * w[i]) for pos in (r, c) for f in (math.sin, math.cos) for i in range(q)],
                        dtype=torch.float64)


def encoder_parts(m: MaskedAutoencoder):
    """(patch projection, class token, position embeddings (1 + N, D), blocks + final norm) of either ViT."""
    net = m.encoder.net
    if m.family == "timm":
        return net.patch_embed.proj, net.cls_token[0, 0], net.pos_embed[0], lambda t: net.norm(net.blocks(t))
    e = net.encoder
    return net.conv_proj, net.class_token[0, 0], e.pos_embedding[0], lambda t: e.ln(e.layers(t))


def mae_oracle(model: MaskedAutoencoder, x: torch.Tensor, noise: torch.Tensor, ratio: float) -> float:
    """Section 3 of the paper, one image and one patch at a time in float64: keep the round(N (1 - ratio))
    patches of lowest noise, embed each (a linear map of its pixels plus its position), encode them with
    the class token, decode with the mask token at every hidden place, score the hidden patches' pixels,
    each patch normalised by its own mean and variance."""
    m = copy.deepcopy(model).double().eval().requires_grad_(False)
    proj, cls, pos, blocks = encoder_parts(m)
    d, p, n = m.decoder, m.patch, noise.shape[1]
    grid, keep, losses = math.isqrt(n), round(n * (1 - ratio)), []
    for b in range(len(x)):
        seen = sorted(sorted(range(n), key=lambda i: float(noise[b, i]))[:keep])
        pixels = [x[b, :, (i // grid) * p:(i // grid + 1) * p, (i % grid) * p:(i % grid + 1) * p].double()
                  for i in range(n)]  # (3, p, p) each
        tokens = [cls + pos[0]] + [(proj.weight * pixels[i]).sum((1, 2, 3)) + proj.bias + pos[1 + i] for i in seen]
        e = d.embed(blocks(torch.stack(tokens)[None]))[0]  # (1 + K, W)
        seq = [e[0]] + [(e[1 + seen.index(i)] if i in seen else d.mask_token)
                        + sincos_oracle(i, grid, len(d.mask_token)) for i in range(n)]
        pred = d.pred(d.norm(d.blocks(torch.stack(seq)[None])))[0, 1:]  # (N, p * p * 3)
        for i in sorted(set(range(n)) - set(seen)):
            t = pixels[i].permute(1, 2, 0).flatten()  # row by row, then channel
            t = (t - t.mean()) / (t.var() + 1e-6).sqrt()
            losses.append(((pred[i] - t) ** 2).mean())
    return float(torch.stack(losses).mean())


def test_the_loss_matches_the_per_image_oracle(mae):
    x, noise = batch()
    pred, mask = mae(x, noise)
    loss = masked_mse(pred, patchify(x, 4), mask, True)
    assert loss.item() == pytest.approx(mae_oracle(mae, x, noise, 0.75), rel=1e-5)


def test_each_image_keeps_the_same_number_of_patches_those_of_lowest_noise(mae):
    x, noise = batch(b=4)
    encoded, ids = mae.encode(x, noise)
    assert encoded.shape == (4, 1 + 4, 32)  # the class token and round(16 * 0.25) = 4 patches, every image
    torch.testing.assert_close(ids, noise.argsort(dim=1)[:, :4].sort(dim=1).values)
    _, mask = mae(x, noise)
    assert mask.sum(dim=1).tolist() == [12.0] * 4 and not mask.gather(1, ids).any()


def test_the_encoder_never_sees_a_hidden_patch(mae):
    x, noise = batch()
    pred, mask = mae(x, noise)
    ones = patchify(torch.ones_like(x), 4)  # (B, N, 48)
    hidden_moved = x + 5 * unpatchify(ones * mask[..., None], 4)  # every hidden patch's pixels changed
    torch.testing.assert_close(mae(hidden_moved, noise)[0], pred, rtol=0, atol=1e-5)
    seen_moved = x + 5 * unpatchify(ones * (1 - mask[..., None]), 4)
    assert not torch.allclose(mae(seen_moved, noise)[0], pred, atol=1e-3)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_the_loss_scores_the_hidden_patches_only(norm_pix):
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 2, 8, 12, generator=g)
    mask = torch.zeros(2, 8)
    mask[:, [1, 4, 6]] = 1  # three hidden patches per image
    loss = masked_mse(pred, target, mask, norm_pix)
    visible, hidden = target.clone(), target.clone()
    visible[:, 0] += 3.0 * torch.randn(2, 12, generator=g)
    hidden[:, 4] += 3.0 * torch.randn(2, 12, generator=g)
    assert masked_mse(pred, visible, mask, norm_pix).item() == loss.item()
    assert masked_mse(pred, hidden, mask, norm_pix).item() != pytest.approx(loss.item(), rel=1e-3)
    t = target.double()
    if norm_pix:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    oracle = sum(((pred[b, i].double() - t[b, i]) ** 2).mean() for b in range(2) for i in (1, 4, 6)) / 6
    assert loss.item() == pytest.approx(oracle.item(), rel=1e-6)


@pytest.mark.parametrize("build", ["timm", "timm global_pool avg", "torchvision"])
def test_every_parameter_learns_from_one_step(tmp_path, build):
    """DDP without find_unused_parameters needs a gradient for every parameter at every step."""
    if build == "torchvision":
        model = torchvision_mae()
    else:
        kwargs = VIT[:-1] + ", global_pool: avg}" if "avg" in build else VIT
        model = timm_mae(tmp_path, f"model.kwargs={kwargs}")
    x, noise = batch()
    pred, mask = model(x, noise)
    masked_mse(pred, patchify(x, 4), mask, True).backward()
    assert not [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


def test_bf16_autocast_gives_the_fp32_loss_within_bf16_rounding(tmp_path):
    torch.manual_seed(0)
    method = MAEMethod(tiny_config(tmp_path, **RUN))
    views = method.views(Augmenter("simclr", 16), torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8),
                         torch.Generator().manual_seed(0), 16)
    fp32 = method.loss(method.model, views, NO_AUTOCAST)
    bf16 = method.loss(method.model, views, torch.autocast("cpu", dtype=torch.bfloat16))
    assert bf16.dtype == torch.float32 and bf16.item() == pytest.approx(fp32.item(), rel=0.05)


# --- the one-line refusals ----------------------------------------------------------------------------------------

def one_line_refusal(args: list[str]) -> str:
    result = CliRunner().invoke(app, ["pretrain", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def test_a_convnet_is_refused_in_one_line_naming_the_vits(tmp_path):
    out = one_line_refusal(["-o", str(tmp_path / "run"), *tiny_set_args("method.name=mae", "model.arch=resnet18")])
    assert "needs a ViT encoder" in out and "timm:vit_tiny_patch16_224" in out and "torchvision:vit_b_16" in out


def test_the_convnet_refusal_comes_before_the_data_loads(tmp_path):
    """The networks are built before the data: a folder that is not there is never read (its own line would
    come first otherwise), and no checkpoint is written."""
    out = one_line_refusal(["-o", str(tmp_path / "run"), *tiny_set_args(
        "method.name=mae", "model.arch=resnet18", "data.dataset=folder", f"data.root={tmp_path / 'absent'}")])
    assert "needs a ViT encoder" in out
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("ratio", ["0", "1"])
def test_a_mask_ratio_of_none_or_all_is_refused_in_one_line(tmp_path, ratio):
    out = one_line_refusal(["-o", str(tmp_path / "run"),
                            *tiny_set_args("method.name=mae", f"method.mae.mask_ratio={ratio}")])
    assert "'method.mae.mask_ratio' must be in (0, 1)" in out


@pytest.mark.parametrize("overrides, message", [
    (["method.mae.decoder_width=32", "method.mae.decoder_heads=3"],
     "'method.mae.decoder_width' must be divisible by method.mae.decoder_heads; got 32 and 3"),
    (["method.mae.decoder_width=30", "method.mae.decoder_heads=3"], "'method.mae.decoder_width' must be a multiple of 4"),
    (["method.mae.decoder_depth=0"], "'method.mae.decoder_depth' must be >= 1"),
    (["method.mae.decoder_heads=0"], "'method.mae.decoder_heads' must be >= 1"),
])
def test_bad_decoder_sizes_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=["method.name=mae", *overrides])


@pytest.mark.parametrize("ratio", ["0.99", "0.01"])  # of 16 patches: round(0.16) = 0 seen, round(15.84) = 16 seen
def test_a_ratio_that_leaves_none_seen_or_none_hidden_at_this_size_is_one_line(tmp_path, ratio):
    with pytest.raises(ConfigError, match=rf"^'method.mae.mask_ratio' {ratio} of 16 patches \(16 px\) leaves"):
        timm_mae(tmp_path, f"method.mae.mask_ratio={ratio}")


def test_torchvision_vits_build_from_the_config_at_their_own_patch_size(tmp_path):
    """torchvision's builders fix the patch size: {image_size: 32} works (ViT-B/16: 4 patches at 32 px), and
    a patch_size is refused by the builder in one line."""
    sizes = ("method.name=mae", "method.mae.decoder_depth=1", "method.mae.decoder_width=32",
             "method.mae.decoder_heads=2", "model.arch=torchvision:vit_b_16")
    torch.manual_seed(0)
    method = MAEMethod(tiny_config(tmp_path, *sizes, "model.kwargs={image_size: 32}", image_size=32))
    assert method.model.family == "torchvision" and method.model.patch == 16
    views = method.views(Augmenter("simclr", 32), torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
                         torch.Generator().manual_seed(0), 32)
    assert views.pair.shape == (2, 3, 32, 32) and views.noise.shape == (2, 4)
    assert torch.isfinite(method.loss(method.model, views, NO_AUTOCAST))
    with pytest.raises(ConfigError, match="refuses model.kwargs .*patch_size"):
        MAEMethod(tiny_config(tmp_path, *sizes, "model.kwargs={image_size: 32, patch_size: 4}", image_size=32))


# --- two gloo ranks -------------------------------------------------------------------------------------------------

def _step(net: torch.nn.Module, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    pred, mask = net(x, noise)
    return masked_mse(pred, patchify(x, 4), mask, True)


def _rank(rank: int, model: MaskedAutoencoder, x: torch.Tensor, noise: torch.Tensor, out_dir: str) -> None:
    mine = slice(rank * len(x) // 2, (rank + 1) * len(x) // 2)
    net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    local = x[mine].clone().requires_grad_()
    loss = _step(net, local, noise[mine])
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}  # averaged over the ranks by DDP
    _step(net, local.detach(), noise[mine]).backward()  # a second step: DDP fails here had a parameter no gradient
    torch.save({"loss": loss.detach(), "input": local.grad, "params": grads}, os.path.join(out_dir, f"{rank}.pt"))


def test_two_ranks_give_the_loss_and_gradients_of_one_process(tmp_path):
    model = timm_mae(tmp_path)
    x, noise = batch(b=4, seed=2)
    run_ranks(_rank, (model, x, noise, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    whole = x.clone().requires_grad_()
    single = _step(model, whole, noise)
    single.backward()
    # Every image hides the same number of patches: the whole batch's mean is the mean of the ranks' means.
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(single.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat([r["input"] for r in ranks]) / 2, whole.grad, atol=1e-6, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ranks[0]["params"][name], p.grad, atol=1e-6, rtol=1e-4)


# --- resume, bit for bit --------------------------------------------------------------------------------------------

def run_state(out) -> tuple[list, dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in r.items() if k not in ("views_per_s", "data_wait", "eval_s")} for r in lines
               if r["kind"] not in ("resume",)]
    return metrics, load_checkpoint(out / "checkpoint.pt")["model"]


def test_resume_mid_epoch_is_bit_exact(tmp_path, monkeypatch):
    runs = straight_and_resumed(tmp_path, monkeypatch, **RUN)
    (straight, weights), (resumed, resumed_weights) = (run_state(run) for run in runs)
    assert [r for r in straight if r["kind"] != "eval"] == [r for r in resumed if r["kind"] != "eval"]
    assert weights.keys() == resumed_weights.keys() and all(torch.equal(weights[k], resumed_weights[k]) for k in weights)
    losses = [r["loss"] for r in straight if r["kind"] == "epoch"]
    assert losses[-1] < losses[0]  # it learns: the loss falls over the three epochs
    evals = [r for r in straight if r["kind"] == "eval"]  # the monitor's health figures, on h itself
    assert evals and evals[-1]["rank_h"] == evals[-1]["rank_z"]


# --- an MAE run through the CLI: extract, probe, embed, finetune; reconstructions -------------------------------

@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    """One epoch through `simclr pretrain`, at the precision `auto` gives here (SIMCLR_PRECISION)."""
    out = tmp_path_factory.mktemp("mae") / "run"
    sets = tiny_set_args(*[f"{k}={v}" for k, v in RUN.items()], "train.epochs=1", precision=None)
    result = CliRunner().invoke(app, ["pretrain", "-o", str(out), *sets])
    assert result.exit_code == 0, result.output
    assert any(ln.split()[1:3] == ["method", "mae"] for ln in result.stderr.splitlines() if len(ln.split()) > 2)
    return out


def test_cli_chain_extract_probe_embed_finetune(mae_run, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["extract", str(mae_run / "checkpoint.pt"), "-o", str(tmp_path / "enc.pth")])
    assert r.exit_code == 0, r.output
    encoder = torch.load(tmp_path / "enc.pth", weights_only=True)
    assert "head" not in encoder and all(not k.startswith("decoder") for k in encoder["state_dict"])
    r = runner.invoke(app, ["probe", str(tmp_path / "enc.pth"), "--dataset", "synthetic", "--synthetic-size", "40",
                            "--device", "cpu", "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p.json").read_text())["encoder"]["provenance"]["method"] == "mae"
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
    r = runner.invoke(app, ["embed", str(tmp_path / "img"), "-e", str(tmp_path / "enc.pth"), "-o",
                            str(tmp_path / "v.npy"), "--num-workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "v.npy").shape == (3, 32)  # the ViT's class token, its width
    r = runner.invoke(app, ["finetune", str(tmp_path / "enc.pth"), "--dataset", "synthetic", "--synthetic-size", "100",
                            "--device", "cpu", "--labels", "4", "--epochs", "1", "--batch-size", "16",
                            "-o", str(tmp_path / "c.pth")])
    assert r.exit_code == 0, r.output


def test_reconstructions_show_the_original_where_seen(mae_run):
    ckpt = load_checkpoint(mae_run / "checkpoint.pt")
    state = torch.get_rng_state()
    method = mae_from_checkpoint(ckpt["config"], ckpt["model"])
    assert torch.equal(torch.get_rng_state(), state) and not method.model.training
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    original, masked, rebuilt = method.reconstruct(images, torch.Generator().manual_seed(1))
    assert all(t.shape == (2, 3, 16, 16) and t.min() >= 0 and t.max() <= 1 for t in (original, masked, rebuilt))
    torch.testing.assert_close(original, images.float() / 255)
    seen = (patchify(masked, 4) != 0.5).any(dim=-1)  # (B, N): the patches the masked image shows
    assert seen.sum(dim=1).tolist() == [4, 4]  # round(16 * 0.25)
    assert torch.equal(patchify(rebuilt, 4)[seen], patchify(original, 4)[seen])  # pasted from the original
    assert not torch.equal(patchify(rebuilt, 4)[~seen], patchify(original, 4)[~seen])  # predicted
    with pytest.raises(ConfigError, match="reconstructions need an MAE run"):
        mae_from_checkpoint({**ckpt["config"], "method": {"name": "simclr"}}, ckpt["model"])


def test_the_report_draws_the_reconstructions_of_the_first_test_image_of_each_class(mae_run, tmp_path):
    pytest.importorskip("matplotlib")
    r = CliRunner().invoke(app, ["report", str(mae_run), "-o", str(tmp_path / "report"), "--map", "pca",
                                 "--limit", "40", "--num-workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    drawn = tmp_path / "report" / "reconstructions.png"
    assert drawn.is_file() and 'src="reconstructions.png"' in (tmp_path / "report" / "index.html").read_text()
    width, height = Image.open(drawn).size
    assert height > 2 * width / 3  # one row per class shown (10 synthetic classes), three columns
