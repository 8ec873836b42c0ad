"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"): self-distillation
with no labels. A student network learns to give, for every view of an image, the distribution over K
prototypes that a teacher network gives for the image's global views.

Networks. Student and teacher have one architecture: the encoder, then a projection MLP (Linear-BN-GELU-Linear-
BN-GELU-Linear to a `bottleneck`; `batch_norm: false` leaves out the BN, as the paper's ViT heads do), its
output normalised to unit length, then the last layer of K prototypes (`method.dino.prototypes`), weight-
normalised with its gain fixed at 1 (the paper's default, norm_last_layer): each prototype is a unit vector,
so the logits are cosine similarities. `norm_last_layer: false` trains each prototype's gain (from 1, frozen
with the prototypes, no weight decay as a 1-D parameter), as the paper's code allows. Without the BN, the
width-8 ResNet of examples/cpu-dino.yaml collapsed within an epoch (z of effective rank 1.4, the loss at
log K); with it, it did not (30.12% kNN after one epoch). The teacher is an EMA of the student
(`methods.ema`), its momentum rising from `momentum` (0.996) to `momentum_end` (1) on a cosine, never trained.

Views. The two global views are the run's pair (augment.preset, at the view size); multi-crop's small views
(augment.small_crops of augment.small_crop_size px, areas augment.small_crop_scale) are the local ones. The
teacher sees the global views only; the student sees every view.

Loss. With t = softmax((g_t(x) - c) / tau_t) on each global view and s = log_softmax(g_s(x') / tau_s) on each
view, the mean over (global view q, view v != q) pairs of the batch mean of -sum_k t_k s_k (the paper's eq. 1
and Algorithm 1, generalised to multi-crop as its section 3.1). The teacher's temperature tau_t rises linearly
from `teacher_temp` (0.04) to `teacher_temp_end` (0.07) over `teacher_temp_epochs` (30), the student's is
`student_temp` (0.1). The centre c (1, K) follows the teacher's batch mean with `center_momentum` (0.9), the
mean taken over every rank's views (an all-reduce), so several processes centre as one would. Centring and
sharpening are what keep the teacher from collapsing; the loss is computed in fp32.

After backward: the prototypes get no update during the first `freeze_last_layer_epochs` (1) epochs (their
gradients are dropped, so the optimiser skips them), then the gradient norm of the student is clipped to
`clip_grad` (3; 0: no clipping; one global norm, where the paper clips each tensor on its own).

What the rest of the tool sees: the exported encoder is the student's (as for byol: the online network, the
one the optimiser trains; the paper evaluates the teacher). The encoder file carries no head; the health
monitor's "head" is the projection MLP up to the bottleneck, the z the prototypes score. With labelled training
data, K must be at least the number of classes: fewer prototypes than classes cannot keep the classes apart.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from simclr_cli.augment import Augmenter
from simclr_cli.config import Config
from simclr_cli.errors import ConfigError
from simclr_cli.methods.base import Views, with_small_views
from simclr_cli.methods.ema import MOMENTUM_RULES, EmaTarget, MomentumOptions, WithTarget, momentum_at
from simclr_cli.models import build_encoder


class DINOHead(nn.Module):
    """h -> the projection MLP -> unit z (B, bottleneck) -> cosine logits against K unit prototypes (B, K)."""

    def __init__(self, dim_in: int, hidden: int, bottleneck: int, prototypes: int, batch_norm: bool = False,
                 norm_last_layer: bool = True) -> None:
        super().__init__()
        norm = (lambda: nn.BatchNorm1d(hidden)) if batch_norm else nn.Identity
        self.mlp = nn.Sequential(nn.Linear(dim_in, hidden), norm(), nn.GELU(), nn.Linear(hidden, hidden), norm(),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck))  # (K, bottleneck): the last layer
        for m in self.mlp:
            if isinstance(m, nn.Linear):  # the paper's initialisation
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        # norm_last_layer false: each prototype's length is a trained gain (K,), from 1 (weight norm's g)
        self.gain = None if norm_last_layer else nn.Parameter(torch.ones(prototypes))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(h), dim=-1)  # (B, bottleneck), unit rows
        logits = F.linear(z, F.normalize(self.prototypes, dim=-1))  # (B, K): cosines (weight norm with gain 1)
        return logits if self.gain is None else logits * self.gain  # ... or times each prototype's gain


class Distilled(nn.Module):
    """encoder -> DINO head: x -> (h, logits over the prototypes)."""

    def __init__(self, encoder: nn.Module, dino_head: DINOHead) -> None:
        super().__init__()
        self.encoder, self.dino_head = encoder, dino_head
        self.head = None  # the encoder file carries no head: the prototypes are not probed from

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)  # (B, feature_dim)
        return h, self.dino_head(h)  # (B, K)


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float,
              student_temp: float) -> torch.Tensor:
    """student (V * B, K): every view's logits, the 2 global views first; teacher (2B, K): the global views'.
    The mean over (global q, view v != q) of the batch mean cross-entropy, in fp32; no gradient into the teacher."""
    b = teacher.shape[0] // 2
    t = F.softmax((teacher.detach().float() - center) / teacher_temp, dim=-1).split(b)  # 2 x (B, K)
    s = F.log_softmax(student.float() / student_temp, dim=-1).split(b)  # V x (B, K)
    terms = [-(tq * sv).sum(dim=-1).mean() for q, tq in enumerate(t) for v, sv in enumerate(s) if v != q]
    return sum(terms) / len(terms)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher: torch.Tensor, momentum: float) -> None:
    """center <- momentum * center + (1 - momentum) * the teacher's mean row over every rank's views."""
    total, count = teacher.float().sum(dim=0, keepdim=True), teacher.shape[0]  # (1, K)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
        count *= dist.get_world_size()
    center.mul_(momentum).add_(total / count, alpha=1 - momentum)


def ramp(step: int, steps: float, start: float, end: float) -> float:
    """`start` at step 0 rising linearly to `end` at `steps`, `end` from there on."""
    return end if step >= steps else start + (end - start) * step / steps


@dataclass
class DINOOptions(MomentumOptions):
    momentum: float = 0.996  # EMA momentum of the teacher at step 0 ...
    momentum_end: float = 1.0  # ... at the last step, on a cosine
    prototypes: int = 4096  # K, the outputs of the last layer
    hidden: int = 2048  # hidden units of the projection MLP
    bottleneck: int = 256  # its output, normalised before the prototypes
    batch_norm: bool = True  # batch norm after the MLP's hidden layers (a ResNet's head; the paper's ViTs: false)
    norm_last_layer: bool = True  # the prototypes' gain fixed at 1 (the paper's default); false: a trained gain each
    teacher_temp: float = 0.04  # the teacher's softmax temperature at the start ...
    teacher_temp_end: float = 0.07  # ... after the warm-up
    teacher_temp_epochs: float = 30.0  # epochs of the linear warm-up
    student_temp: float = 0.1  # the student's softmax temperature
    center_momentum: float = 0.9  # EMA momentum of the teacher's centre
    freeze_last_layer_epochs: float = 1.0  # epochs during which the prototypes are not updated
    clip_grad: float = 3.0  # the student's largest gradient norm; 0: no clipping


class DINOMethod(WithTarget):
    Options = DINOOptions
    RULES = [*MOMENTUM_RULES,
             ("prototypes", lambda v: 2 <= v <= 262_144, "in [2, 262144]"),
             ("hidden", lambda v: v >= 1, ">= 1"), ("bottleneck", lambda v: v >= 1, ">= 1"),
             ("teacher_temp", lambda v: v > 0, "> 0"), ("teacher_temp_end", lambda v: v > 0, "> 0"),
             ("teacher_temp_epochs", lambda v: v >= 0, ">= 0"), ("student_temp", lambda v: v > 0, "> 0"),
             ("center_momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
             ("freeze_last_layer_epochs", lambda v: v >= 0, ">= 0"), ("clip_grad", lambda v: v >= 0, ">= 0")]
    multi_crop = True

    def __init__(self, cfg: Config) -> None:
        o = self.options = cfg.method.options
        encoder = build_encoder(cfg.model, cfg.data.image_size)
        self.model = Distilled(encoder, DINOHead(encoder.feature_dim, o.hidden, o.bottleneck, o.prototypes,
                                                                o.batch_norm, o.norm_last_layer))
        self.target = EmaTarget(self.model)  # the teacher starts as the student
        self.center = torch.zeros(1, o.prototypes)  # (1, K), fp32
        a = cfg.augment
        self.small_crops = (a.small_crops, a.small_crop_size, tuple(a.small_crop_scale))
        self.epochs, self.step, self.total_steps = cfg.train.epochs, 0, 0  # the schedules' clock

    def to(self, device: torch.device, memory_format: torch.memory_format) -> DINOMethod:
        super().to(device, memory_format)
        self.center = self.center.to(device)
        return self

    def health_head(self) -> nn.Module:
        return self.model.dino_head.mlp  # h -> z, what the prototypes score (before normalisation)

    def check_data(self, data) -> None:
        classes = len(data.classes or [])
        if self.options.prototypes < classes:
            raise ConfigError(f"'method.dino.prototypes' ({self.options.prototypes}) must be at least the number of "
                              f"classes in the training data ({classes} in {data.name}): fewer prototypes than classes "
                              f"cannot keep them apart; set method.dino.prototypes={max(4096, classes)}")

    def views(self, augment: Augmenter, x: torch.Tensor, generator: torch.Generator, size: int) -> Views:
        return with_small_views(augment, x, generator, size, self.small_crops)

    def teacher_temp(self) -> float:
        o = self.options
        if not self.total_steps and o.teacher_temp_epochs > 0:  # the first step: the run's length is not known
            return o.teacher_temp  # yet, the warm-up is at its start
        per_epoch = self.total_steps / max(1, self.epochs)
        return ramp(self.step, o.teacher_temp_epochs * per_epoch, o.teacher_temp, o.teacher_temp_end)

    def loss(self, net: torch.nn.Module, views: Views, ctx: contextlib.AbstractContextManager) -> torch.Tensor:
        """views.pair (2B, ...): the global views, through student and teacher; views.small (mB, ...): the
        local views, through the student in a second forward (their own size and batch statistics)."""
        with ctx:
            _, student = net(views.pair)  # (2B, K)
            if views.small is not None:
                student = torch.cat([student, net(views.small)[1]])  # (2B + mB, K)
            with torch.no_grad():
                _, teacher = self.target.net(views.pair)  # (2B, K)
        loss = dino_loss(student, teacher, self.center, self.teacher_temp(), self.options.student_temp)
        update_center(self.center, teacher, self.options.center_momentum)
        return loss

    def before_update(self, step: int, total_steps: int) -> None:
        o = self.options
        if step < math.ceil(o.freeze_last_layer_epochs * total_steps / max(1, self.epochs)):
            head = self.model.dino_head  # frozen: the optimiser skips a parameter without a gradient
            head.prototypes.grad = None
            if head.gain is not None:
                head.gain.grad = None
        if o.clip_grad:  # after the drop: a frozen layer's gradient takes no share of the norm
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.clip_grad)

    def after_step(self, step: int, total_steps: int) -> None:
        self.step, self.total_steps = step, total_steps
        self.target.update(self.model, momentum_at(step, total_steps, self.options.momentum, self.options.momentum_end))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "center": self.center, "step": self.step, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.center.copy_(state["center"])
        self.step, self.total_steps = int(state["step"]), int(state["total_steps"])
