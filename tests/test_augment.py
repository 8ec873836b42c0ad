"""Tests for simclr_cli.augment: each batched op against torchvision's per-image functional op on the same
parameters, the crop sampler against RandomResizedCrop's logic, and the Augmenter presets end to end."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from simclr_cli.augment import Augmenter
from simclr_cli.augment import color as C
from simclr_cli.augment import views as A

BILINEAR = InterpolationMode.BILINEAR
ATOL = 1e-5  # fp32 colour ops: same formulas as torchvision, different rounding order (~1e-7 seen)


def smooth_images(B: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """(B, 3, H, W) float in [0.1, 0.9]: low-frequency sinusoids, a random phase and frequency per channel."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    phase = torch.rand(B, 3, 1, 1, generator=g) * 2 * math.pi
    freq = 1 + 2 * torch.rand(B, 3, 1, 1, generator=g)
    return 0.5 + 0.4 * torch.sin(freq * (2.5 * xx + 1.5 * yy) * math.pi + phase)


def quantised_images(B: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """(B, 3, H, W) float from uint8 values: exact ties between channels and some gray pixels, as real data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, 3, H, W), generator=g).float() / 255
    x[:, :, 0, :] = x[:, :1, 0, :]  # a gray row: r == g == b
    x[:, 1, 1, :] = x[:, 0, 1, :]  # a row with r == g
    return x


def uint8_batch(B: int, H: int = 32, W: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8)


def per_image(fn, x: torch.Tensor, params) -> torch.Tensor:
    return torch.stack([fn(x[i], p) for i, p in enumerate(params)])


# --- crop boxes and resized crop -------------------------------------------------------------------------


@pytest.mark.parametrize("H,W", [(32, 32), (40, 36), (17, 50)])
def test_crop_boxes_fit_and_follow_scale_and_ratio(H, W):
    boxes = A.sample_crop_boxes(4096, H, W, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert boxes.shape == (4096, 4) and torch.equal(boxes, boxes.round())
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    assert top.unique().numel() > 1 and left.unique().numel() > 1  # positions are random, not centred


def test_crop_boxes_match_torchvision_distribution():
    boxes = A.sample_crop_boxes(4000, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    ours = boxes[:, 2] * boxes[:, 3] / 1024
    torch.manual_seed(0)
    rrc = RandomResizedCrop(32, scale=(0.08, 1.0))
    theirs = []
    for _ in range(4000):
        make_params = getattr(rrc, "make_params", None) or rrc._get_params  # public from torchvision 0.21
        p = make_params([torch.zeros(3, 32, 32)])
        theirs.append(p["height"] * p["width"] / 1024)
    theirs = torch.tensor(theirs)
    # Same law, independent draws: the mean area fraction (~0.54, sd ~0.27) agrees to a few standard errors.
    assert abs(ours.mean() - theirs.mean()) < 0.02
    assert abs(ours.std() - theirs.std()) < 0.02


@pytest.mark.parametrize("H,W,expected", [(10, 40, [0, 13, 10, 13]), (40, 10, [13, 0, 13, 10]),
                                          (20, 20, [0, 0, 20, 20])])
def test_crop_boxes_fall_back_to_centre_crop(H, W, expected):
    # A scale above 1 can never fit, so every sample takes torchvision's fallback.
    boxes = A.sample_crop_boxes(8, H, W, (2.0, 3.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    assert boxes.tolist() == [expected] * 8


def test_resized_crop_exact_for_identity_and_whole_image_boxes():
    x = torch.rand(8, 3, 32, 32)
    whole = torch.tensor([[0.0, 0.0, 32.0, 32.0]]).expand(8, 4)
    assert torch.equal(A.resized_crop(x, whole, 32), x)
    y = torch.rand(8, 3, 40, 36)
    out = A.resized_crop(y, torch.tensor([[0.0, 0.0, 40.0, 36.0]]).expand(8, 4), 32)
    ref = torch.stack([TF.resize(img, [32, 32], interpolation=BILINEAR, antialias=False) for img in y])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("H,W", [(32, 32), (40, 36)])
def test_resized_crop_matches_torchvision(H, W):
    x = smooth_images(64, H, W)
    boxes = A.sample_crop_boxes(64, H, W, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(1))
    out = A.resized_crop(x, boxes, 32)
    ref = torch.stack([TF.resized_crop(x[i], *[int(v) for v in boxes[i]], [32, 32], interpolation=BILINEAR,
                                       antialias=False) for i in range(64)])
    # Same sampling points; they differ only where an upsampled crop's outer sample falls less than half a
    # source pixel from the crop's edge: torchvision clamps to the edge pixel, roi_align blends in the real
    # neighbour. That ring is ceil(size / (2 * side) - 0.5) <= 2 pixels for sides >= 7; inside it, exact.
    assert boxes[:, 2:].min() >= 7
    torch.testing.assert_close(out[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], atol=ATOL, rtol=0)
    assert (out - ref).abs().mean() < 0.02  # ~0.007 seen on these images
    big = boxes[:, 2:].min(dim=1).values >= 32  # no upsampling: exact everywhere
    torch.testing.assert_close(out[big], ref[big], atol=ATOL, rtol=0)


# --- per-sample ops against torchvision ------------------------------------------------------------------


def test_hflip_per_sample():
    x = torch.rand(6, 3, 5, 7)
    mask = torch.tensor([True, False, True, True, False, False])
    ref = torch.stack([TF.horizontal_flip(img) if m else img for img, m in zip(x, mask)])
    assert torch.equal(A.hflip(x, mask), ref)


@pytest.mark.parametrize("op,tv_op,low,high", [
    (C.adjust_brightness, TF.adjust_brightness, 0.0, 2.0),
    (C.adjust_contrast, TF.adjust_contrast, 0.0, 2.0),
    (C.adjust_saturation, TF.adjust_saturation, 0.0, 2.0),
    (C.adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
@pytest.mark.parametrize("make", [smooth_images, quantised_images])
def test_colour_op_matches_torchvision(op, tv_op, low, high, make):
    x = make(16, 9, 11)
    params = low + (high - low) * torch.rand(16, generator=torch.Generator().manual_seed(2))
    params[0], params[1] = low, high  # the ends of the range
    before = x.clone()
    ref = per_image(lambda img, p: tv_op(img, p.item()), x, params)
    torch.testing.assert_close(op(x, params), ref, atol=ATOL, rtol=0)
    assert torch.equal(x, before)  # public ops do not modify their input


def test_to_grayscale_per_sample():
    x = quantised_images(6, 5, 7)
    mask = torch.tensor([True, False, True, False, False, True])
    ref = torch.stack([TF.rgb_to_grayscale(img, num_output_channels=3) if m else img for img, m in zip(x, mask)])
    torch.testing.assert_close(C.to_grayscale(x, mask), ref, atol=ATOL, rtol=0)


def test_color_jitter_applies_each_samples_own_order():
    x = smooth_images(24, 8, 8)
    g = torch.Generator().manual_seed(3)
    factors = torch.cat([0.4 + 1.2 * torch.rand(24, 3, generator=g), 0.2 * torch.rand(24, 1, generator=g) - 0.1], 1)
    order = torch.arange(24)  # every one of the 24 orders once
    tv_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    ref = []
    for i, perm in enumerate(itertools.permutations(range(4))):
        img = x[i]
        for op in perm:
            img = tv_ops[op](img, factors[i, op].item())
        ref.append(img)
    torch.testing.assert_close(C.color_jitter(x, factors, order), torch.stack(ref), atol=ATOL, rtol=0)


@pytest.mark.parametrize("H,W", [(32, 32), (20, 28)])
def test_rotate_matches_torchvision(H, W):
    x = torch.rand(12, 3, H, W)
    angles = 20 * torch.rand(12, generator=torch.Generator().manual_seed(4)) - 10
    angles[0], angles[1] = 90.0, -45.0  # large angles catch a wrong sign or aspect correction
    ref = per_image(lambda img, a: TF.rotate(img, a.item(), interpolation=BILINEAR), x, angles)
    # Same grid maths on both sides, built in a different order: ~3e-6 seen, on every pixel.
    torch.testing.assert_close(A.rotate(x, angles), ref, atol=ATOL, rtol=0)


def test_gaussian_noise_std_clamp_and_determinism():
    x = torch.full((64, 3, 16, 16), 0.5)
    out = A.add_gaussian_noise(x, 0.05, torch.Generator().manual_seed(0))
    assert abs((out - x).std().item() - 0.05) < 0.002 and abs((out - x).mean().item()) < 0.002
    assert torch.equal(out, A.add_gaussian_noise(x, 0.05, torch.Generator().manual_seed(0)))
    edge = A.add_gaussian_noise(torch.ones(4, 3, 8, 8), 0.05, torch.Generator().manual_seed(0))
    assert edge.max() <= 1.0 and edge.min() < 1.0


# --- Augmenter ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", A.PRESETS)
@pytest.mark.parametrize("H,W", [(32, 32), (40, 36), (31, 33)])
def test_augmenter_shapes_dtype_and_contiguity(preset, H, W):
    v1, v2 = Augmenter(preset, size=32)(uint8_batch(8, H, W), torch.Generator().manual_seed(0))
    for v in (v1, v2):
        assert v.shape == (8, 3, 32, 32) and v.dtype == torch.float32 and v.is_contiguous()
        assert torch.isfinite(v).all()
    assert not torch.equal(v1, v2)  # the two views of one call differ


@pytest.mark.parametrize("preset", A.PRESETS)
def test_augmenter_is_deterministic_given_the_generator(preset):
    x, aug = uint8_batch(16), Augmenter(preset)
    first = aug(x, torch.Generator().manual_seed(7))
    same = aug(x, torch.Generator().manual_seed(7))
    other = aug(x, torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, same))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    aug(x, g)
    g.set_state(state)  # a restored generator state replays the same views: exact resume
    assert all(torch.equal(a, b) for a, b in zip(first, aug(x, g)))


def test_augmenter_without_generator_uses_the_global_rng():
    torch.manual_seed(0)
    v1, _ = Augmenter()(uint8_batch(4))
    torch.manual_seed(0)
    assert torch.equal(v1, Augmenter()(uint8_batch(4))[0])


def test_augmenter_parameters_differ_per_sample():
    x = uint8_batch(1).expand(64, 3, 32, 32)  # 64 copies of one image
    for preset in A.PRESETS:
        for v in Augmenter(preset)(x, torch.Generator().manual_seed(0)):
            flat = v.reshape(64, -1)
            assert torch.cdist(flat, flat).add(torch.eye(64) * 1e3).min() > 1e-3  # no two samples alike


def test_augmenter_normalises_with_mean_and_std():
    x, mean, std = uint8_batch(4), (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
    raw = Augmenter(mean=(0, 0, 0), std=(1, 1, 1))(x, torch.Generator().manual_seed(0))
    normed = Augmenter(mean=mean, std=std)(x, torch.Generator().manual_seed(0))
    m, s = torch.tensor(mean).reshape(1, 3, 1, 1), torch.tensor(std).reshape(1, 3, 1, 1)
    for r, n in zip(raw, normed):
        assert r.min() >= 0 and r.max() <= 1
        torch.testing.assert_close(n, (r - m) / s, atol=ATOL, rtol=0)


def test_simclr_without_crop_or_jitter_is_flip_and_grayscale_only():
    # scale 1 on a square image leaves only the whole-image box; strength 0 makes jitter the identity.
    x = uint8_batch(256, 16, 16)
    v, _ = Augmenter(size=16, crop_scale_min=1.0, jitter_strength=0.0, mean=(0, 0, 0), std=(1, 1, 1))(
        x, torch.Generator().manual_seed(0))
    xf = x.float() / 255
    gray = TF.rgb_to_grayscale(xf, num_output_channels=3)
    candidates = torch.stack([xf, xf.flip(-1), gray, gray.flip(-1)], 1)  # (256, 4, 3, 16, 16)
    err = (candidates - v.unsqueeze(1)).abs().amax(dim=(2, 3, 4))  # (256, 4)
    assert (err.min(dim=1).values < ATOL).all()
    choice = err.argmin(dim=1)
    flipped, gray = (choice % 2 == 1).float().mean(), (choice >= 2).float().mean()
    assert 0.35 < flipped < 0.65 and 0.1 < gray < 0.3  # p = 0.5 and 0.2; 256 samples, > 3 sd slack
    # With jitter on, only the ~20% of views that skipped it (p = 0.8) are still one of the candidates.
    v, _ = Augmenter(size=16, crop_scale_min=1.0, mean=(0, 0, 0), std=(1, 1, 1))(x, torch.Generator().manual_seed(1))
    untouched = ((candidates - v.unsqueeze(1)).abs().amax(dim=(2, 3, 4)).min(dim=1).values < ATOL).float().mean()
    assert 0.1 < untouched < 0.3


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_simclr_brightness_range_scales_with_jitter_strength(strength):
    # A flat gray image is unchanged by crop, flip, contrast, saturation, hue and grayscale: only brightness
    # moves it, to 0.5 * factor with factor uniform in 1 +- 0.4 * strength.
    x = torch.full((2000, 3, 8, 8), 128, dtype=torch.uint8)
    v, _ = Augmenter(size=8, jitter_strength=strength, mean=(0, 0, 0), std=(1, 1, 1))(
        x, torch.Generator().manual_seed(0))
    factor = v.mean(dim=(1, 2, 3)) / (128 / 255)
    assert abs(factor.min() - (1 - 0.4 * strength)) < 0.01 and abs(factor.max() - (1 + 0.4 * strength)) < 0.01


def test_simclr_grayscale_probability():
    x = uint8_batch(2000, 8, 8)  # random colours: a view is gray only when the grayscale op fired
    v, _ = Augmenter(size=8, mean=(0, 0, 0), std=(1, 1, 1))(x, torch.Generator().manual_seed(0))
    spread = (v.amax(dim=1) - v.amin(dim=1)).amax(dim=(1, 2))  # (B,) largest channel spread of any pixel
    gray = spread < 1e-6
    assert 0.17 < gray.float().mean() < 0.23  # p = 0.2; sd ~0.009 over 2000 samples
    assert (v[gray].std(dim=(1, 2, 3)) > 0.01).all()  # gray views still carry the image, not a flat fill


def test_baseline_views():
    x = uint8_batch(64, 40, 36)
    v1, v2 = Augmenter("baseline", size=32, mean=(0, 0, 0), std=(1, 1, 1))(x, torch.Generator().manual_seed(0))
    assert (v1[:, :, 0, 0] == 0).float().mean() > 0.2  # rotation with zero fill darkens some corners
    assert v2.min() >= 0 and v2.max() <= 1  # noise is clamped to [0, 1]


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match="simclr, baseline"):
        Augmenter("byol")


@pytest.mark.parametrize("bad", [torch.rand(2, 3, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.uint8)])
def test_augmenter_rejects_non_uint8_rgb_batches(bad):
    with pytest.raises(ValueError, match="uint8"):
        Augmenter()(bad)
