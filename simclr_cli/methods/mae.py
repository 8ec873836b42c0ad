"""MAE (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners"): a ViT encoder sees a random
quarter of each image's patches (`method.mae.mask_ratio` 0.75 hidden), a light decoder predicts the pixels
of the hidden ones, and the loss is the mean squared error on the hidden patches only (section 3):

    loss = 1 / (B (N - K)) * sum over images b, hidden patches n of  mean_j (pred[b, n, j] - target[b, n, j])^2

with target the patch's pixels of the (normalised) view, each patch normalised by its own mean and std
(`norm_pix_loss`, the paper's better setting: `(t - mean) / sqrt(var + 1e-6)`, var unbiased as in the
paper's code). Every image hides the same N - K patches, so two ranks' mean of their local losses is the
loss of one process on the whole batch, and DDP's averaged gradients are its gradients: no collective.

Views: one per image (`views_per_image = 1`), a random resized crop (area augment.crop_scale_min..1, aspect
3/4..4/3) and a flip with p = 0.5, the paper's only augmentation; the masking noise (B, N) is drawn in
`views()` from the same generator after them (`Views.noise`), so a resumed run masks as the straight one.
The networks and the masked pass through the ViT's own layers are `masked_vit.py`'s.

What is used downstream: `model.encoder`, the library ViT unchanged and unmasked, with its own pooling:
timm's class token by default (the paper's linear probe reads the class token, which the encoder carries
through every block and the decoder sees), or `global_pool: avg` in model.kwargs for the mean of the
patch tokens (the paper's fine-tuning pools so; timm then puts its final norm after the pooling, and the
masked pass applies that norm per token); torchvision's ViT gives its class token. Nothing follows the
encoder: no head is exported, and `health_head()` is an identity, so the health monitor measures h itself.

`reconstruct()` draws the report's figures (the paper's Figure 2-4 layout): the original, the masked view
and the reconstruction with the visible patches pasted from the original. With norm_pix_loss the decoder
predicts normalised patches; the masked patch's own mean and std are unknown to the model, so the figure
de-normalises each prediction with the true patch's mean and std (as MAE's demo notebook shows it): the
figure shows the predicted structure, not a predicted brightness or contrast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from simclr_cli.augment import Augmenter, view_sizes
from simclr_cli.augment.views import _rand as _uniform  # the views' own draw: same device rule, same stream
from simclr_cli.augment.views import hflip, resized_crop, sample_crop_boxes
from simclr_cli.config import Config, config_from_dict
from simclr_cli.data import normalization_for
from simclr_cli.errors import ConfigError
from simclr_cli.methods.base import Method, MethodFigure, Views
from simclr_cli.methods.masked_vit import MaskedAutoencoder, check_vit, keep_count, patchify, unpatchify
from simclr_cli.models import build_encoder

MASKED_GREY = 0.5  # the value (on [0, 1]) that hidden patches show in the masked figure


@dataclass
class MAEOptions:
    mask_ratio: float = 0.75  # share of each image's patches hidden from the encoder (the paper's 75%)
    decoder_depth: int = 8  # decoder transformer blocks (the paper's 8)
    decoder_width: int = 512  # decoder token width, a multiple of 4 and of decoder_heads (the paper's 512)
    decoder_heads: int = 16  # decoder attention heads (the paper's 16)
    norm_pix_loss: bool = True  # targets: each patch's pixels normalised by their own mean and std

    def __post_init__(self) -> None:
        """The rule that ties two settings: the decoder's attention splits its width among its heads."""
        if self.decoder_heads >= 1 and self.decoder_width % self.decoder_heads:
            raise ConfigError(f"'method.mae.decoder_width' must be divisible by method.mae.decoder_heads; got "
                              f"{self.decoder_width} and {self.decoder_heads}")


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """The mean over hidden patches of each patch's mean squared error, in fp32.
    pred, target (B, N, p * p * 3); mask (B, N), 1 where the patch was hidden."""
    target, mask = target.float(), mask.float()
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)  # (B, N, 1) each
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum()


class MAEMethod(Method):
    Options = MAEOptions
    RULES = [
        ("mask_ratio", lambda v: 0 < v < 1, "in (0, 1) (the share of patches hidden; the paper's 0.75)"),
        ("decoder_depth", lambda v: v >= 1, ">= 1"),
        ("decoder_width", lambda v: v >= 4 and v % 4 == 0, "a multiple of 4, >= 4 (the 2-D sin-cos positions)"),
        ("decoder_heads", lambda v: v >= 1, ">= 1"),
    ]
    views_per_image = 1

    def __init__(self, cfg: Config) -> None:
        options: MAEOptions = cfg.method.options
        encoder = build_encoder(cfg.model, cfg.data.image_size)
        family = check_vit(encoder, cfg.model.arch)
        self.model = MaskedAutoencoder(encoder, family, options.mask_ratio, options.decoder_depth,
                                       options.decoder_width, options.decoder_heads)
        self.norm_pix_loss, self.mask_ratio = options.norm_pix_loss, options.mask_ratio
        self.size = cfg.augment.view_size or cfg.data.image_size  # the views' final size (reconstruct's)
        self.mean, self.std = normalization_for(cfg.data.dataset)
        for size in sorted(view_sizes(cfg.augment, cfg.data.image_size)):
            self._check_size(size, options.mask_ratio)

    def _check_size(self, size: int, mask_ratio: float) -> None:
        """Each view size a whole number of patches, with at least one patch seen and one hidden."""
        p = self.model.patch
        if size % p:
            raise ConfigError(f"MAE needs views of a whole number of {p}-pixel patches; got {size} px: set "
                              f"data.image_size / augment.view_size to a multiple of {p}, or model.kwargs patch_size")
        n = (size // p) ** 2
        if not 1 <= keep_count(n, mask_ratio) < n:
            raise ConfigError(f"'method.mae.mask_ratio' {mask_ratio:g} of {n} patches ({size} px) leaves "
                              f"{keep_count(n, mask_ratio)} visible: choose a ratio that keeps between 1 and {n - 1}")

    def health_head(self) -> torch.nn.Module:
        return torch.nn.Identity()  # nothing follows the encoder: the monitor measures h itself

    def views(self, augment: Augmenter, x: torch.Tensor, generator: torch.Generator, size: int) -> Views:
        """One view per image: crop (area augment.crop_scale_min..1) and flip, normalised, then the masking
        noise (B, N), all from `generator`. Views.pair holds the B views (not a pair)."""
        b, _, h, w = x.shape
        v = x.float().div_(255.0)  # (B, 3, H, W) in [0, 1]
        boxes = sample_crop_boxes(b, h, w, (augment.crop_scale_min, 1.0), (3 / 4, 4 / 3), generator, x.device)
        v = hflip(resized_crop(v, boxes, size), _uniform(generator, (b,), x.device) < 0.5)  # (B, 3, S, S)
        noise = _uniform(generator, (b, (size // self.model.patch) ** 2), x.device)  # (B, N)
        return Views(augment._normalize(v).contiguous(memory_format=augment.memory_format), noise=noise)

    def loss(self, net: torch.nn.Module, views: Views, ctx: contextlib.AbstractContextManager) -> torch.Tensor:
        """views.pair (B, 3, S, S) and views.noise (B, N): the decoder's pixels against the view's, hidden
        patches only; the forward goes through `net` (DDP synchronises its gradients), the loss in fp32."""
        with ctx:
            pred, mask = net(views.pair, views.noise)  # (B, N, p * p * 3), (B, N)
        return masked_mse(pred, patchify(views.pair, self.model.patch), mask, self.norm_pix_loss)

    @classmethod
    def report_figure(cls, config: dict, model_state: dict, images: torch.Tensor) -> MethodFigure:
        """The reconstructions of `images` (uint8 (B, 3, H, W)), masked by a fixed seed: the same patches on
        every report of the run."""
        method = mae_from_checkpoint(config, model_state)
        shown = method.reconstruct(images, torch.Generator().manual_seed(0))  # original, masked, reconstructed
        as_uint8 = [t.mul(255).round_().to(torch.uint8).cpu().numpy() for t in shown]
        rows = [[kind[b] for kind in as_uint8] for b in range(len(images))]
        caption = (f"{len(rows)} test images, {method.mask_ratio:.0%} of their patches masked, and the decoder's "
                   "reconstruction (visible patches pasted from the original; hidden ones at each true patch's mean "
                   "and std)")
        return MethodFigure("reconstructions.png", caption, ["original", "masked", "reconstructed"], rows)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 images (B, 3, H, W) -> (original, masked, reconstructed), float (B, 3, S, S) in [0, 1] at the
        views' size, on the model's device, masked by noise from `generator`. The reconstruction shows the
        original's visible patches and the decoder's prediction of the hidden ones (de-normalised with each
        true patch's mean and std under norm_pix_loss: see the module's docstring); the masked image shows
        the hidden patches grey. The model is left in the mode it was in."""
        device = next(self.model.parameters()).device
        x = images.to(device).float().div_(255.0)  # (B, 3, H, W) in [0, 1]
        if x.shape[-2:] != (self.size, self.size):
            whole = torch.tensor([0.0, 0.0, x.shape[-2], x.shape[-1]], device=device).expand(len(x), 4)
            x = resized_crop(x, whole, self.size)  # (B, 3, S, S)
        mean, std = (torch.tensor(c, device=device).reshape(1, 3, 1, 1) for c in (self.mean, self.std))
        normed = (x - mean) / std
        p, was_training = self.model.patch, self.model.training
        noise = _uniform(generator, (len(x), (self.size // p) ** 2), device)  # (B, N)
        try:
            pred, mask = self.model.eval()(normed, noise)  # (B, N, p * p * 3), (B, N)
        finally:
            self.model.train(was_training)
        target = patchify(normed, p)  # (B, N, p * p * 3)
        if self.norm_pix_loss:
            pred = pred.float() * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        predicted = patchify((unpatchify(pred.float(), p) * std + mean).clamp(0.0, 1.0), p)  # (B, N, p * p * 3)
        hidden, seen = mask.bool()[..., None], patchify(x, p)  # (B, N, 1), (B, N, p * p * 3)
        masked = unpatchify(torch.where(hidden, torch.full_like(seen, MASKED_GREY), seen), p)
        return x, masked, unpatchify(torch.where(hidden, predicted, seen), p)  # visible patches: the original's


def mae_from_checkpoint(cfg: Config | dict, model_state: dict) -> MAEMethod:
    """The MAE method of a run, on the CPU in eval mode, from its checkpoint's config (a Config, or the
    checkpoint's "config" mapping) and "model" state: what the report draws reconstructions with. The
    caller's random streams are left as they were; model.init is not read (the weights are the state's)."""
    if isinstance(cfg, dict):
        cfg = config_from_dict(cfg)
    if cfg.method.name != "mae":
        raise ConfigError(f"reconstructions need an MAE run; this one trained method.name={cfg.method.name}")
    cfg = replace(cfg, model=replace(cfg.model, init=None))
    with torch.random.fork_rng(devices=[]):  # building initialises weights the state then replaces
        method = MAEMethod(cfg)
    method.model.load_state_dict(model_state)
    method.model.eval()
    return method


__all__ = ["MAEMethod", "MAEOptions", "mae_from_checkpoint", "masked_mse"]
