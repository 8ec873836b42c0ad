"""What a run shows while it runs: the data-wait share of every log window, the representation's health at
every monitor evaluation, and the collapse warning (a run made to collapse gets it, a healthy one not)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config

from simclr_cli.train import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

# on top of the shared tiny run (tests/conftest.py)
RUN = {"synthetic_size": 256, "batch_size": 32, "train.eval_every": 1, "train.eval_split": "val", "data.val_size": 64}


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def test_every_window_has_its_data_wait_and_every_evaluation_its_health(tmp_path):
    events = []
    pretrain(tiny_config(tmp_path, epochs=2, **RUN),
             callback=lambda event, data: events.append((event, data)))
    steps, evals = records(tmp_path, "step"), records(tmp_path, "eval")
    assert steps and all(0 <= r["data_wait"] < 1 for r in steps)
    assert len(evals) == 2
    for r in evals:
        assert 1 <= r["rank_h"] <= 64 and 1 <= r["rank_z"] <= 64 and 0 <= r["alignment"] <= 4
        assert r["uniformity"] <= 0 and r["z_std"] > 0
    assert not records(tmp_path, "warning")  # a healthy run: no collapse warning


def test_a_run_made_to_collapse_is_warned_with_its_causes(tmp_path):
    """Weight decay 50 drives every decayed weight of the head to zero within a few steps: z becomes the head's
    last bias, one vector for every image."""
    events = []
    pretrain(tiny_config(tmp_path, "optim.weight_decay=50", "optim.lr=0.5", epochs=3, **RUN),
             callback=lambda event, data: events.append((event, data)))
    warnings = records(tmp_path, "warning")
    assert warnings and "representation collapse?" in warnings[-1]["message"]
    assert "effective rank of z" in warnings[-1]["message"] and "learning rate" in warnings[-1]["message"]
    assert any(event == "notice" and "collapse" in data["message"] for event, data in events)


def test_a_resumed_run_judges_collapse_against_the_runs_first_evaluation(tmp_path, monkeypatch):
    from simclr_cli.train import monitor

    pretrain(tiny_config(tmp_path, epochs=1, **RUN))
    judged = []
    real = monitor.collapse_warning
    monkeypatch.setattr(monitor, "collapse_warning", lambda first, now: judged.append(first) or real(first, now))
    pretrain(tiny_config(tmp_path, epochs=2, **RUN), resume=True)
    first = records(tmp_path, "eval")[0]
    assert len(judged) == 1 and judged[0]["step"] == first["step"] and judged[0]["rank_z"] == first["rank_z"]


def test_a_collapse_warning_reaches_the_live_loggers(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrain(tiny_config(tmp_path, "optim.weight_decay=50", "optim.lr=0.5", "train.loggers=[tensorboard]", epochs=3,
                         **RUN))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    texts = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("warnings/text_summary")]
    assert texts and texts[-1] == records(tmp_path, "warning")[-1]["message"]
