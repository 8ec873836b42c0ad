"""augment.view_size: training views smaller than the images, while the encoder keeps the images' size."""

from __future__ import annotations

import json

import pytest

from simclr_cli.encoder_file import load_encoder
from simclr_cli.config import load_config
from simclr_cli.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["data.dataset=synthetic", "data.synthetic_size=48", "data.image_size=16", "model.width=8",
        "train.batch_size=16", "train.precision=fp32", "train.device=cpu", "train.log_every=1", "train.epochs=1",
        "train.eval_every=1"]


@pytest.mark.parametrize("view_size, expected", [(None, 16), (8, 8)])
def test_views_take_view_size_and_the_encoder_keeps_the_image_size(tmp_path, view_size, expected):
    extra = [] if view_size is None else [f"augment.view_size={view_size}"]
    trainer = Trainer(load_config(None, [*TINY, f"train.output_dir={tmp_path}", *extra]))
    seen = []
    augment = trainer.augment

    def spy(x, generator=None):
        views = augment(x, generator)
        seen.append(tuple(v.shape for v in views))
        return views
    trainer.augment = spy
    trainer.run()
    assert seen and all(shapes == ((16, 3, expected, expected),) * 2 for shapes in seen)
    assert load_encoder(tmp_path / "encoder.pth").image_size == 16  # probes and embeddings use the images' size
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" and 0 <= r["knn_top1"] <= 1 for r in evals)  # the monitor runs at 16 px
