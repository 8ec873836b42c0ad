"""augment.view_size: training views smaller than the images, while the encoder keeps the images' size."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from simclr_cli.augment import progressive_size
from simclr_cli.config import ConfigError, load_config
from simclr_cli.models.encoder_file import load_encoder
from simclr_cli.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = {"log_every": 1, "train.eval_every": 1}  # on top of the shared tiny run (tests/conftest.py)


@pytest.mark.parametrize("view_size, expected", [(None, 16), (8, 8)])
def test_views_take_view_size_and_the_encoder_keeps_the_image_size(tmp_path, view_size, expected):
    extra = [] if view_size is None else [f"augment.view_size={view_size}"]
    trainer = Trainer(tiny_config(tmp_path, *extra, epochs=1, **RUN))
    seen = []
    pair = trainer.augment.pair

    def spy(x, generator=None, size=None):
        views = pair(x, generator, size)
        seen.append(tuple(views.shape))
        return views
    trainer.augment.pair = spy
    trainer.run()
    assert seen and all(shape == (2 * 16, 3, expected, expected) for shape in seen)  # both views of 16 images
    assert load_encoder(tmp_path / "encoder.pth").image_size == 16  # probes and embeddings use the images' size
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" and 0 <= r["knn_top1"] <= 1 for r in evals)  # the monitor runs at 16 px


@pytest.mark.parametrize("progress, size", [(0.0, 16), (0.24, 16), (0.26, 20), (0.74, 20), (0.76, 24), (1.0, 24),
                                            (1.5, 24), (-0.1, 16)])
def test_progressive_size_rises_in_steps_of_four_pixels(progress, size):
    assert progressive_size(16, 24, progress) == size


def test_progressive_size_ends_at_the_final_size_when_the_range_is_not_a_multiple_of_four():
    assert [progressive_size(16, 30, p) for p in (0.0, 0.5, 0.99, 1.0)] == [16, 24, 28, 30]


def test_progressive_views_follow_the_schedule_and_the_encoder_keeps_the_image_size(tmp_path):
    # 48 images, batch 16, 2 epochs: 6 steps at progress 0, 1/6, ..., 5/6 of the schedule, 8 rising to 16 px.
    cfg = tiny_config(tmp_path, "augment.view_size_start=8", epochs=2, **RUN)
    trainer = Trainer(cfg)
    sizes = []
    pair = trainer.augment.pair

    def spy(x, generator=None, size=None):
        views = pair(x, generator, size)
        assert views.shape == (2 * 16, 3, size, size)
        sizes.append(size)
        return views
    trainer.augment.pair = spy
    trainer.run()
    assert sizes == [8, 8, 12, 12, 12, 16]
    assert load_encoder(tmp_path / "encoder.pth").image_size == 16


def test_progressive_views_cannot_start_above_the_final_size():
    with pytest.raises(ConfigError, match="view_size_start"):
        load_config(None, ["data.image_size=32", "augment.view_size=24", "augment.view_size_start=28"])
