"""What a first GPU and a first multi-process run would meet, shown on the CPU: precision and library settings
chosen for a GPU's capabilities (monkeypatched), a fixed GPU refused under torchrun, a stop agreed by every
rank at the next step, the kNN monitor sharded over ranks, a stop during the monitor or the set-up, SyncBatchNorm
reaching the target networks, --auto-resume (rank 0's decision on every rank), the live loggers on several
ranks (a refusal on every rank, closed after the last collective), and batches read ahead of the step. What only a GPU can show is in
tests/test_cuda.py."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_overrides, tiny_set_args
from ranks import run_ranks  # tests/ranks.py
from typer.testing import CliRunner

from simclr_cli import runtime
from simclr_cli.cli import app
from simclr_cli.config import ModelConfig
from simclr_cli.data import make_synthetic
from simclr_cli.data.batches import BatchStream
from simclr_cli.errors import CheckpointError, LoggerError, RuntimeSetupError
from simclr_cli.models import build_model
from simclr_cli.runtime import INFERENCE_PRECISIONS, DistInfo, configure_cuda, init_distributed, resolve_precision
from simclr_cli.train import Trainer, launch, pretrain
from simclr_cli.train import loop as train
from simclr_cli.train import monitor as evaluate
from simclr_cli.train.interrupt import StopFlag, StopRequested
from simclr_cli.train.monitor import Monitor
from simclr_cli.train.state import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA = torch.device("cuda", 0)  # a device object is all resolve_precision looks at; no GPU is touched


# --- precision and CUDA library settings ---------------------------------------------------------------------


@pytest.mark.parametrize("capability, training, inference", [
    ((7, 5), "fp16", "fp32"),  # T4, RTX 20xx: bf16 only emulated; probe and embed allow no fp16
    ((7, 0), "fp16", "fp32"),  # V100
    ((8, 0), "bf16", "bf16"),  # A100
    ((9, 0), "bf16", "bf16"),  # H100, H200
])
def test_auto_precision_takes_bf16_only_where_the_gpu_has_it(monkeypatch, capability, training, inference):
    monkeypatch.delenv(runtime.PRECISION_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # as torch says on a T4
    assert resolve_precision("auto", CUDA) == training
    assert resolve_precision("auto", CUDA, INFERENCE_PRECISIONS) == inference


@pytest.fixture
def cuda_flags():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("precision, training, tf32", [("fp32", True, True), ("bf16", True, False),
                                                       ("fp16", True, False), ("fp32", False, False)])
def test_cudnn_benchmark_always_and_tf32_only_for_fp32_training(cuda_flags, precision, training, tf32):
    torch.backends.cudnn.benchmark = False
    shown = configure_cuda(CUDA, precision, training)
    assert torch.backends.cudnn.benchmark
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)
    assert shown == f"cudnn.benchmark on, TF32 {'on' if tf32 else 'off'} for fp32 matmuls and convolutions"
    assert configure_cuda(torch.device("cpu"), precision, training) is None


# --- several processes --------------------------------------------------------------------------------------


def test_a_fixed_gpu_under_torchrun_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeSetupError, match="train.device=cuda:1 would put all 2 processes on one GPU"):
        init_distributed("cuda:1")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(launch, "run_torchrun", lambda *a: pytest.fail("no rank may start"))
    result = CliRunner().invoke(app, ["pretrain", "--nproc", "2", "--device", "cuda:1", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "would put all 2 processes on one GPU" in result.output


def _as_rank(rank: int) -> None:
    """What torchrun sets: the Trainer reads the group's shape from the environment."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))


def _stop_rank(rank: int, out: str) -> None:
    _as_rank(rank)
    trainer = Trainer(tiny_config(Path(out), "data.synthetic_size=320", "train.log_every=1000", "train.epochs=50"))
    flag, step = StopFlag(), trainer.train_step

    def train_step(x):
        loss = step(x)
        if rank == 1 and trainer.state.step + 1 == 3:  # rank 1 alone is signalled, during step 3
            flag.signal_name = "SIGTERM"
        return loss
    trainer.train_step = train_step
    try:
        trainer.run(flag)
    except StopRequested as stop:
        Path(out, f"rank{rank}.json").write_text(json.dumps({"step": stop.step, "saved": stop.saved}))


def test_every_rank_stops_at_the_step_after_a_signal_to_one_of_them(tmp_path):
    """Log windows of 1,000 steps: the stop is agreed every step, not at the next loss read-back."""
    run_ranks(_stop_rank, (str(tmp_path),))
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"step": 3, "saved": True}
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3


def _resume_rank(rank: int, out: str, stop_at: int | None) -> None:
    """The tiny run on two ranks (3 steps an epoch, 2 epochs): straight (stop_at None), or stopped after step
    `stop_at` and resumed by a second Trainer in the same group."""
    _as_rank(rank)
    cfg = tiny_config(Path(out), "train.eval_every=0", epochs=2)
    trainer, flag = Trainer(cfg), StopFlag()
    if stop_at is not None:
        step = trainer.train_step

        def train_step(x):
            loss = step(x)
            if trainer.state.step + 1 == stop_at:
                flag.signal_name = "SIGTERM"
            return loss
        trainer.train_step = train_step
        try:
            trainer.run(flag)
        except StopRequested:
            pass
        pretrain(cfg, resume=True)  # what --resume runs, in this group
    else:
        trainer.run(flag)


def test_a_resume_mid_epoch_on_two_ranks_continues_every_ranks_views(tmp_path):
    """Each rank draws views of its own: the checkpoint keeps every rank's augmentation stream, so a stop at step
    4 of 6 (mid-epoch 2) resumes to the straight run's weights, not only rank 0's views."""
    run_ranks(_resume_rank, (str(tmp_path / "straight"), None))
    run_ranks(_resume_rank, (str(tmp_path / "stopped"), 4))
    kept = load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")
    assert kept["step"] == 6 and len(kept["rng"]["augment_ranks"]) == 2
    reference = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["model"]
    assert all(torch.equal(kept["model"][k], reference[k]) for k in reference)
    resumes = [line for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines() if "resume" in line]
    assert resumes == ['{"kind": "resume", "epoch": 1, "step": 4}']


def _monitor(ranks: DistInfo | None) -> tuple[Monitor, torch.nn.Module]:
    bank, queries = make_synthetic(101, 16, 0, "train"), make_synthetic(37, 16, 0, "test")  # shares of unequal size
    torch.manual_seed(0)
    encoder = build_model(ModelConfig(width=8)).encoder
    monitor = Monitor(bank, queries, (0.5,) * 3, (0.25,) * 3, 16, torch.device("cpu"), "fp32", 20, 0.1, ranks)
    return monitor, encoder


def _monitor_rank(rank: int, out: str) -> None:
    monitor, encoder = _monitor(DistInfo(rank, 2, rank))
    features = monitor.features(encoder, monitor.bank, None)
    torch.save({"knn": monitor(encoder), "features": features}, Path(out, f"rank{rank}.pt"))


def test_the_monitor_sharded_over_two_ranks_gives_one_process_result(tmp_path):
    run_ranks(_monitor_rank, (str(tmp_path),))
    monitor, encoder = _monitor(None)
    single = monitor.features(encoder, monitor.bank, None)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r in ranks:  # every rank holds every image's features, in order
        torch.testing.assert_close(r["features"], single, rtol=0, atol=1e-5)
    assert ranks[0]["knn"] == monitor(encoder) and ranks[1]["knn"] is None  # rank 0 votes


# --- a stop wherever the run is -----------------------------------------------------------------------------


def test_a_stop_during_the_monitor_is_taken_between_batches_and_saved(tmp_path, monkeypatch):
    """Epoch 1 ends without a checkpoint (checkpoint_every 2), the monitor starts, SIGTERM arrives while it
    extracts: the run stops before the monitor's next batch and saves epoch 1's state."""
    extract = evaluate.extract_features

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return extract(*args, **kwargs)
    monkeypatch.setattr(evaluate, "extract_features", signalled)
    with pytest.raises(StopRequested) as stop:
        pretrain(tiny_config(tmp_path, "train.eval_every=1", "train.checkpoint_every=2"))
    assert (stop.value.signal_name, stop.value.step, stop.value.saved) == ("SIGTERM", 3, True)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "eval" not in kinds  # the monitor did not finish


def _slow_load_after_a_signal(monkeypatch):
    load = train.load_train_set

    def slow(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # while a large folder is being decoded into its cache, say
        time.sleep(20)
        return load(*args, **kwargs)
    monkeypatch.setattr(train, "load_train_set", slow)


def test_a_signal_during_set_up_ends_it_at_once(tmp_path, monkeypatch):
    _slow_load_after_a_signal(monkeypatch)
    t0 = time.monotonic()
    with pytest.raises(StopRequested) as stop:
        pretrain(tiny_config(tmp_path))
    assert time.monotonic() - t0 < 10  # not after the 20 s load: torchrun would have sent SIGKILL by then
    assert (stop.value.checkpoint, stop.value.saved) == (None, False)


def test_a_signal_while_a_resume_is_set_up_names_the_checkpoint_kept(tmp_path, monkeypatch):
    pretrain(tiny_config(tmp_path, "train.epochs=1"))
    _slow_load_after_a_signal(monkeypatch)
    with pytest.raises(StopRequested) as stop:
        pretrain(tiny_config(tmp_path, "train.epochs=2"), resume=True)
    assert (stop.value.checkpoint, stop.value.step, stop.value.saved) == (str(tmp_path / "checkpoint.pt"), 3, False)


# --- SyncBatchNorm, --auto-resume ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["simclr", "moco", "byol"])
def test_sync_bn_converts_every_network_the_method_runs(tmp_path, monkeypatch, method):
    """torch's SyncBatchNorm runs on GPUs only (DDP refuses it on the CPU), so the wrapping is watched with
    DDP stood in for: the target network of moco and byol must normalise over every rank's views too."""
    trainer = Trainer(tiny_config(tmp_path, f"method.name={method}", "model.sync_bn=true"))
    monkeypatch.setattr(train, "wrap_ddp", lambda net, device: net)
    trainer.ranks = DistInfo(0, 2)
    trainer.net = train.wrap_for_step(trainer.method, trainer.cfg, trainer.ranks, trainer.device)
    networks = [trainer.model, trainer.net] + ([trainer.method.target.net] if method != "simclr" else [])
    plain = [type(m).__name__ for net in networks for m in net.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(m, torch.nn.SyncBatchNorm)]
    assert not plain
    assert all(p in {id(q) for g in trainer.optimizer.param_groups for q in g["params"]} for p in
               map(id, trainer.model.parameters()))  # the optimiser still holds the converted layers' parameters


def test_auto_resume_starts_then_continues(tmp_path):
    args = ["pretrain", "--auto-resume", "-o", str(tmp_path), *tiny_set_args()]
    first = CliRunner().invoke(app, [*args, "--set", "train.epochs=1"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, [*args, "--set", "train.epochs=2"])  # what a restarted job runs
    assert again.exit_code == 0, again.output
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 6
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("resume") == 1
    both = CliRunner().invoke(app, [*args, "--resume"])
    assert both.exit_code == 2 and "give one" in both.output


def _hide(path: Path):
    """This process sees no `path`, as a node whose shared file system has not yet seen a file another node
    wrote (NFS's attribute cache after a restart): stat says there is none. Returns the undo."""
    exists, is_file = Path.exists, Path.is_file
    Path.exists = lambda self, *a, **k: False if self == path else exists(self, *a, **k)
    Path.is_file = lambda self, *a, **k: False if self == path else is_file(self, *a, **k)

    def undo():
        Path.exists, Path.is_file = exists, is_file
    return undo


def _auto_resume_rank(rank: int, out: str) -> None:
    """Each rank runs what `torchrun ... simclr pretrain --auto-resume` runs on it (resolve_config, then
    pretrain), first with rank 1's node not seeing checkpoint.pt, then rank 0's, then with rank 1 reading an
    older checkpoint.pt; last, each rank restores a checkpoint of its own through Trainer.resume."""
    from simclr_cli.train import preflight as checks
    from simclr_cli.train.preflight import resolve_config

    _as_rank(rank)
    run, older = Path(out, "run"), Path(out, "older.pt")
    settings = tiny_overrides("train.epochs=3")
    seen = {}
    for case, unseen_by in (("unseen", 1), ("unseen by rank 0", 0)):
        undo = _hide(run / "checkpoint.pt") if rank == unseen_by else (lambda: None)
        cfg, resume = resolve_config(None, settings, {"train.output_dir": str(run)}, False, auto_resume=True)
        try:
            pretrain(cfg, resume)
        except CheckpointError as err:
            seen[case] = [resume, str(err)]
        undo()
    if rank == 1:  # this node's file system still serves an older checkpoint.pt
        checks.load_checkpoint = lambda path: load_checkpoint(older)
    cfg, resume = resolve_config(None, settings, {"train.output_dir": str(run)}, False, auto_resume=True)
    try:
        pretrain(cfg, resume)
    except CheckpointError as err:
        seen["older"] = [resume, str(err)]
    trainer = Trainer(cfg, resuming=True)
    try:
        trainer.resume(load_checkpoint(older if rank == 1 else run / "checkpoint.pt"))
    except CheckpointError as err:
        seen["restored"] = str(err)
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))


def test_auto_resume_is_rank_0s_decision_and_every_rank_checks_the_step(tmp_path):
    """A node that does not see checkpoint.pt yet would start from step 0 while the others resume; one that
    reads an older copy would resume from another step. Rank 0 decides (its config, resume or not, the step),
    every rank reads the checkpoint and checks the step, and all refuse with the same line."""
    run = tmp_path / "run"
    pretrain(tiny_config(run, "train.epochs=1"))  # step 3: the older checkpoint.pt
    (tmp_path / "older.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    pretrain(tiny_config(run, "train.epochs=2"), resume=True)  # step 6
    run_ranks(_auto_resume_rank, (str(tmp_path),))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["unseen"][0] for r in ranks] == [True, False]  # rank 1 alone would have started a new run
    assert ranks[0]["unseen"][1] == ranks[1]["unseen"][1] == (
        f"rank 1 does not see {run / 'checkpoint.pt'}, which rank 0 resumes from (step 6): every node must see "
        "the run directory as rank 0 does; on a shared file system that caches file attributes (NFS), start "
        "again once every node sees the file")
    assert [r["unseen by rank 0"][0] for r in ranks] == [False, True]  # rank 0 would have started over it
    assert ranks[0]["unseen by rank 0"][1] == ranks[1]["unseen by rank 0"][1] == (
        f"rank 1 sees {run / 'checkpoint.pt'}, which rank 0 does not (it starts a new run there): every node must "
        "see the run directory as rank 0 does; on a shared file system that caches file attributes (NFS), start "
        "again once every node sees the same files")
    assert ranks[0]["older"] == ranks[1]["older"]
    assert ranks[0]["older"][1].startswith(f"the ranks read different checkpoints from {run / 'checkpoint.pt'} "
                                           "(rank 0 step 6, rank 1 step 3): ")
    assert ranks[0]["restored"] == ranks[1]["restored"] == ranks[0]["older"][1]  # after restoring, the same check
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 6  # nothing trained, nothing written over


# --- the live loggers on several ranks ---------------------------------------------------------------------


def _logger_cannot_start_rank(rank: int, out: str) -> None:
    from simclr_cli.train import trackers

    _as_rank(rank)
    if rank == 0:  # the only rank that opens the loggers
        def denied(self, *args):
            raise PermissionError(13, "Permission denied", str(Path(out, "tensorboard")))
        trackers.TensorBoard.__init__ = denied
    try:
        pretrain(tiny_config(Path(out), "train.loggers=[tensorboard]"))
    except LoggerError as err:
        Path(out, f"rank{rank}.txt").write_text(str(err))


def test_a_logger_that_cannot_start_stops_every_rank_with_its_line(tmp_path):
    """Rank 0 alone opens the loggers; had it stopped alone, rank 1 would wait in the next step's collective
    (torchrun stops it, srun or mpirun would not)."""
    run_ranks(_logger_cannot_start_rank, (str(tmp_path),))
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert lines[0] == lines[1]
    assert lines[0].startswith("tensorboard could not start (PermissionError: [Errno 13] Permission denied")
    assert not (tmp_path / "checkpoint.pt").exists()


def _slow_close_rank(rank: int, out: str) -> None:
    """In torchrun's environment: pretrain joins the group, and leaves it, itself."""
    from simclr_cli.train import trackers

    if rank == 0:
        close = trackers.TensorBoard.close

        def slow_close(self, status):  # a W&B upload, an MLflow server's retries
            time.sleep(3)
            close(self, status)
            Path(out, "closed").write_text(repr(time.time()))
        trackers.TensorBoard.close = slow_close
    pretrain(tiny_config(Path(out, "run"), "train.loggers=[tensorboard]", "train.epochs=1", "train.dist_timeout_min=1"))
    Path(out, f"rank{rank}.returned").write_text(repr(time.time()))


def test_rank_0_closes_its_loggers_after_the_last_collective(tmp_path):
    """Rank 0's loggers take 3 s to close: rank 1 has left by then, instead of waiting for them at the end."""
    pytest.importorskip("tensorboard")
    run_ranks(_slow_close_rank, (str(tmp_path),), join=False)
    closed = float((tmp_path / "closed").read_text())
    returned = [float((tmp_path / f"rank{r}.returned").read_text()) for r in (0, 1)]
    assert returned[1] < closed - 2 and returned[0] > closed  # (rank 1 left at least 2 s before the close ended)


# --- read-ahead ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_batches_come_in_order_whatever_the_read_ahead(depth):
    with BatchStream(lambda i: torch.tensor([i]), range(2, 9), depth, move=lambda x: x * 10) as stream:
        assert [int(x) for x in stream] == [20, 30, 40, 50, 60, 70, 80]


def test_reading_ahead_hides_the_read_behind_the_step():
    """A read and a step of 50 ms each: read on demand, the loop waits for every read; read ahead, the
    next read runs while the step does (sleeps: this holds on a busy machine too)."""
    def read(i):
        time.sleep(0.05)
        return torch.tensor([i])

    waits = {}
    for depth in (0, 2):
        with BatchStream(read, range(8), depth) as stream:
            for _ in stream:
                time.sleep(0.05)  # the step
        waits[depth] = stream.wait_s
    assert waits[0] > 0.35 and waits[2] < 0.5 * waits[0], waits


def test_leaving_a_stream_early_cancels_the_reads_not_started():
    started = []

    def read(i):
        started.append(i)
        time.sleep(0.02)
        return torch.tensor([i])
    with BatchStream(read, range(100), 2) as stream:
        next(stream)
    assert len(started) <= 4  # the first, and at most the reads already queued
