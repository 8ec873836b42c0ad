"""Batched, per-sample random views on the training device, and the named presets that compose them.

Owns the geometric ops (each a pure function of a float batch in [0, 1] and explicit per-sample
parameters, so it can be checked against torchvision's per-image functional op; the colour ops are in
`color.py`), the samplers for those parameters, and `Augmenter`, which turns a uint8 batch into two
normalised float32 views. Every random number comes from the `torch.Generator` passed in, drawn on that generator's device, so a run that saves
and restores the generator state resumes with the same views. No Python loop over images anywhere.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from simclr_cli.augment.color import (JITTER_IDENTITY, JITTER_PERMS, adjust_brightness, color_jitter_, const, contrast_,
                               grayscale_, per_sample)
from simclr_cli.config import AugmentConfig
from simclr_cli.data import NORMALIZATION
from simclr_cli.registry import PRESETS  # augment.preset NAME -> (augmenter, x, generator, size) -> two views

_CROP_TRIES = 10  # candidate boxes per sample, as in torchvision's RandomResizedCrop


def _rand(generator: torch.Generator | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) drawn on the generator's device (so its state alone fixes the draw), moved to `device`."""
    src = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=src).to(device)


def sample_crop_boxes(B: int, H: int, W: int, scale: tuple[float, float], ratio: tuple[float, float],
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """torchvision's RandomResizedCrop parameters, vectorised: (B, 4) float boxes (top, left, height, width).

    Draws `_CROP_TRIES` candidates per sample at once, keeps the first that fits, and falls back to the
    centre crop with the aspect ratio clamped into `ratio` when none does. Values are whole pixels.
    """
    if device is None:
        device = generator.device if generator is not None else "cpu"
    device = torch.device(device)
    u = _rand(generator, (B, _CROP_TRIES, 4), device)  # (B, T, 4): area, log-ratio, top, left
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    # torch.round is round-half-even, like Python's round() in torchvision.
    w = torch.round(torch.sqrt(area * aspect))  # (B, T)
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # (B, 1): index of the first fitting try
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    top = torch.floor(u[..., 2].gather(1, first)[:, 0] * (H - h + 1))
    left = torch.floor(u[..., 3].gather(1, first)[:, 0] * (W - w + 1))

    in_ratio = W / H
    if in_ratio < min(ratio):
        fb_w, fb_h = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        fb_w, fb_h = int(round(H * max(ratio))), H
    else:
        fb_w, fb_h = W, H
    fallback = const(((H - fb_h) // 2, (W - fb_w) // 2, fb_h, fb_w), device)
    boxes = torch.stack([top, left, h, w], dim=1)  # (B, 4)
    return torch.where(ok.any(dim=1, keepdim=True), boxes, fallback)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box b of image b and resize it to (size, size), bilinear without antialias, via one roi_align.

    x: (B, C, H, W) float; boxes: (B, 4) (top, left, height, width) in pixels. With aligned=True and one
    sample per bin, roi_align samples at the same half-pixel-centre points as F.resized_crop(antialias=False);
    the only difference is at the crop's border when upsampling, where roi_align blends in the real
    neighbouring pixel instead of clamping to the crop's edge.
    """
    top, left, h, w = boxes.to(x.dtype).unbind(dim=1)
    index = torch.arange(x.shape[0], dtype=x.dtype, device=x.device)
    rois = torch.stack([index, left, top, left + w, top + h], dim=1)  # (B, 5): batch index, x1, y1, x2, y2
    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=1, aligned=True)


def hflip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images where mask (B,) bool is True."""
    return torch.where(per_sample(mask), x.flip(-1), x)


def rotate(x: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """Rotate each image counter-clockwise by its angle (B,) in degrees about its centre; bilinear, zero fill."""
    B, _, H, W = x.shape
    rad = angles_deg.to(x.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(rad)
    # Output -> input map in normalised coordinates; the H/W factors keep the rotation rigid in pixels.
    theta = torch.stack([torch.stack([cos, -sin * (H / W), zero], 1),
                         torch.stack([sin * (W / H), cos, zero], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [B, x.shape[1], H, W], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def add_gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add N(0, std^2) noise per pixel (std on the [0, 1] scale), clamped back to [0, 1]."""
    src = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=src, dtype=x.dtype).to(x.device)
    return noise.mul_(std).add_(x).clamp_(0.0, 1.0)


def progressive_size(start: int, end: int, progress: float, multiple: int = 4) -> int:
    """Progressive views: the view size at `progress` (0..1) of training, from `start` rising linearly to
    `end`, in whole steps of `multiple` pixels so only a few sizes occur; `end` from progress 1 on."""
    if progress >= 1.0 or start >= end:
        return end
    return min(end, start + multiple * round(max(0.0, progress) * (end - start) / multiple))


def view_size_at(a: AugmentConfig, image_size: int, step: int, total_steps: int) -> int:
    """The view size at optimiser step `step` of `total_steps`: augment.view_size (else the images' size)
    throughout, or rising from augment.view_size_start with the schedule's progress (progressive views)."""
    final = a.view_size or image_size
    if a.view_size_start is None:
        return final
    return progressive_size(a.view_size_start, final, step / max(1, total_steps))


def view_sizes(a: AugmentConfig, image_size: int) -> set[int]:
    """Every size of view a run trains on: the one size, or the progressive ones; and multi-crop's."""
    final = a.view_size or image_size
    sizes = {final} if a.view_size_start is None else {progressive_size(a.view_size_start, final, k / 1000)
                                                        for k in range(1001)}
    return sizes | ({a.small_crop_size} if a.small_crops else set())


def describe_views(a: AugmentConfig, image_size: int, now: int, per_image: int = 2) -> str:
    """What a run trains on, for the start panel; `now`: the current view size, `per_image`: the method's
    main views of each image."""
    text = f"{per_image} x {now} px" if a.view_size_start is None else \
        f"{per_image} x {a.view_size_start} rising to {a.view_size or image_size} px (progressive; now {now})"
    return text + (f" + {a.small_crops} x {a.small_crop_size} px (multi-crop)" if a.small_crops else "")


class Augmenter:
    """Two random views per image of a uint8 batch, by a named preset, normalised with (v - mean) / std.

    Pass a generator on x's device: random numbers are drawn on the generator's device, and a CPU generator
    with CUDA images means a small host-to-device copy per draw.

    Cost on this 2-core CPU, both views of 256 uint8 32x32 images: simclr ~40 ms (38-42 ms best-of-40 CPU
    time on one thread; 35-47 ms wall on two threads while the machine was quiet), baseline ~20 ms; about
    0.5% of an ~8 s ResNet-18 step. Per view: roi_align ~6 ms, hue ~5 ms, the other 14 jitter ops ~5 ms.

    simclr: the SimCLR paper's CIFAR recipe for each view independently: random resized crop
        (scale crop_scale_min..1, aspect 3/4..4/3), flip p=0.5, colour jitter 0.4/0.4/0.4/0.1 x
        jitter_strength with p=0.8 in a random order per sample, grayscale p=0.2, no blur.
    baseline: asymmetric; view 1 = crop (scale 0.9..1) + rotation within +-10 degrees, view 2 =
        brightness and contrast 0.4 (always, in that order) + Gaussian noise std 0.05, resized to size.
    """

    def __init__(self, preset: str = "simclr", size: int = 32, mean: Sequence[float] = NORMALIZATION["cifar10"][0],
                 std: Sequence[float] = NORMALIZATION["cifar10"][1], crop_scale_min: float = 0.08,
                 jitter_strength: float = 1.0, memory_format: torch.memory_format = torch.contiguous_format) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}; valid presets: {', '.join(PRESETS)}")
        self._views = PRESETS[preset]
        if not 0.0 < crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {crop_scale_min}")
        if jitter_strength < 0:
            raise ValueError(f"jitter_strength must be >= 0, got {jitter_strength}")
        self.preset, self.size, self.memory_format = preset, size, memory_format
        self.crop_scale_min, self.jitter_strength = crop_scale_min, jitter_strength
        # (v - mean) / std as v * scale + shift, in place on the view's own buffer.
        self._scale = tuple(1.0 / float(s) for s in std)
        self._shift = tuple(-float(m) / float(s) for m, s in zip(mean, std))

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) -> two float32 views (B, 3, size, size), each normalised with (v - mean) / std.
        `size` overrides the Augmenter's own for this call (progressive views); the draws do not depend on it."""
        if x.ndim != 4 or x.shape[1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 (B, 3, H, W) batch, got {x.dtype} {tuple(x.shape)}")
        x = x.float().div_(255.0)  # (B, 3, H, W) in [0, 1]
        size = size or self.size
        return tuple(self._normalize(v) for v in self._views(self, x, generator, size))  # type: ignore[return-value]

    def pair(self, x: torch.Tensor, generator: torch.Generator | None = None, size: int | None = None) -> torch.Tensor:
        """Both views as the one (2B, 3, size, size) batch a method's forward takes, view 1 first, in the
        Augmenter's memory format (channels_last for the training loop's convolutions)."""
        return torch.cat(self(x, generator, size)).contiguous(memory_format=self.memory_format)

    def small(self, x: torch.Tensor, generator: torch.Generator | None, n: int, size: int,
              scale: tuple[float, float]) -> torch.Tensor:
        """Multi-crop: n small simclr views of each image of a uint8 batch, crop areas in `scale`, as one
        normalised float32 (n * B, 3, size, size) tensor, view k of image b at row k * B + b."""
        x = x.float().div_(255.0)
        views = torch.cat([self._normalize(self._simclr_view(x, generator, size, scale)) for _ in range(n)])
        return views.contiguous(memory_format=self.memory_format)

    def _normalize(self, v: torch.Tensor) -> torch.Tensor:
        scale, shift = (const(c, v.device).reshape(1, 3, 1, 1) for c in (self._scale, self._shift))
        return v.mul_(scale).add_(shift).contiguous()

    def _simclr_view(self, x: torch.Tensor, g: torch.Generator | None, size: int,
                     scale: tuple[float, float] | None = None) -> torch.Tensor:
        B, _, H, W = x.shape
        boxes = sample_crop_boxes(B, H, W, scale or (self.crop_scale_min, 1.0), (3 / 4, 4 / 3), g, x.device)
        v = resized_crop(x, boxes, size)  # (B, 3, size, size)
        u = _rand(g, (B, 8), x.device)  # (B, 8): flip, jitter p, 4 jitter factors, order, grayscale
        v = hflip(v, u[:, 0] < 0.5)
        s = self.jitter_strength
        lo = const((max(0.0, 1 - 0.4 * s),) * 3 + (-min(0.5, 0.1 * s),), x.device)
        hi = const((1 + 0.4 * s,) * 3 + (min(0.5, 0.1 * s),), x.device)
        factors = lo + (hi - lo) * u[:, 2:6]  # (B, 4): brightness, contrast, saturation, hue shift
        # Jitter with p = 0.8: the other samples get identity factors (exact no-ops; hue 0 is ~1e-7 off).
        factors = torch.where((u[:, 1] < 0.8).unsqueeze(1), factors, const(JITTER_IDENTITY, x.device))
        order = (u[:, 6] * len(JITTER_PERMS)).long().clamp_(max=len(JITTER_PERMS) - 1)
        v = color_jitter_(v, factors, order)  # v is this view's own buffer: jitter it in place
        return grayscale_(v, u[:, 7] < 0.2)

    def _baseline_geometric(self, x: torch.Tensor, g: torch.Generator | None, size: int) -> torch.Tensor:
        B, _, H, W = x.shape
        boxes = sample_crop_boxes(B, H, W, (0.9, 1.0), (3 / 4, 4 / 3), g, x.device)
        angles = 20.0 * _rand(g, (B,), x.device) - 10.0  # uniform in [-10, 10) degrees
        return rotate(resized_crop(x, boxes, size), angles)

    def _baseline_photometric(self, x: torch.Tensor, g: torch.Generator | None, size: int) -> torch.Tensor:
        B, _, H, W = x.shape
        if (H, W) != (size, size):
            # Resize first: the colour ops then run on size x size pixels, not H x W.
            whole = const((0.0, 0.0, H, W), x.device).expand(B, 4)
            x = resized_crop(x, whole, size)
        factors = 0.6 + 0.8 * _rand(g, (B, 2), x.device)  # (B, 2) in [0.6, 1.4): brightness, contrast
        v = contrast_(adjust_brightness(x, factors[:, 0]), factors[:, 1])  # x may be shared: copy once
        return add_gaussian_noise(v, 0.05, g)


def simclr_views(augment: Augmenter, x: torch.Tensor, g: torch.Generator | None, size: int) -> tuple[torch.Tensor, ...]:
    """The `simclr` preset: each view the paper's CIFAR recipe, drawn independently (see `Augmenter`)."""
    return augment._simclr_view(x, g, size), augment._simclr_view(x, g, size)


def baseline_views(augment: Augmenter, x: torch.Tensor, g: torch.Generator | None, size: int) -> tuple[torch.Tensor, ...]:
    """The `baseline` preset: the original design's asymmetric pair (see `Augmenter`)."""
    return augment._baseline_geometric(x, g, size), augment._baseline_photometric(x, g, size)
