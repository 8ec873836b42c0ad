"""Training-step throughput, every row measured in one run: views/s and the ratios issue 5 asks for.

Rows (ResNet-18 by default, batch B images = 2B views per step):
  ceiling      forward + backward + optimiser on ready random tensors (same precision and memory format)
  simclr-cli   the real step, `Trainer.batches.get` + `Trainer.train_step`: the batch cut from the epoch order,
               batched views of both crops, forward, NT-Xent, backward, SGD (what `simclr pretrain` runs)
  usual        torchvision per-image PIL transforms in a DataLoader (2 workers), fp32, contiguous, SGD
  original     the original design: the usual pipeline with its own weak views, ImageNet stem, Adam, fp32
plus the augmentation's share of the simclr-cli step, and (--compare-precision) the same step in fp32 and bf16.
With --families, one row per backbone family instead (FAMILIES: the built-in ResNet-18, torchvision's
MobileNet v3, EfficientNet and ConvNeXt, a CIFAR-sized timm ViT): the ceiling and the real step, at 32 px.

    python benchmarks/throughput.py                      # CPU, batch 256
    python benchmarks/throughput.py --device cuda        # GPU, batch 512
    python benchmarks/throughput.py --families --batch 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset

from simclr_cli.augment import Augmenter
from simclr_cli.config import DataConfig, load_config
from simclr_cli.data import load_dataset, normalization_for
from simclr_cli.methods.simclr import nt_xent
from simclr_cli.models import build_model, is_convolutional
from simclr_cli.runtime import autocast, pick_device, resolve_precision
from simclr_cli.train.optim import build_optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


# (row, model.arch, model.kwargs): one model per family, each at CIFAR size (32 px, the family's small-image stem)
FAMILIES = [("built-in ResNet-18", "resnet18", {}),
            ("MobileNet v3 small", "torchvision:mobilenet_v3_small", {}),
            ("EfficientNet-B0", "torchvision:efficientnet_b0", {}),
            ("ConvNeXt-T", "torchvision:convnext_tiny", {}),
            ("ViT-Ti/4 (timm)", "timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4})]


class StepRunner:
    """One model + optimiser; `step(views)` runs forward, NT-Xent, backward, optimiser step."""

    def __init__(self, cfg, device, precision: str, channels_last: bool):
        torch.manual_seed(0)
        self.model = build_model(cfg.model).to(device)
        self.channels_last = channels_last and is_convolutional(self.model.encoder)  # not for a ViT
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        o = cfg.optim
        self.opt = build_optimizer(self.model, o.name, o.lr, o.weight_decay, o.momentum, o.nesterov, tuple(o.betas))
        self.device, self.precision = device, precision
        if cfg.train.compile:
            self.model = torch.compile(self.model)

    def step(self, views: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            _, z = self.model(views)
        n = len(views) // 2
        loss = nt_xent(z[:n], z[n:], 0.5)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


class PILViews(Dataset):
    """The usual pipeline: uint8 tensor -> PIL image -> per-image torchvision transforms, two views."""

    def __init__(self, images: torch.Tensor, views: tuple):
        self.images, self.views = images, views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = T.functional.to_pil_image(self.images[i])
        return self.views[0](img), self.views[1](img)


def pil_transforms(preset: str, mean, std) -> tuple:
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    if preset == "simclr":
        view = T.Compose([T.RandomResizedCrop(32, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
                          T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2), *tail])
        return view, view
    first = T.Compose([T.RandomResizedCrop(32, scale=(0.9, 1.0)), T.RandomRotation(10), *tail])
    second = T.Compose([T.ColorJitter(0.4, 0.4), *tail, T.Lambda(lambda x: x + 0.05 * torch.randn_like(x))])
    return first, second


def loader_rate(runner: StepRunner, images, preset, mean, std, batch, steps, warmup, device) -> float:
    loader = DataLoader(PILViews(images, pil_transforms(preset, mean, std)), batch_size=batch, shuffle=True,
                        num_workers=2, drop_last=True, persistent_workers=True)
    it = iter(loader)

    def step():
        nonlocal it
        try:
            v1, v2 = next(it)
        except StopIteration:  # more steps than one pass over the images: start the next epoch
            it = iter(loader)
            v1, v2 = next(it)
        runner.step(torch.cat([v1, v2]).to(device, non_blocking=True))

    return 2 * batch / timed(step, steps, warmup, device)


def real_step_seconds(args, cfg, device, precision: str) -> float:
    """Seconds per step of `simclr pretrain`'s own step on synthetic 32-pixel images: Trainer.batches.get (the
    batch cut from the epoch order on the device) and Trainer.train_step, nothing re-implemented."""
    import tempfile

    from simclr_cli.train import Trainer

    overrides = [f"model.arch={args.arch}", f"train.compile={args.compile}", *args.set, "data.dataset=synthetic",
                 f"data.synthetic_size={max(16 * args.batch, 2048)}", "data.image_size=32",
                 f"train.batch_size={args.batch}", f"train.device={device}", f"train.precision={precision}",
                 "augment.view_size=null", "augment.view_size_start=null"]
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(load_config(args.config, [*overrides, f"train.output_dir={out}"]))
        order = trainer.batches.order(0, 0)
        i = iter(range(10**9))
        return timed(lambda: trainer.train_step(trainer.batches.get(order, next(i) % trainer.steps_per_epoch)),
                     args.steps, args.warmup, device)


def families(args):
    """Yields (row, ceiling views/s, step views/s) per backbone family, as each is measured."""
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    base = [*args.set]
    for row, arch, kwargs in FAMILIES:
        args.arch, args.set = arch, [*base, f"model.kwargs={json.dumps(kwargs)}"]
        cfg = load_config(args.config, [f"model.arch={arch}", *args.set])
        runner, ready = StepRunner(cfg, device, precision, channels_last=True), torch.randn(2 * args.batch, 3, 32, 32,
                                                                                         device=device)
        ceiling = 2 * args.batch / timed(lambda: runner.step(ready), args.steps, args.warmup, device)
        yield row, ceiling, 2 * args.batch / real_step_seconds(args, cfg, device, precision)


def measure(args):
    """Yields (row, views/s, notes) as each row is measured."""
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    cfg = load_config(args.config, [f"model.arch={args.arch}", f"train.compile={args.compile}"] + args.set)
    # 16 batches: the loader rows' workers (2 x prefetch 2) cannot have the whole epoch ready after warm-up
    n = max(16 * args.batch, 2048)
    data = load_dataset(DataConfig(dataset=args.dataset, root=args.data_dir, synthetic_size=n, download=False), "train")
    images = data.images[:n]
    mean, std = normalization_for(args.dataset)
    gpu_images = images.to(device)
    aug = Augmenter("simclr", 32, mean, std)
    gen = torch.Generator(device=device).manual_seed(0)
    B = args.batch

    def pick():
        return gpu_images[torch.randint(len(gpu_images), (B,), generator=gen, device=device)]

    runner = StepRunner(cfg, device, precision, channels_last=True)
    ready = torch.randn(2 * B, 3, 32, 32, device=device)
    t_ceiling = timed(lambda: runner.step(ready), args.steps, args.warmup, device)
    t_aug = timed(lambda: aug(pick(), gen), args.steps, 1, device)
    t_e2e = real_step_seconds(args, cfg, device, precision)
    yield "ceiling (random tensors)", 2 * B / t_ceiling, f"{precision}, channels_last"
    yield "simclr-cli step", 2 * B / t_e2e, f"{precision}, channels_last; augmentation {100 * t_aug / t_e2e:.1f}% of the step"
    if args.compare_precision:
        for other in ("fp32", "bf16"):
            if other != precision:
                r = StepRunner(cfg, device, other, channels_last=True)
                t = timed(lambda: r.step(torch.cat(aug(pick(), gen))), args.steps, args.warmup, device)
                yield f"simclr-cli step, {other}", 2 * B / t, f"{other}, channels_last"
    if args.no_loaders:
        return
    fp32 = StepRunner(cfg, device, "fp32", channels_last=False)
    yield ("usual pipeline", loader_rate(fp32, images, "simclr", mean, std, B, args.steps, args.warmup, device),
           "PIL transforms, DataLoader 2 workers, fp32, contiguous")
    orig_cfg = load_config(None, ["model.stem=imagenet", "optim.name=adam", "optim.lr=0.001", f"model.arch={args.arch}"])
    orig = StepRunner(orig_cfg, device, "fp32", channels_last=False)
    yield ("original design", loader_rate(orig, images, "baseline", mean, std, B, args.steps, args.warmup, device),
           "its weak views via PIL, ImageNet stem, Adam, fp32")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 256 on CPU, 512 on CUDA)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--precision", default="auto")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per row")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compare-precision", action="store_true", help="also time the step in fp32 and bf16")
    p.add_argument("--dataset", default="synthetic", help="synthetic (default) or cifar10 with --data-root")
    p.add_argument("--data-root", "--data-dir", dest="data_dir", default=None, help="as data.root")
    p.add_argument("--config", default=None, help="YAML whose model/optim sections to use")
    p.add_argument("--set", action="append", default=[], help="config override, e.g. model.width=32")
    p.add_argument("--no-loaders", action="store_true", help="skip the DataLoader rows (usual, original)")
    p.add_argument("--families", action="store_true", help="one row per backbone family instead (FAMILIES)")
    args = p.parse_args()
    device = pick_device(args.device)
    args.batch = args.batch or (512 if device.type == "cuda" else 256)
    if args.families:
        print(f"device {device}, precision {resolve_precision(args.precision, device)}, torch {torch.__version__}, "
              f"batch {args.batch} images ({2 * args.batch} views) at 32 px, {args.steps} timed steps per row")
        print(f"{'family':<20}  {'ceiling':>9}  {'step':>9}  step/ceiling  (views/s)", flush=True)
        for row, ceiling, step in families(args):
            print(f"{row:<20}  {ceiling:9.1f}  {step:9.1f}  {step / ceiling:12.2f}", flush=True)
        return
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"precision {resolve_precision(args.precision, device)}, torch {torch.__version__}, batch {args.batch} "
          f"images ({2 * args.batch} views), {args.arch}, {args.steps} timed steps per row", flush=True)
    width, rates = 24, {}
    print(f"{'row':<{width}}  {'views/s':>9}  notes", flush=True)
    for name, rate, note in measure(args):
        rates[name] = rate
        print(f"{name:<{width}}  {rate:9.1f}  {note}", flush=True)
    e2e = rates["simclr-cli step"]
    print(f"simclr-cli / ceiling        = {e2e / rates['ceiling (random tensors)']:.2f}  (target >= 0.95)")
    if not args.no_loaders:
        print(f"simclr-cli / usual pipeline = {e2e / rates['usual pipeline']:.2f}  (target >= 3.5)")
        print(f"simclr-cli / original design = {e2e / rates['original design']:.2f}")


if __name__ == "__main__":
    main()
