"""`simclr neighbors`: chunked top-k against brute force, a million-row index in bounded memory, the two kinds
of index (a folder + encoder, a vectors.npy + paths.txt), the JSON lines, the grid, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_embed import write_encoder
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.errors import DatasetError
from simclr_cli.serve.search import top_k_cosine


def brute_force(q: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    xn = index / np.linalg.norm(index, axis=1, keepdims=True)
    s = qn @ xn.T  # (Q, N): fine at test size
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("block", [7, 64, 1 << 24])  # many chunks, a few, one
def test_chunked_top_k_equals_brute_force(block):
    rng = np.random.default_rng(0)
    index, q = rng.normal(size=(301, 12)).astype(np.float32), rng.normal(size=(13, 12)).astype(np.float32)
    sims, rows = top_k_cosine(torch.from_numpy(q), index, k=6, block_elements=block, query_block=5)  # 3 query blocks
    want_s, want_i = brute_force(q, index, 6)
    assert rows.numpy().tolist() == want_i.tolist()
    np.testing.assert_allclose(sims.numpy(), want_s, rtol=1e-5, atol=1e-6)


def test_k_is_capped_at_the_index_and_dimensions_must_match():
    sims, rows = top_k_cosine(torch.randn(2, 4), np.random.rand(3, 4).astype(np.float32), k=10)
    assert sims.shape == rows.shape == (2, 3) and sorted(rows[0].tolist()) == [0, 1, 2]
    with pytest.raises(DatasetError, match="same encoder"):
        top_k_cosine(torch.randn(2, 5), np.random.rand(3, 4).astype(np.float32), k=1)


def test_a_million_row_index_is_searched_in_bounded_memory(tmp_path):
    """1,000 queries against a memory-mapped 1,000,000 x 32 index: the full similarity matrix would be 4 GB;
    the chunked search stays far below that (peak RSS of a fresh process, page cache of the map aside)."""
    script = f"""
import resource, numpy as np, torch
from simclr_cli.serve.search import top_k_cosine
torch.set_num_threads(2)
path = {str(tmp_path / 'big.npy')!r}
x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(1_000_000, 32))
rng = np.random.default_rng(0)
for i in range(0, len(x), 100_000):
    x[i:i + 100_000] = rng.normal(size=(100_000, 32))
x.flush(); del x
index = np.load(path, mmap_mode="r")
picked = np.arange(0, 1_000_000, 1000)  # 1,000 rows of the index as queries
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sims, rows = top_k_cosine(torch.from_numpy(np.array(index[picked])), index, k=5)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(int((rows[:, 0].numpy() == picked).all()), float(sims[:, 0].min()), before // 1024, peak // 1024)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    own, own_sim, before_mb, peak_mb = done.stdout.split()
    assert own == "1" and float(own_sim) > 0.9999  # each query's own row is its top-1
    # Mapped pages of the index count in RSS (128 MB); everything else the search holds is ~64 MB blocks.
    assert int(peak_mb) - int(before_mb) < 600, (before_mb, peak_mb)


# --- the command ---------------------------------------------------------------------------------------------

def write_class_folder(root: Path, per_class: int = 6) -> list[Path]:
    """Three visually distinct classes (flat red, green stripes, blue checks) with noise, class in the name."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:32, 0:32]
    bases = {"red": np.stack([np.full((32, 32), 200), yy * 0 + 30, xx * 0 + 30], -1),
             "green": np.stack([xx * 0 + 20, 120 + 100 * ((xx // 4) % 2), yy * 0 + 20], -1),
             "blue": np.stack([xx * 0 + 20, yy * 0 + 20, 80 + 150 * (((xx // 8) + (yy // 8)) % 2)], -1)}
    paths = []
    root.mkdir(parents=True, exist_ok=True)
    for name, base in bases.items():
        for i in range(per_class):
            img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            paths.append(root / f"{name}_{i}.png")
            Image.fromarray(img).save(paths[-1])
    return sorted(paths)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    return write_encoder(tmp_path_factory.mktemp("enc") / "encoder.pth")


def run(*args) -> tuple[int, list[dict], str]:
    r = CliRunner().invoke(app, ["neighbors", *map(str, args)], catch_exceptions=False)
    assert "Traceback" not in r.output
    return r.exit_code, [json.loads(line) for line in r.stdout.splitlines()], r.stderr


def test_an_image_in_the_index_is_its_own_top1_from_a_folder_and_from_vectors(tmp_path, encoder_file):
    paths = write_class_folder(tmp_path / "images")
    queries = tmp_path / "queries.txt"
    queries.write_text("".join(f"{p}\n" for p in paths[::5]))
    code, folder_answer, err = run(queries, "--index", tmp_path / "images", "-e", encoder_file, "-k", "4")
    assert code == 0, err
    npy, listing = tmp_path / "v.npy", tmp_path / "paths.txt"
    assert CliRunner().invoke(app, ["embed", str(tmp_path / "images"), "-e", str(encoder_file), "-o", str(npy),
                                    "--paths", str(listing)]).exit_code == 0
    code, npy_answer, err = run(queries, "--index", npy, "-e", encoder_file, "-k", "4")  # paths.txt beside it
    assert code == 0, err
    for answer in (folder_answer, npy_answer):
        assert [a["query"] for a in answer] == [str(p) for p in paths[::5]]
        for a in answer:
            assert len(a["neighbors"]) == 4 and a["neighbors"][0]["path"] == a["query"]
            assert a["neighbors"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
            sims = [n["similarity"] for n in a["neighbors"]]
            assert sims == sorted(sims, reverse=True)
    assert [[n["path"] for n in a["neighbors"]] for a in folder_answer] == \
        [[n["path"] for n in a["neighbors"]] for a in npy_answer]


def test_most_neighbours_share_the_query_class_and_the_grid_is_a_picture(tmp_path, encoder_file):
    paths = write_class_folder(tmp_path / "images")
    grid = tmp_path / "grid.png"
    code, answer, err = run(tmp_path / "images", "--index", tmp_path / "images", "-e", encoder_file, "-k", "6",
                            "--grid", grid)
    assert code == 0, err
    cls = lambda p: Path(p).name.split("_")[0]  # noqa: E731
    same = [cls(n["path"]) == cls(a["query"]) for a in answer for n in a["neighbors"][1:]]
    assert np.mean(same) > 0.8, np.mean(same)  # colour and texture are what even a random ResNet sees
    with Image.open(grid) as img:
        assert img.size == (int(100 * (1.25 * 7 + 0.3)), int(100 * (1.45 * len(paths) + 0.5)))
        assert np.asarray(img.convert("L")).std() > 20  # not blank
    assert f"grid: {grid}" in err


def test_bad_indexes_are_one_line_and_write_nothing(tmp_path, encoder_file):
    write_class_folder(tmp_path / "images", per_class=1)
    np.save(tmp_path / "v.npy", np.ones((3, 64), np.float32))
    (tmp_path / "paths.txt").write_text("a\nb\n")
    np.save(tmp_path / "small.npy", np.ones((3, 5), np.float32))
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    (tmp_path / "text.npy").write_text("hello")
    cases = [(["--index", tmp_path / "nowhere"], "does not exist"),
             (["--index", tmp_path / "v.npy"], "lists 2 paths but"),
             (["--index", tmp_path / "v.npy", "--paths", tmp_path / "missing.txt"], "no paths file"),
             (["--index", tmp_path / "small.npy", "--paths", tmp_path / "three.txt"], "same encoder"),
             (["--index", tmp_path / "text.npy", "--paths", tmp_path / "three.txt"], "is not a .npy array"),
             (["--index", tmp_path / "images", "--grid", tmp_path], "is a folder"),
             (["--index", tmp_path / "images", "-k", "0"], "-k"),
             (["--index", tmp_path / "images", "-e", tmp_path / "paths.txt"], "")]
    for args, message in cases:
        code, _, err = run(tmp_path / "images", "-e", encoder_file, *args) if "-e" not in args else \
            run(tmp_path / "images", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "paths.txt", "small.npy", "text.npy",
                                                         "three.txt", "v.npy"]
