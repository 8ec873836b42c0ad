"""Representation health: known answers for each figure, and collapse_warning calibrated on a real untrained
network (no warning) against collapsed features (a warning that names the rank and a cause)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config, tiny_set_args

from simclr_cli.config import ModelConfig
from simclr_cli.score.health import (alignment, collapse_warning, dimension_std, effective_rank, health,
                                        uniformity)
from simclr_cli.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def untrained() -> tuple[torch.Tensor, torch.Tensor]:
    """h (256, 64) and z (256, 128) of an untrained width-8 ResNet-18 (CIFAR stem) on 256 random images."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=8, stem="cifar"), 32).eval()
    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8).float() / 255 - 0.5
    with torch.no_grad():
        h = model.encoder(x)
        return h, model.head(h)


def test_effective_rank_known_answers():
    assert effective_rank(torch.eye(16)) == pytest.approx(16, abs=1e-9)  # all singular values equal
    q, _ = torch.linalg.qr(torch.randn(40, 12, dtype=torch.float64))
    assert effective_rank(3 * q) == pytest.approx(12, abs=1e-9)  # an orthogonal frame, any scale
    # singular values 3 and 1: p = (3/4, 1/4) (not squared: that would be (9/10, 1/10) and 1.38)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))  # 1.7548
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(expected, rel=1e-5)
    rank_one = torch.outer(torch.randn(64), torch.randn(32))
    assert effective_rank(rank_one) == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(torch.zeros(8, 4)) == 1.0
    assert 1.0 <= effective_rank(torch.randn(100, 10)) <= 10.0


def test_effective_rank_does_not_centre():
    """RankMe takes the embeddings as they are: a large shared offset is one dominant direction."""
    x = torch.randn(200, 16, dtype=torch.float64)
    assert effective_rank(x) > 14
    assert effective_rank(x + 100) < 1.5


def test_alignment_known_answers():
    z = torch.randn(50, 8)
    assert alignment(z, z) == pytest.approx(0.0, abs=1e-12)
    assert alignment(z, 3 * z) == pytest.approx(0.0, abs=1e-12)  # normalised first: scale is no difference
    assert alignment(z, -z) == pytest.approx(4.0, abs=1e-9)
    assert alignment(z, -z, alpha=1) == pytest.approx(2.0, abs=1e-9)
    e = torch.eye(2)
    assert alignment(e[:1], e[1:]) == pytest.approx(2.0, abs=1e-12)  # orthogonal: 2 - 2 cos = 2
    with pytest.raises(ValueError):
        alignment(z, z[:10])


def test_uniformity_known_answers():
    assert uniformity(torch.ones(30, 8)) == pytest.approx(0.0, abs=1e-12)
    e = torch.eye(2)
    assert uniformity(torch.cat([e[:1], -e[:1]])) == pytest.approx(-8.0, abs=1e-9)  # one pair at distance 2
    # uniform on the sphere in D dims: about -4 + 8 / D; never under the Jensen bound -4 N / (N - 1)
    z = torch.randn(2000, 128, generator=torch.Generator().manual_seed(0))
    assert uniformity(z) == pytest.approx(-4 + 8 / 128, abs=0.02)
    simplex = torch.eye(5) - 0.2  # 5 points of a regular simplex: the bound, -4 * 5 / 4 = -5
    assert uniformity(simplex) == pytest.approx(-5.0, abs=1e-9)
    with pytest.raises(ValueError):
        uniformity(torch.ones(1, 8))


def test_dimension_std_known_answers():
    assert dimension_std(torch.ones(30, 8) * torch.randn(8)) == pytest.approx(0.0, abs=1e-12)
    assert dimension_std(torch.randn(30, 8).abs() + 1e4) < 1e-3  # distinct rows, one shared direction
    for d in (16, 128):
        z = torch.randn(4000, d, generator=torch.Generator().manual_seed(d))
        assert dimension_std(z) == pytest.approx(1 / math.sqrt(d), rel=0.02)


def test_health_keys_and_types(untrained):
    h, z = untrained
    figures = health(h, z, z, z + 0.01 * torch.randn_like(z))
    assert set(figures) == {"rank_h", "rank_z", "rank_h_ratio", "rank_z_ratio", "z_std", "z_std_uniform",
                            "alignment", "uniformity"}
    assert all(type(v) is float for v in figures.values())
    assert figures["rank_h_ratio"] == pytest.approx(figures["rank_h"] / 64)
    assert figures["rank_z_ratio"] == pytest.approx(figures["rank_z"] / 128)
    assert figures["z_std_uniform"] == pytest.approx(1 / math.sqrt(128))
    assert health(h, z)["alignment"] is None
    with pytest.raises(ValueError):
        health(h, z[:10])


def test_untrained_network_is_not_flagged(untrained):
    """A random ResNet puts all images near one direction (z_std about 0.08 x uniform, rank_z about 5):
    healthy for a start, and no warning, alone or against itself."""
    h, z = untrained
    figures = health(h, z)
    assert 4 < figures["rank_h"] < 20 and 3 < figures["rank_z"] < 10  # what the thresholds were set against
    assert collapse_warning(None, figures) is None
    assert collapse_warning(figures, figures) is None


def test_complete_collapse_is_flagged(untrained):
    """Every image at one vector (plus 1e-4 noise): flagged against the absolute floor and against a start."""
    h, z = untrained
    collapsed = torch.randn(1, 128).expand(256, 128) + 1e-4 * torch.randn(256, 128)
    now = health(h, collapsed)
    alone = collapse_warning(None, now)
    assert alone is not None and "\n" not in alone
    assert "effective rank of z is 1.0" in alone and "(of 128 possible)" in alone and "learning rate" in alone
    against = collapse_warning(health(h, z), now)
    assert against is not None and "effective rank of z fell from" in against and "temperature" in against
    assert "std per dimension of normalised z fell from" in against


def test_dimensional_collapse_is_flagged_against_the_start():
    """z in a 4-dimensional subspace of 128: above the absolute floors (no warning alone) but a quarter
    of a healthy start's rank, so flagged against it, naming the rank and a momentum target."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(512, 64, generator=g)
    start = health(h, torch.randn(512, 128, generator=g))
    now = health(h, torch.randn(512, 4, generator=g) @ torch.randn(4, 128, generator=g))
    assert collapse_warning(None, now) is None
    message = collapse_warning(start, now)
    assert message is not None and message.startswith("representation collapse? effective rank of z fell from")
    assert f"to {now['rank_z']:.1f} (of 128 possible)" in message and "predictor" in message
    assert "std" not in message.split(";")[1]  # the rank alone fell: no std complaint


# --- non-finite features: one line, never the SVD's LinAlgError -------------------------------------------------

# The shared tiny run (tests/conftest.py) with an evaluation after epoch 1 and no checkpoint before it.
RUN = {"epochs": 2, "train.eval_every": 1, "train.checkpoint_every": 2}


def test_effective_rank_of_non_finite_rows_is_a_value_error_naming_them():
    x = torch.randn(8, 4)
    x[2, 1], x[5, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="effective rank of non-finite features: 2 of 8 rows hold NaN or Inf"):
        effective_rank(x)


def poison_after_step(monkeypatch, step: int, value: float) -> None:
    """The update of `step` (epoch 1's last of 3) leaves the first weight `value`; its loss, computed before
    the update, is finite, so the loss read-back does not see it: the evaluation after the epoch is first."""
    from simclr_cli.train import Trainer

    original = Trainer.train_step

    def train_step(self, x):
        loss = original(self, x)
        if self.state.step + 1 == step:
            next(self.model.parameters()).data.fill_(value)
        return loss
    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_non_finite_weights_at_a_health_evaluation_are_the_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from simclr_cli.cli import app

    poison_after_step(monkeypatch, 3, float("inf"))
    sets = tiny_set_args(**RUN)
    result = CliRunner().invoke(app, ["pretrain", *sets, "-o", str(tmp_path)])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output + result.stderr and "LinAlgError" not in result.output + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: weights became non-finite (") and ") by step 3 (lr " in last
    assert last.endswith("no checkpoint was written. Hint: lower optim.lr (now 0.06) and run again")
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "encoder.pth").exists()


def test_features_that_overflow_with_finite_weights_stop_the_run_in_one_line(tmp_path, monkeypatch):
    """A weight of 1e37 is finite (the check before the evaluation passes) but h overflows to Inf."""
    from simclr_cli.train import pretrain
    from simclr_cli.train.readback import NonFiniteLoss

    poison_after_step(monkeypatch, 3, 1e37)
    with pytest.raises(NonFiniteLoss, match=r"^the kNN monitor's features became non-finite \(\d+ of \d+ images "
                                            r"give NaN or Inf in h\) though the weights are finite: .* Hint: lower "
                                            r"optim.lr; checkpoints already written are kept"):
        pretrain(tiny_config(tmp_path, **RUN))


def test_a_non_finite_projection_skips_the_health_figures_with_a_warning():
    """h finite, z not (the head overflowed): kNN top-1 is still measured; the health figures are skipped."""
    from simclr_cli.data.synthetic import make_synthetic
    from simclr_cli.train.monitor import Monitor

    torch.manual_seed(0)
    model = build_model(ModelConfig(width=8), 16)
    monitor = Monitor(make_synthetic(40, 16, 0, "train"), make_synthetic(20, 16, 0, "test"), (0.5,) * 3,
                      (0.25,) * 3, 16, torch.device("cpu"), "fp32", 5, 0.1)
    model.head.blocks[-1][0].bias.data.fill_(float("inf"))  # the head gives Inf; h, the encoder's, is finite
    knn = monitor(model.encoder, projection=model.head)
    assert 0 <= knn <= 1 and monitor.last_health is None
    assert monitor.warning.startswith("health figures skipped: the projection head's z is non-finite")
