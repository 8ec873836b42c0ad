"""The streamed shard reader (`data.stream`, `data.stream_io`): URL lists, sample counts and their cache, the
epoch's order over ranks and workers, its fixed length, exact resume, and bad samples and shards."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image

from simclr_cli.data import stream_io
from simclr_cli.data.images import decode_bytes, decode_image
from simclr_cli.data.shardindex import INDEX_FORMAT, INDEX_NAME
from simclr_cli.data.shards import write_shards
from simclr_cli.data.stream import ShardStream, batch_owners, epoch_length, stream_batches, worker_batches
from simclr_cli.data.stream_io import expand_urls, shard_counts
from simclr_cli.errors import DatasetError

SIZE = 8  # px: tiny images keep the file fast


def png(i: int, fmt: str = "PNG") -> bytes:
    """A 12 x 10 picture whose pixels depend on i (its centre crop is resized to SIZE)."""
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """A shard written with plain tarfile: members KEY.EXT in the given order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def write_wds(folder: Path, sizes: list[int]) -> list[str]:
    """Shards of `sizes` samples written by webdataset's own ShardWriter; key s{shard}-{i}, label i % 3."""
    urls = []
    for s, n in enumerate(sizes):
        with webdataset.ShardWriter(str(folder / f"w{s}-%06d.tar"), maxcount=n, verbose=0) as sink:
            for i in range(n):
                sink.write({"__key__": f"s{s}-{i:03d}", "png": png(100 * s + i), "cls": str(i % 3).encode(),
                            "json": b"{}"})
        urls.append(str(folder / f"w{s}-000000.tar"))
    return urls


def keys_of(stream: ShardStream, workers: int = 0) -> list[str]:
    return [k for b in stream_batches(stream, workers) for k in b.keys]


def stream(urls, counts=None, **kw) -> ShardStream:
    """A stream of 4-sample batches over `urls`, counted from the tars when `counts` is not given."""
    kw.setdefault("batch_size", 4)
    return ShardStream(urls, counts or shard_counts(urls, Path(urls[0]).parent / "counts"), SIZE, **kw)


def test_expand_urls_ranges_lists_and_missing(tmp_path):
    urls = write_wds(tmp_path, [2, 2, 2])
    assert expand_urls(str(tmp_path / "w{0..2}-000000.tar")) == urls
    assert expand_urls([str(tmp_path / "w{1..2}-000000.tar"), urls[0]]) == urls[1:] + urls[:1]
    for bad, said in ((str(tmp_path / "w{0..5}-000000.tar"), "w3-000000.tar does not exist (3 of 6"),
                      ("", "no shard URLs given"), ([], "no shard URLs given"),
                      (str(tmp_path), "without a shard index")):
        with pytest.raises(DatasetError) as err:
            expand_urls(bad)
        assert said in str(err.value) and "\n" not in str(err.value)


def test_counts_from_the_tar_are_cached_and_counted_again_when_a_shard_changes(tmp_path, monkeypatch):
    urls = write_wds(tmp_path, [3, 5])
    urls.append(write_tar(tmp_path / "t.tar", [(f"k{i}", {"jpg": png(i, "JPEG")}) for i in range(4)]))
    reads = []
    real = stream_io.read_samples
    monkeypatch.setattr(stream_io, "read_samples", lambda url, *a: reads.append(url) or real(url, *a))
    assert shard_counts(urls, tmp_path / "cache") == [3, 5, 4] and len(reads) == 3
    assert shard_counts(urls, tmp_path / "cache") == [3, 5, 4] and len(reads) == 3  # from the cache
    write_tar(tmp_path / "t.tar", [(f"k{i}", {"jpg": png(i, "JPEG")}) for i in range(7)])
    os.utime(tmp_path / "t.tar", ns=(1, 1))  # a new mtime even on a coarse clock
    assert shard_counts(urls, tmp_path / "cache") == [3, 5, 7] and reads[3:] == [urls[2]]


def test_counts_from_the_index_beside_the_shards(tmp_path, monkeypatch):
    urls = write_wds(tmp_path, [3, 5])
    shards = [{"name": Path(u).name, "samples": n, "bytes": os.path.getsize(u)} for u, n in zip(urls, (30, 50))]
    shards[1]["bytes"] += 1  # stale: that shard is counted from its tar
    (tmp_path / INDEX_NAME).write_text(json.dumps({"format": INDEX_FORMAT, "series": {"train": {"shards": shards}}}))
    assert shard_counts(urls, tmp_path / "cache") == [30, 5]
    assert expand_urls(str(tmp_path)) == urls  # a folder with an index: its train series


def test_the_shards_writer_output_streams_whole_with_its_labels(tmp_path):
    for i in range(10):
        (tmp_path / "img" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "img" / f"c{i % 2}" / f"{i}.png").write_bytes(png(i))
    write_shards(tmp_path / "img", tmp_path / "out", max_count=4)
    urls = expand_urls(str(tmp_path / "out"))
    counts = shard_counts(urls, tmp_path / "cache")
    assert len(urls) == 3 and counts == [4, 4, 2]
    batches = list(stream_batches(stream(urls, counts, batch_size=2, buffer=0)))
    assert sorted(k for b in batches for k in b.keys) == [f"{i:06d}" for i in range(10)]
    assert sorted(torch.cat([b.labels for b in batches]).tolist()) == [0] * 5 + [1] * 5


@pytest.mark.parametrize("workers", [0, 2])
def test_one_rank_sees_every_sample_once(tmp_path, workers):
    urls = write_wds(tmp_path, [12, 8, 16, 12])  # whole batches of 4 in any split over the workers
    s = stream(urls, seed=3, buffer=5)
    batches = list(stream_batches(s, workers))
    keys = [k for b in batches for k in b.keys]
    assert len(batches) == s.steps == epoch_length([12, 8, 16, 12], 1, 4) == 12
    assert sorted(keys) == sorted(f"s{j}-{i:03d}" for j, n in enumerate([12, 8, 16, 12]) for i in range(n))
    b = batches[0]
    assert b.images.shape == (4, 3, SIZE, SIZE) and b.images.dtype == torch.uint8 and b.labels.dtype == torch.int64
    assert b.labels.tolist() == [int(k[-3:]) % 3 for k in b.keys] and not b.skipped


def test_two_ranks_take_disjoint_shards_and_equal_lengths(tmp_path):
    urls = write_wds(tmp_path, [16, 4, 4, 8])  # no split into two pairs is even
    seen = [keys_of(stream(urls, rank=r, world_size=2, seed=1)) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 16  # 32 samples, global batch 8: 4 steps of 4 on each rank
    shards = [{k.split("-")[0] for k in keys} for keys in seen]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == {"s0", "s1", "s2", "s3"}
    short, long = sorted(seen, key=lambda keys: len(set(keys)))
    assert len(set(long)) == 16 and len(set(short)) < 16  # the short rank wraps into its own shards
    (tmp_path / "even").mkdir()
    even = write_wds(tmp_path / "even", [8, 8, 8, 8])
    both = [keys_of(stream(even, rank=r, world_size=2), 2) for r in (0, 1)]
    assert len(both[0]) == len(both[1]) == 16 and len(set(both[0] + both[1])) == 32


def test_order_repeats_for_a_seed_and_epoch_and_changes_between_epochs(tmp_path):
    urls = write_wds(tmp_path, [6] * 6)
    first = stream(urls, seed=5, epoch=0)
    assert keys_of(first) == keys_of(stream(urls, seed=5, epoch=0))
    assert first.shards != stream(urls, seed=5, epoch=1).shards
    assert keys_of(first) != keys_of(stream(urls, seed=5, epoch=1))
    one = urls[:1]
    in_tar = keys_of(stream(one, [6], batch_size=2, buffer=0))
    assert in_tar == sorted(in_tar)  # no buffer: the tar's order
    shuffled = [keys_of(stream(one, [6], batch_size=2, buffer=6, epoch=e)) for e in (0, 0, 1)]
    assert shuffled[0] == shuffled[1] != shuffled[2] and sorted(shuffled[0]) == in_tar != shuffled[0]


def test_schedule_shares_and_owners():
    assert worker_batches(10, [30, 10, 0]) == [8, 2, 0] and worker_batches(3, [1, 1]) == [2, 1]
    assert batch_owners([3, 1, 2]) == [0, 1, 2, 0, 2, 0]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_rest_of_the_epoch(tmp_path, workers, monkeypatch):
    sizes = [12, 20, 8, 16, 4]  # uneven roles: one runs out before the other
    urls = write_wds(tmp_path, sizes)
    bad = write_tar(tmp_path / "bad.tar", [(f"b{i}", {"png": b"not a png" if i in (3, 4) else png(i)})
                                           for i in range(8)])
    urls, counts = urls + [bad], sizes + [8]
    full = list(stream_batches(stream(urls, counts, seed=2, buffer=6), workers))
    keys = [k for b in full for k in b.keys]
    assert len(keys) == 68 and {x[1] for b in full for x in b.skipped} == {"b3", "b4"}
    for start in (4, 28, 48, 64, 68):
        reported = {x[:2] for b in full[:start // 4] for x in b.skipped}
        for known in (reported, None):
            assert keys_of(stream(urls, counts, seed=2, buffer=6, start=start, known_bad=known), workers) \
                == keys[start:], (start, known)
    import simclr_cli.data.stream as module
    decoded = []
    monkeypatch.setattr(module, "decode_bytes", lambda *a: decoded.append(1) or decode_bytes(*a))
    rest = keys_of(stream(urls, counts, seed=2, buffer=6, start=48, known_bad=set()), 0)
    assert len(decoded) <= len(rest) + 2  # the skipped samples were read, not decoded


def test_bad_samples_are_named_skipped_and_replaced(tmp_path):
    samples = [(f"k{i:02d}", {"png": png(i), "cls": b"1", "json": b"{}"}) for i in range(12)]
    samples[4] = ("k04", {"png": png(4)[:40], "cls": b"1"})  # cut mid-image
    samples[7] = ("k07", {"cls": b"2", "json": b"{}"})  # no image member
    samples[9] = ("k09", {"png": png(9)})  # no .cls: label -1
    url = write_tar(tmp_path / "bad.tar", samples)
    s = stream([url], [12], buffer=0)
    batches = list(stream_batches(s))
    keys = [k for b in batches for k in b.keys]
    assert len(keys) == 12 and "k04" not in keys and "k07" not in keys and Counter(keys).most_common(1)[0][1] == 2
    skipped = [x for b in batches for x in b.skipped]
    assert [(u, k) for u, k, _ in skipped] == [(url, "k04"), (url, "k07")]  # a second pass fills the epoch
    assert "no image member" in skipped[1][2] and skipped[0][2]
    labels = dict(zip(keys, torch.cat([b.labels for b in batches]).tolist()))
    assert labels["k09"] == -1 and labels["k00"] == 1


def test_streamed_pixels_match_the_folder_decoder(tmp_path):
    data = png(7, "JPEG")
    url = write_tar(tmp_path / "one.tar", [(f"k{i}", {"jpeg": data}) for i in range(2)])
    (tmp_path / "same.jpg").write_bytes(data)
    batch = next(stream_batches(stream([url], [2], batch_size=2)))
    assert torch.equal(batch.images[0], decode_image(tmp_path / "same.jpg", SIZE))


def one_line_error(s: ShardStream, workers: int) -> str:
    with pytest.raises(DatasetError) as err:
        list(stream_batches(s, workers))
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_and_missing_shards_are_one_line_naming_them(tmp_path, workers):
    urls = write_wds(tmp_path, [6, 6])
    whole = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(whole[:len(whole) // 2 + 100])  # cut inside a member
    assert urls[1] in one_line_error(stream(urls, [6, 6], buffer=0), workers)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        boundary = tar.getmembers()[3].offset  # a member's start: tarfile itself would end there silently
    Path(urls[1]).write_bytes(whole[:boundary])
    assert "cut short" in one_line_error(stream(urls, [6, 6], buffer=0), workers)
    with pytest.raises(DatasetError, match="end-of-archive"):  # counting it has no count to compare with
        shard_counts(urls[1:], tmp_path / "counts")
    os.remove(urls[1])
    assert f"cannot open shard {urls[1]}" in one_line_error(stream(urls, [6, 6], buffer=0), workers)


def test_empty_shards_and_shards_without_images_are_one_line(tmp_path):
    url = write_tar(tmp_path / "none.tar", [(f"k{i}", {"cls": b"1"}) for i in range(4)])
    assert "no image" in one_line_error(stream([url], [4]), 0)
    with pytest.raises(DatasetError, match="holds no samples"):
        stream([url], [0])
    with pytest.raises(DatasetError, match="fewer than one batch"):
        stream([url], [4], batch_size=8)
    with pytest.raises(DatasetError, match="cannot be shared among 2 ranks"):
        stream([url], [4], world_size=2)
