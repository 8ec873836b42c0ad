"""Representation health: numbers that tell a collapsing run from a learning one, before kNN accuracy does.

A self-supervised loss can be satisfied by a useless answer: every image mapped to one point (complete
collapse) or to a low-dimensional subspace (dimensional collapse). kNN top-1 notices late and needs labels;
these figures need neither, and are computed on the features of the monitor's held-out images:

- the effective rank of h and of z (RankMe, Garrido et al. 2023): how many directions the features use;
- alignment and uniformity on the sphere (Wang and Isola 2020): positives close, everything spread out;
- the mean per-dimension standard deviation of the L2-normalised z, the collapse indicator of BYOL and
  SimSiam (Chen and He 2021): about 1/sqrt(D) for points spread over the sphere, 0 for collapse.

`health` gathers them for one evaluation; `collapse_warning` turns two of them (the first evaluation's and
the latest) into one line naming what fell and the usual causes, or None. Pure torch, CPU float64 maths,
no I/O.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RANKME_EPS = 1e-7  # RankMe's epsilon in p_k = s_k / ||s||_1 + eps (Garrido et al. 2023, eq. 1)
UNIFORMITY_ROWS = 4096  # uniformity on at most this many rows: 8.4 M pairs, 67 MB of float64 distances

# collapse_warning's thresholds; the reasons are in its body.
MIN_RANK = 2.0  # effective rank of h or z below this: the features are (nearly) one direction
RANK_DROP = 0.25  # effective rank of z below this fraction of the first evaluation's
STD_FLOOR = 0.01  # std per dimension of normalised z below this fraction of 1/sqrt(D_z)
STD_DROP = 0.1  # ... or below this fraction of the first evaluation's
CAUSES = ("likely causes: a learning rate too high, a temperature too low or too high, or for a momentum "
          "method (byol) a target without its predictor or a momentum too low")


def _sphere(x: torch.Tensor) -> torch.Tensor:
    """(N, D) rows -> float64 CPU rows of unit L2 norm (N, D); a zero row stays zero."""
    return F.normalize(x.detach().to("cpu", torch.float64), dim=1)


def effective_rank(x: torch.Tensor) -> float:
    """RankMe (Garrido et al. 2023, "RankMe: assessing the downstream performance of pretrained
    self-supervised representations by their rank"): exp of the entropy of the singular values of x (N, D)
    normalised to sum 1, p_k = s_k / sum(s) + eps. The embeddings are used as they are, not centred, as in
    the paper: a shared offset counts as one direction. Between 1 (one direction, or all zero) and
    min(N, D) (all singular values equal, an orthogonal frame); computed in float64 on the CPU. NaN or Inf
    in x is a ValueError naming the rows (the SVD would not converge: LinAlgError)."""
    x = x.detach().to("cpu", torch.float64)
    bad = int((~torch.isfinite(x)).any(dim=-1).sum())  # rows (N, D) -> how many hold NaN or Inf
    if bad:
        raise ValueError(f"effective rank of non-finite features: {bad} of {x.shape[0]} rows hold NaN or Inf")
    s = torch.linalg.svdvals(x)  # (min(N, D),)
    total = s.sum()
    if s.numel() == 0 or total <= 0:
        return 1.0  # no direction at all: as collapsed as one direction
    p = s / total + RANKME_EPS
    rank = math.exp(-(p * p.log()).sum().item())
    return min(max(rank, 1.0), float(s.numel()))  # eps lifts an exact frame a hair above min(N, D)


def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2) -> float:
    """Wang and Isola (2020) alignment: E ||f(x) - f(y)||_2^alpha over the positive pairs (row i of z1 (N, D)
    and row i of z2 (N, D), two views of one image), on L2-normalised rows. 0 when the views map to the
    same point; with alpha 2 it is 2 - 2 cos, so 2 for orthogonal and 4 for opposite views. Lower is better."""
    if z1.shape != z2.shape:
        raise ValueError(f"alignment needs two views of the same images, got shapes {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    return (_sphere(z1) - _sphere(z2)).norm(dim=1).pow(alpha).mean().item()


def uniformity(z: torch.Tensor, t: float = 2) -> float:
    """Wang and Isola (2020) uniformity: log E_{i != j} exp(-t ||z_i - z_j||^2) over the distinct pairs of
    L2-normalised rows of z (N, D), N >= 2 (the first UNIFORMITY_ROWS rows when there are more). 0 when all
    rows coincide; more negative is more uniform. By Jensen it is >= -2t N / (N - 1), the value of a regular
    simplex of N <= D + 1 points; for t = 2 that tends to -4, which points spread over a high-dimensional
    sphere approach: uniform points on the sphere in D dimensions give about -4 + 8 / D (-3.94 at D = 128)."""
    if z.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 rows, got {z.shape[0]}")
    d2 = torch.pdist(_sphere(z[:UNIFORMITY_ROWS])).pow(2)  # (N (N - 1) / 2,) squared distances, each pair once
    return d2.mul(-t).exp().mean().log().item()


def dimension_std(z: torch.Tensor) -> float:
    """The mean over dimensions of the standard deviation over rows of the L2-normalised z (N, D): the
    collapse indicator of BYOL / SimSiam (Chen and He 2021, section 4.1). Rows spread uniformly over the
    sphere in D dimensions have zero mean and variance 1/D per coordinate, so about 1/sqrt(D); all rows
    equal (collapse) give 0. A shared offset lowers it even when the rows still differ."""
    if z.shape[0] < 2:
        raise ValueError(f"dimension_std needs at least 2 rows, got {z.shape[0]}")
    return _sphere(z).std(dim=0).mean().item()


def health(h: torch.Tensor, z: torch.Tensor, z1: torch.Tensor | None = None,
           z2: torch.Tensor | None = None) -> dict[str, float | None]:
    """The health figures of one evaluation: h (N, D_h) and z (N, D_z) are the representation and the
    projection of the same N >= 2 images; z1, z2 (M, D_z), if given, the projections of two views of M
    images, for alignment (None without them). All Python floats:

    rank_h, rank_z: effective ranks (RankMe); rank_h_ratio, rank_z_ratio: each over its most, min(N, D);
    z_std: dimension_std(z), with z_std_uniform = 1/sqrt(D_z) its value for a uniform spread; alignment;
    uniformity of z. Ranks are capped by N, so N should be at least D_h for rank_h to mean much."""
    n, d_h, d_z = h.shape[0], h.shape[1], z.shape[1]
    if z.shape[0] != n:
        raise ValueError(f"h and z must describe the same images, got {n} and {z.shape[0]} rows")
    rank_h, rank_z = effective_rank(h), effective_rank(z)
    return {"rank_h": rank_h, "rank_z": rank_z,
            "rank_h_ratio": rank_h / min(n, d_h), "rank_z_ratio": rank_z / min(n, d_z),
            "z_std": dimension_std(z), "z_std_uniform": 1 / math.sqrt(d_z),
            "alignment": alignment(z1, z2) if z1 is not None and z2 is not None else None,
            "uniformity": uniformity(z)}


def collapse_warning(first: dict | None, now: dict, min_rank: float = MIN_RANK, drop: float = RANK_DROP,
                     std_floor: float = STD_FLOOR, std_drop: float = STD_DROP) -> str | None:
    """One line when `now` (a `health` dict) looks collapsed, absolutely or against `first` (the first
    evaluation's, or None), naming what was measured and the likely causes; None when it looks healthy."""
    # Measured on an untrained ResNet-18 (width 8, CIFAR stem, 256 random images, 3 seeds): rank_h 7.0-10.4,
    # rank_z 4.6-5.5, z_std 0.0067-0.0080 = 0.08-0.09 x 1/sqrt(128), uniformity -0.02 to -0.03. Random
    # weights map all images near one shared direction, so a healthy start already looks half collapsed
    # by the std and uniformity measures; the absolute floors sit well under it, the rest is relative.
    # (a) min_rank 2, a count, not a ratio of min(N, D) (which scales with the head's width): under 2, one
    # singular value carries nearly all the energy, every image is close to a multiple of one vector
    # (a single vector plus 1e-4 noise measures 1.01); the untrained network is 2.3x above it.
    # (b) drop 0.25: a run that learns keeps or raises the rank of z; losing three quarters of it is
    # dimensional collapse under way, even above the floor.
    # (c) std_floor 0.01 x 1/sqrt(D): a tenth of the untrained network's spread; std_drop 0.1: a tenth
    # of the first evaluation's. BYOL / SimSiam report collapse as exactly this std going to 0.
    found = []
    for name in ("h", "z"):
        rank, most = now[f"rank_{name}"], round(now[f"rank_{name}"] / now[f"rank_{name}_ratio"])
        if first is not None and name == "z" and rank < drop * first["rank_z"]:
            found.append(f"effective rank of z fell from {first['rank_z']:.1f} to {rank:.1f} (of {most} possible)")
        elif rank < min_rank:
            found.append(f"effective rank of {name} is {rank:.2f} (of {most} possible), under {min_rank:g}")
    std, uniform = now["z_std"], now["z_std_uniform"]
    if std < std_floor * uniform or (first is not None and std < std_drop * first["z_std"]):
        was = f"fell from {first['z_std']:.4f} to" if first is not None else "is"
        found.append(f"std per dimension of normalised z {was} {std:.5f} (uniform spread: {uniform:.4f})")
    if not found:
        return None
    return f"representation collapse? {'; '.join(found)}; {CAUSES}"
