"""The fine-tuning loop: a whole network (encoder, head layers, linear layer) trained on few labels with the
SimCLR paper's protocol, resumable at every epoch.

The protocol (SimCLR, appendix B.5): random crop with resize and horizontal flip only, SGD with Nesterov
momentum 0.9, no weight decay, no warm-up, the learning rate 0.05 x batch / 256, 60 epochs for 1% of the
labels and 30 for more; the rate decays by a cosine over the run. Batch norm trains, as in the paper.

`train_classifier` saves its state after every epoch through `save_state(state)` and continues from a
`state` it is given: the model, the optimiser, the epoch and both random generators, so a resumed run ends
with the weights of one that was never stopped. The images are a tensor or a mapped folder
(`data.mapped.MappedImages`), whose batches are read from disk as they are taken: memory stays flat
however many images the subset holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from simclr_cli.augment.views import hflip, resized_crop, sample_crop_boxes
from simclr_cli.data.batches import BatchStream
from simclr_cli.data.mapped import MappedImages
from simclr_cli.models.classifier import Classifier
from simclr_cli.models.features import preprocess
from simclr_cli.runtime import autocast

CROP_RATIO = (3 / 4, 4 / 3)
# Batches of a mapped folder read ahead on a thread while the step runs, as pretraining's data.read_ahead
# default: the step does not wait for the disk. Images in memory are cut on the main thread.
READ_AHEAD = 2


@dataclass
class Protocol:
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    crop_scale_min: float = 0.08  # torchvision's RandomResizedCrop, as the paper's fine-tuning crops
    seed: int = 0

    def describe(self) -> dict:
        return dict(self.__dict__)


def default_epochs(fraction: float) -> int:
    """The paper's: 60 epochs on 1% of the labels (or fewer), 30 on more. `fraction` is the share asked for
    (`finetune.asked_fraction`), not the share a class-balanced subset happens to get after rounding."""
    return 60 if fraction <= 0.01 + 1e-9 else 30


def scaled_lr(batch_size: int) -> float:
    """The paper's fine-tuning rate: 0.05 x batch / 256."""
    return 0.05 * batch_size / 256


def augmented(images_u8: torch.Tensor, mean, std, size: int, g: torch.Generator, scale_min: float,
              device: torch.device) -> torch.Tensor:
    """Random resized crops (scale [scale_min, 1]) and flips of a uint8 batch, normalised, on `device`."""
    n, _, h, w = images_u8.shape
    boxes = sample_crop_boxes(n, h, w, (scale_min, 1.0), CROP_RATIO, generator=g).to(device)
    flips = torch.rand(n, generator=g) < 0.5
    x = resized_crop(images_u8.to(device).float(), boxes, size)
    x = hflip(x, flips.to(device))
    return preprocess(x.clamp_(0, 255), mean, std, size)


def _lr_at(p: Protocol, step: int, total: int) -> float:
    return p.lr * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


def train_classifier(model: Classifier, images: torch.Tensor | MappedImages, labels: torch.Tensor, mean, std, size: int,
                     p: Protocol, device: torch.device, precision: str, state: dict | None = None,
                     save_state: Callable[[dict], None] | None = None,
                     progress: Callable[[int, int, float], None] | None = None) -> Classifier:
    """Fine-tune `model` on uint8 `images` (N, 3, H, W) and `labels`; progress(epoch, epochs, loss)."""
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum, nesterov=p.nesterov,
                          weight_decay=p.weight_decay)
    g = torch.Generator().manual_seed(p.seed)
    per_epoch = math.ceil(len(images) / p.batch_size)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["epoch"])
    depth = READ_AHEAD if isinstance(images, MappedImages) else 0
    for epoch in range(start, p.epochs):
        order, total_loss = torch.randperm(len(images), generator=g), 0.0
        rows = [order[i * p.batch_size:(i + 1) * p.batch_size] for i in range(per_epoch)]
        # batch norm cannot train on one image: a last batch of one waits for the next epoch
        steps = [i for i in range(per_epoch) if len(rows[i]) >= 2]
        with BatchStream(lambda i: images[rows[i]], steps, depth) as batches:  # noqa: B023 (read within the epoch)
            for i, batch in zip(steps, batches):
                idx = rows[i]
                for group in opt.param_groups:
                    group["lr"] = _lr_at(p, epoch * per_epoch + i, p.epochs * per_epoch)
                x = augmented(batch, mean, std, size, g, p.crop_scale_min, device)
                with autocast(device, precision):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total_loss += float(loss.detach()) * len(idx)
        if save_state is not None:
            save_state({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": g.get_state(),
                        "torch_rng": torch.get_rng_state(), "epoch": epoch + 1})
        if progress is not None:
            progress(epoch + 1, p.epochs, total_loss / len(images))
    return model.eval()


@torch.no_grad()
def accuracy(model: Classifier, images: torch.Tensor | MappedImages, labels: torch.Tensor, mean, std, size: int,
             device: torch.device, batch_size: int = 512) -> dict:
    """Top-1 (and top-5 with more than 5 classes) of `model` in eval mode, fp32."""
    model.eval()
    top1 = top5 = 0
    for i in range(0, len(images), batch_size):
        logits = model(preprocess(images[i:i + batch_size].to(device), mean, std, size)).float()
        y = labels[i:i + batch_size].to(device)
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += int((best[:, 0] == y).sum())
        top5 += int((best == y[:, None]).any(1).sum())
    n = max(1, len(images))
    return {"top1": top1 / n, "top5": top5 / n if model.fc.out_features > 5 else None}
