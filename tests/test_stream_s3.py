"""The streamed shard reader against a real object store: an S3 endpoint that moto serves on 127.0.0.1 for this
module (no network beyond the loopback), shards uploaded to it with boto3 and read back through s3:// URLs by
fsspec's s3 protocol (s3fs). A missing shard, a store that refuses or stalls, a truncated tar and a corrupt
image mid-shard are each one line, and nothing waits longer than its timeouts."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import webdataset
from test_stream import png, write_tar  # tests/test_stream.py

from simclr_cli.data import stream_io
from simclr_cli.data.shardindex import INDEX_NAME
from simclr_cli.data.shards import write_shards
from simclr_cli.data.stream import ShardStream, stream_batches
from simclr_cli.data.stream_io import expand_urls, index_counts, shard_counts
from simclr_cli.errors import DatasetError

SIZE = 8  # px: tiny images keep the file fast
BUCKET = "simclr-shards"
# what the module sets (dummy credentials, the loopback endpoint) or clears (a proxy would see 127.0.0.1 calls;
# the user's profile and config files could name another endpoint); all put back afterwards
ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
       "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "HTTP_PROXY",
       "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def start_server():
    """A moto S3 server on a port of 127.0.0.1 the system picks, and its endpoint URL. ThreadedMotoServer.start
    waits for ever when the bind fails (the error stays in its thread), so it is started in a thread of ours
    that gets 20 s; any failure is a skip naming the reason."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        pytest.skip(f"no S3 test server ({e}): pip install 'simclr-cli[test]'")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    failed = []
    starter = threading.Thread(target=lambda: _try(server.start, failed), daemon=True)
    starter.start()
    starter.join(20)
    if starter.is_alive() or failed:
        pytest.skip(f"the S3 test server did not start on 127.0.0.1: {failed[0] if failed else 'no bind in 20 s'}")
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def _try(start, failed: list) -> None:
    try:
        start()
    except Exception as e:  # noqa: BLE001 - reported as the skip's reason
        failed.append(f"{type(e).__name__}: {e}")


def client(endpoint: str):
    import boto3
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def upload(s3, folder: Path, prefix: str) -> None:
    """Every file of `folder` (shards and index.json) to s3://BUCKET/prefix/NAME."""
    for p in sorted(folder.iterdir()):
        if p.is_file():
            s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{p.name}", Body=p.read_bytes())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The endpoint (its env set for the module) and the shards on it, with their local twins:
    ws/ - `write_shards` output (3 shards of 4, 4, 2 and index.json), wds/ - webdataset's ShardWriter (2 x 6, no
    index), bad/ - a corrupt image mid-shard and a tar cut inside a member, split/ - labelled train (8) and test
    (4) series with their index (local twin: split-ws/)."""
    saved = {k: os.environ.get(k) for k in ENV}
    for k in ENV:
        os.environ.pop(k, None)
    server = None
    try:
        server, endpoint = start_server()
        root = tmp_path_factory.mktemp("s3")
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_ENDPOINT_URL=endpoint,
                          AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=str(root / "none"),
                          AWS_SHARED_CREDENTIALS_FILE=str(root / "none"))
        s3 = client(endpoint)
        s3.create_bucket(Bucket=BUCKET)
        yield _fill(s3, root, endpoint)
    finally:
        if server is not None:
            server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fill(s3, root: Path, endpoint: str) -> dict:
    for i in range(10):
        (root / "img" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / "img" / f"c{i % 2}" / f"{i}.png").write_bytes(png(i))
    write_shards(root / "img", root / "ws", max_count=4)
    (root / "wds").mkdir()
    for s in range(2):
        with webdataset.ShardWriter(str(root / "wds" / f"w{s}-%06d.tar"), maxcount=6, verbose=0) as sink:
            for i in range(6):
                sink.write({"__key__": f"s{s}-{i:03d}", "png": png(100 * s + i), "cls": str(i % 3).encode(),
                            "json": b"{}"})
    (root / "bad").mkdir()
    write_tar(root / "bad" / "corrupt.tar", [(f"k{i:02d}", {"png": png(i)[:40] if i == 5 else png(i), "cls": b"1"})
                                             for i in range(8)])
    whole = (root / "wds" / "w0-000000.tar").read_bytes()
    (root / "bad" / "cut.tar").write_bytes(whole[:len(whole) // 2 + 100])  # cut inside a member
    for series, n in (("train", 8), ("test", 4)):  # split/: labelled train and test series, as probe reads
        for i in range(n):
            (root / "split" / series / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            (root / "split" / series / f"c{i % 2}" / f"{i}.png").write_bytes(png(50 + i + 10 * (series == "test")))
    write_shards(root / "split", root / "split-ws", max_count=4)
    upload(s3, root / "split-ws", "split")
    for prefix in ("ws", "wds", "bad"):
        upload(s3, root / prefix, prefix)
    return {"root": root, "endpoint": endpoint, "s3": s3}


def batches(urls, counts, workers: int = 0, **kw) -> list:
    kw.setdefault("batch_size", 2)
    return list(stream_batches(ShardStream(urls, counts, SIZE, **kw), workers))


def one_line_error(call) -> str:
    with pytest.raises(DatasetError) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_brace_ranges_expand_to_s3_urls(store):
    urls = expand_urls(f"s3://{BUCKET}/ws/train-{{000000..000002}}.tar")
    assert urls == [f"s3://{BUCKET}/ws/train-{i:06d}.tar" for i in range(3)]
    assert expand_urls([f"s3://{BUCKET}/wds/w{{0..1}}-000000.tar"]) == [f"s3://{BUCKET}/wds/w{s}-000000.tar"
                                                                         for s in range(2)]


def test_counts_come_from_the_index_on_s3_else_from_the_tar_headers(store, monkeypatch):
    index = json.loads((store["root"] / "ws" / INDEX_NAME).read_text())
    names = [sh["name"] for sh in index["series"]["train"]["shards"]]
    urls = [f"s3://{BUCKET}/ws/{n}" for n in names]
    reads = []
    real = stream_io.read_samples
    monkeypatch.setattr(stream_io, "read_samples", lambda url, *a: reads.append(url) or real(url, *a))
    assert index_counts(urls) == dict(zip(urls, [4, 4, 2]))
    assert shard_counts(urls, store["root"] / "counts") == [4, 4, 2] and not reads  # the index, no tar read
    wds = [f"s3://{BUCKET}/wds/w{s}-000000.tar" for s in range(2)]
    assert index_counts(wds) == {}
    assert shard_counts(wds, store["root"] / "counts") == [6, 6] and sorted(reads) == wds  # from the headers


@pytest.mark.parametrize("workers", [0, 2])
def test_s3_yields_the_same_samples_as_the_same_shards_on_disk(store, workers):
    root = store["root"]
    names = ["ws/train-000000.tar", "ws/train-000001.tar", "ws/train-000002.tar", "wds/w0-000000.tar",
             "wds/w1-000000.tar"]
    counts = [4, 4, 2, 6, 6]
    local = batches([str(root / n) for n in names], counts, workers, seed=4, buffer=5)
    remote = batches([f"s3://{BUCKET}/{n}" for n in names], counts, workers, seed=4, buffer=5)
    keys = [k for b in remote for k in b.keys]
    assert len(keys) == 22 and len(set(keys)) == 22 and keys == [k for b in local for k in b.keys]
    assert torch.equal(torch.cat([b.labels for b in remote]), torch.cat([b.labels for b in local]))
    assert torch.equal(torch.cat([b.images for b in remote]), torch.cat([b.images for b in local]))
    assert {int(k[-3:]) % 3 for k in keys if k.startswith("s")} == {0, 1, 2}


def test_a_missing_shard_is_one_line_naming_it(store):
    gone = f"s3://{BUCKET}/ws/train-000009.tar"
    urls = [f"s3://{BUCKET}/ws/train-000000.tar", gone]
    said = one_line_error(lambda: batches(urls, [4, 4], buffer=0, timeout=5))
    assert f"cannot open shard {gone}" in said
    assert gone in one_line_error(lambda: shard_counts([gone], store["root"] / "counts", timeout=5))


def test_a_store_that_refuses_or_stalls_is_one_line_within_seconds(store, tmp_path):
    with socket.socket() as s:  # a port of 127.0.0.1 nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    url = f"s3://{BUCKET}/ws/train-000000.tar"
    t0 = time.monotonic()
    said = one_line_error(lambda: batches([url], [4], timeout=2, options={"endpoint_url": f"http://127.0.0.1:{dead}"}))
    assert f"cannot open shard {url}" in said and time.monotonic() - t0 < 30
    t0 = time.monotonic()
    with pytest.raises(DatasetError, match="cannot open shard"):
        shard_counts([url], tmp_path / "counts", timeout=2, options={"endpoint_url": f"http://127.0.0.1:{dead}"})
    assert time.monotonic() - t0 < 30
    with socket.socket() as mute:  # connections land in its backlog and are never answered: a stalled store
        mute.bind(("127.0.0.1", 0))
        mute.listen(16)
        t0 = time.monotonic()
        stalled = {"endpoint_url": f"http://127.0.0.1:{mute.getsockname()[1]}"}
        assert f"cannot open shard {url}" in one_line_error(lambda: batches([url], [4], timeout=0.2, options=stalled))
        assert time.monotonic() - t0 < 30
    server, endpoint = start_server()  # a second store: read once, then stopped
    try:
        s3 = client(endpoint)
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="one.tar", Body=(store["root"] / "ws" / "train-000002.tar").read_bytes())
        other = {"endpoint_url": endpoint}
        assert len(batches([f"s3://{BUCKET}/one.tar"], [2], timeout=2, options=other)) == 1
    finally:
        server.stop()
    t0 = time.monotonic()
    assert "one.tar" in one_line_error(lambda: batches([f"s3://{BUCKET}/one.tar"], [2], timeout=0.5, options=other))
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_tar_on_s3_is_one_line_naming_it(store, workers):
    url = f"s3://{BUCKET}/bad/cut.tar"
    assert url in one_line_error(lambda: batches([url], [6], workers, buffer=0, timeout=5))
    assert url in one_line_error(lambda: shard_counts([url], store["root"] / "counts", timeout=5))


def test_a_corrupt_image_mid_shard_is_a_named_bad_sample(store):
    url = f"s3://{BUCKET}/bad/corrupt.tar"
    assert shard_counts([url], store["root"] / "counts") == [8]
    got = batches([url], [8], buffer=0)
    keys = [k for b in got for k in b.keys]
    skipped = [x for b in got for x in b.skipped]
    assert len(keys) == 8 and "k05" not in keys and set(keys) == {f"k{i:02d}" for i in range(8)} - {"k05"}
    assert [(u, k) for u, k, _ in skipped] == [(url, "k05")] and skipped[0][2]


def test_pretraining_reads_its_shards_through_s3_urls(store, tmp_path):
    from conftest import tiny_config

    from simclr_cli.train import pretrain
    from simclr_cli.train.state import load_checkpoint

    urls = f"s3://{BUCKET}/ws/train-{{000000..000002}}.tar"
    pretrain(tiny_config(tmp_path, "data.dataset=webdataset", f"data.webdataset.urls=['{urls}']", "data.num_workers=0",
                         batch_size=4, epochs=1))
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 2 and ckpt["train_images"] == 10  # the index's 10 samples on S3: 2 batches of 4


def test_probe_reads_a_shard_index_through_an_s3_prefix(store, tmp_path):
    """`--data-dir s3://bucket/prefix` is a URL, not a path (its // kept): probe reads the index and both series
    from the store, with the figures of the same shards on disk."""
    from conftest import pretrained_tiny
    from typer.testing import CliRunner

    from simclr_cli.cli import app

    encoder = pretrained_tiny(tmp_path / "run") / "encoder.pth"
    figures = []
    for where in (f"s3://{BUCKET}/split", str(store["root"] / "split-ws")):
        out = tmp_path / f"probe-{len(figures)}.json"
        r = CliRunner().invoke(app, ["probe", str(encoder), "--dataset", "webdataset", "--data-dir", where,
                                     "--device", "cpu", "--precision", "fp32", "--json", str(out)])
        assert r.exit_code == 0, r.output
        report = json.loads(out.read_text())
        assert (report["dataset"]["train_size"], report["dataset"]["test_size"]) == (8, 4)
        figures.append(report["results"]["trained"])
    assert figures[0]["knn_top1"] == figures[1]["knn_top1"]
    assert figures[0]["linear_top1"] == pytest.approx(figures[1]["linear_top1"], abs=1e-6)
