"""NT-Xent: the vectorised loss against the Algorithm 1 oracle, its invariances, and two gloo ranks."""

from __future__ import annotations

import math
import os

import pytest
import torch
from ranks import run_ranks  # tests/ranks.py

from simclr_cli.methods.simclr import nt_xent

pytestmark = pytest.mark.usefixtures("one_thread")


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Algorithm 1 of the paper with plain loops, in float64: slow and obvious, for tests only.

    Views are interleaved as in the paper: z_{2k-1} = z1[k], z_{2k} = z2[k] (1-based), and
    L = 1/(2N) sum_k [ l(2k-1, 2k) + l(2k, 2k-1) ],
    l(i, j) = -log( exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau) ).
    """
    n = z1.shape[0]
    z = []
    for k in range(n):
        z.append(z1[k].double())
        z.append(z2[k].double())

    def s(i: int, j: int) -> torch.Tensor:  # cosine similarity, 0-based indices
        return torch.dot(z[i], z[j]) / (torch.linalg.norm(z[i]) * torch.linalg.norm(z[j]))

    def l(i: int, j: int) -> torch.Tensor:
        denominator = sum(torch.exp(s(i, k) / temperature) for k in range(2 * n) if k != i)
        return -torch.log(torch.exp(s(i, j) / temperature) / denominator)

    total = sum(l(2 * k, 2 * k + 1) + l(2 * k + 1, 2 * k) for k in range(n))
    return total / (2 * n)


def _pair(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


@pytest.mark.parametrize("n, d", [(1, 4), (2, 3), (5, 16), (16, 128)])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_matches_algorithm_1(n: int, d: int, temperature: float) -> None:
    z1, z2 = _pair(n, d, seed=n * 1000 + d)
    got = nt_xent(z1, z2, temperature)
    want = nt_xent_reference(z1, z2, temperature)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)


def test_correlated_views_match_oracle() -> None:
    # Near-positive pairs make the positive logit dominate: the regime training actually reaches.
    z1, noise = _pair(8, 32, seed=3)
    z2 = z1 + 0.05 * noise
    for t in (0.05, 0.2):
        assert nt_xent(z1, z2, t).item() == pytest.approx(nt_xent_reference(z1, z2, t).item(), abs=1e-5)


def test_symmetric_in_views() -> None:
    z1, z2 = _pair(7, 10)
    assert nt_xent(z1, z2).item() == pytest.approx(nt_xent(z2, z1).item(), abs=1e-6)


@pytest.mark.parametrize("n", [1, 2, 9])
def test_identical_embeddings_give_log_2n_minus_1(n: int) -> None:
    z = torch.ones(n, 5)
    assert nt_xent(z, z.clone(), 0.3).item() == pytest.approx(math.log(2 * n - 1), abs=1e-6)


def test_scale_invariant() -> None:
    z1, z2 = _pair(6, 8)
    assert nt_xent(3 * z1, 3 * z2).item() == pytest.approx(nt_xent(z1, z2).item(), abs=1e-6)


def test_gradient_finite_and_nonzero() -> None:
    z1, z2 = (t.requires_grad_() for t in _pair(6, 8))
    nt_xent(z1, z2, 0.1).backward()
    for z in (z1, z2):
        assert torch.isfinite(z.grad).all()
        assert z.grad.abs().sum() > 0


def test_falls_under_adam_steps() -> None:
    z1, z2 = (t.requires_grad_() for t in _pair(8, 16, seed=1))
    opt = torch.optim.Adam([z1, z2], lr=0.05)
    first = nt_xent(z1, z2).item()
    for _ in range(20):
        opt.zero_grad()
        loss = nt_xent(z1, z2)
        loss.backward()
        opt.step()
    assert nt_xent(z1, z2).item() < first - 0.5


def test_fp32_from_bf16_inputs_and_autocast() -> None:
    z1, z2 = (t.bfloat16() for t in _pair(4, 8))
    assert nt_xent(z1, z2).dtype == torch.float32
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = nt_xent(z1, z2)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(nt_xent_reference(z1.float(), z2.float()).item(), abs=1e-5)


@pytest.mark.parametrize(
    "z1, z2, temperature",
    [
        (torch.zeros(0, 4), torch.zeros(0, 4), 0.5),  # no images
        (torch.zeros(3, 4), torch.zeros(2, 4), 0.5),  # mismatched views
        (torch.zeros(3), torch.zeros(3), 0.5),  # not (n, D)
        (torch.ones(3, 4), torch.ones(3, 4), 0.0),  # temperature must be > 0
    ],
)
def test_bad_inputs_raise(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> None:
    with pytest.raises(ValueError):
        nt_xent(z1, z2, temperature)


# --- two gloo ranks on CPU ---------------------------------------------------------------------

WORLD = 2


def _rank_worker(rank: int, z1: torch.Tensor, z2: torch.Tensor, out_dir: str) -> None:
    n = z1.shape[0] // WORLD
    result = {}
    for gather in (True, False):
        local1 = z1[rank * n : (rank + 1) * n].clone().requires_grad_()
        local2 = z2[rank * n : (rank + 1) * n].clone().requires_grad_()
        loss = nt_xent(local1, local2, temperature=0.2, gather=gather)
        loss.backward()
        result[gather] = (loss.detach(), local1.grad, local2.grad)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_ranks_match_one_process(tmp_path) -> None:
    z1, z2 = _pair(2 * WORLD, 6, seed=7)  # global N = 4, n = 2 per rank
    run_ranks(_rank_worker, (z1, z2, str(tmp_path)), WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    g1, g2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    single = nt_xent(g1, g2, temperature=0.2)
    single.backward()

    losses = torch.stack([r[True][0] for r in ranks])
    assert losses.mean().item() == pytest.approx(single.item(), abs=1e-5)
    # What DDP does to parameter gradients: average over ranks, i.e. divide the summed grads by W.
    grad1 = torch.cat([r[True][1] for r in ranks]) / WORLD
    grad2 = torch.cat([r[True][2] for r in ranks]) / WORLD
    torch.testing.assert_close(grad1, g1.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad2, g2.grad, atol=1e-5, rtol=0)

    # Without gathering each rank only sees its own 2n - 2 negatives: a different loss.
    local_only = torch.stack([r[False][0] for r in ranks]).mean()
    assert abs(local_only.item() - single.item()) > 1e-3
