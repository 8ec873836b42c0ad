"""`simclr shards`: an image folder packed into WebDataset tar shards plus index.json (`data.shards`).

A small generated folder (two classes; JPEG, .jpeg, PNG, WebP, BMP, GIF, TIFF and one corrupt file) is packed
and read back with `tarfile`, with the plain `webdataset` library and with `tar tf`; shards keep to --max-size
and --max-count; an interrupted run goes on to the same bytes as a straight one; a folder with its own train/
and test/ gives two series; each bad input is one line and exit code 2 through the CLI, with nothing written.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.data.shardindex import INDEX_NAME
from simclr_cli.data.shards import MIN_SIZE, MTIME, parse_size, write_shards
from simclr_cli.errors import OptionError

FILES = {"cat/a.jpg": "JPEG", "cat/b.jpeg": "JPEG", "cat/c.png": "PNG", "cat/d.webp": "WEBP", "cat/e.bmp": "BMP",
         "dog/a.jpg": "JPEG", "dog/b.png": "PNG", "dog/c.gif": "GIF", "dog/d.jpg": "JPEG", "dog/e.tif": "TIFF"}
STORED = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "png", "GIF": "png", "TIFF": "png"}


def write_image(path: Path, fmt: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 20, 3), dtype=np.uint8)  # (H, W, 3)
    Image.fromarray(pixels).save(path, fmt)


def make_folder(root: Path, files: dict[str, str] = FILES, bad: str | None = "dog/bad.jpg") -> Path:
    for i, (rel, fmt) in enumerate(files.items()):
        write_image(root / rel, fmt, i)
    if bad:
        (root / bad).parent.mkdir(parents=True, exist_ok=True)
        (root / bad).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all" * 8)
    return root


def read_shards(out: Path) -> tuple[dict, dict[str, list[tarfile.TarInfo]], dict[str, dict[str, bytes]]]:
    """(index, members of each shard in tar order, {key: {ext: bytes}} over all shards of all series)."""
    index = json.loads((out / INDEX_NAME).read_text())
    members, samples = {}, {}
    for series in index["series"].values():
        for shard in series["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                members[shard["name"]] = tar.getmembers()
                for m in members[shard["name"]]:
                    key, ext = m.name.split(".", 1)
                    samples.setdefault(f"{shard['name'].split('-')[0]}/{key}", {})[ext] = tar.extractfile(m).read()
    return index, members, samples


def tree(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "images")


def test_samples_are_image_cls_json_with_the_right_labels_and_bytes(folder, tmp_path):
    out = tmp_path / "shards"
    result = write_shards(folder, out, max_size=20 * 1024)
    index, members, samples = read_shards(out)
    assert (result.samples, len(result.skipped), result.shards) == (10, 1, len(members)) and result.shards > 1
    assert index["classes"] == ["cat", "dog"] and index["complete"] and index["totals"]["samples"] == 10
    assert [s["path"] for s in index["skipped"]] == ["dog/bad.jpg"] and result.skipped[0][0] == "dog/bad.jpg"
    assert all((out / s["name"]).stat().st_size == s["bytes"] for s in index["series"]["train"]["shards"])
    keys = []
    for name, infos in members.items():
        assert name.startswith("train-")
        for image, cls, meta in zip(infos[::3], infos[1::3], infos[2::3]):  # image, .cls, .json: in that order
            key = image.name.split(".")[0]
            assert cls.name == f"{key}.cls" and meta.name == f"{key}.json" and len(key) == 6 and key.isdigit()
            keys.append(int(key))
        assert all((m.mtime, m.mode, m.uid, m.gid, m.uname, m.type) == (MTIME, 0o644, 0, 0, "", tarfile.REGTYPE)
                   for m in infos)
    assert keys == list(range(10))  # a running number across the series' shards
    seen = {}
    for sample in samples.values():
        meta = json.loads(sample["json"])
        (ext,) = set(sample) - {"cls", "json"}
        assert ext == STORED[FILES[meta["path"]]] and meta["format"] == FILES[meta["path"]]
        assert meta["class"] == meta["path"].split("/")[0] == index["classes"][int(sample["cls"])]
        source = folder / meta["path"]
        if ext != "png" or FILES[meta["path"]] == "PNG":  # copied as it is
            assert sample[ext] == source.read_bytes()
        else:  # re-encoded: the same pixels as the source file
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample[ext]))),
                                  np.asarray(Image.open(source).convert("RGB")))
        seen[meta["path"]] = meta["class"]
    assert seen == {rel: rel.split("/")[0] for rel in FILES}
    classes_by_shard = [{json.loads(samples[f"train/{i.name[:6]}"]["json"])["class"] for i in infos[::3]}
                        for infos in members.values()]
    assert any(len(c) == 2 for c in classes_by_shard)  # the seeded order mixes the classes


def test_the_plain_webdataset_library_and_tar_read_the_shards(folder, tmp_path):
    wds = pytest.importorskip("webdataset")
    out = tmp_path / "shards"
    write_shards(folder, out, max_size=20 * 1024)
    index = json.loads((out / INDEX_NAME).read_text())
    url = str(out / index["series"]["train"]["pattern"])  # train-{000000..00000N}.tar
    samples = list(wds.WebDataset(url, shardshuffle=False))
    assert len(samples) == index["series"]["train"]["samples"] == 10
    assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(10)]
    for s in samples:
        assert index["classes"][int(s["cls"])] == json.loads(s["json"])["class"]
    decoded = list(wds.WebDataset(url, shardshuffle=False).decode("pil").to_tuple("jpg;png;webp", "cls", "json"))
    assert len(decoded) == 10 and all(img.size == (20, 24) and index["classes"][cls] == meta["class"]
                                      for img, cls, meta in decoded)
    if shutil.which("tar"):
        first = index["series"]["train"]["shards"][0]
        listed = subprocess.run(["tar", "tf", str(out / first["name"])], capture_output=True, text=True, check=True)
        assert len(listed.stdout.split()) == 3 * first["samples"] and listed.stdout.startswith("000000.")


@pytest.mark.parametrize("max_size, max_count", [(MIN_SIZE, None), (16 * 1024, None), (10**9, 3)])
def test_shards_keep_to_max_size_and_max_count(folder, tmp_path, max_size, max_count):
    out = tmp_path / "shards"
    result = write_shards(folder, out, max_size=max_size, max_count=max_count)
    shards = result.series["train"]["shards"]
    assert len(shards) > 1 and sum(s["samples"] for s in shards) == 10
    for s in shards:
        assert (out / s["name"]).stat().st_size == s["bytes"]
        assert s["bytes"] <= max_size or s["samples"] == 1  # a lone sample larger than the limit goes alone
        assert max_count is None or s["samples"] <= max_count
    if max_count:
        assert [s["samples"] for s in shards] == [3, 3, 3, 1]


@pytest.mark.parametrize("text, size", [("1GB", 10**9), ("500MB", 5 * 10**8), ("1GiB", 2**30), ("64KiB", 65536),
                                        ("123456", 123456), ("1.5 gb", 15 * 10**8), ("20kb", 20000)])
def test_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1XB", "", "GB", "-5MB", "1e9", "100", "1,000"])
def test_bad_sizes_are_one_option_error(text):
    with pytest.raises(OptionError, match="--max-size"):
        parse_size(text)


def interrupted(folder: Path, out: Path, at: int, **settings) -> None:
    """A run stopped (as by Ctrl-C) once `at` files are handled."""
    def progress(event, d):
        if event == "progress" and d["done"] == at:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_shards(folder, out, progress=progress, **settings)


def test_an_interrupted_run_goes_on_to_the_same_bytes(folder, tmp_path):
    settings = {"max_size": 16 * 1024, "seed": 3}
    write_shards(folder, tmp_path / "straight", **settings)
    out = tmp_path / "stopped"
    interrupted(folder, out, 7, **settings)
    index = json.loads((out / INDEX_NAME).read_text())
    written = [s["name"] for s in index["series"]["train"]["shards"]]
    assert written and not index["complete"] and sorted(p.name for p in out.iterdir()) == sorted([*written, INDEX_NAME])
    assert index["series"]["train"]["done"] == index["series"]["train"]["shards"][-1]["plan"][1] < 7
    (out / f".train-{len(written):06d}.tar.x1y2.tmp").write_bytes(b"half")  # what a kill -9 leaves behind
    events = []
    result = write_shards(folder, out, progress=lambda e, d: events.append((e, d)), **settings)
    assert result.resumed == len(written) and events[0][1]["shards"] == len(written)
    assert tree(out) == tree(tmp_path / "straight")


def test_a_lost_shard_is_written_again(folder, tmp_path):
    out = tmp_path / "shards"
    write_shards(folder, out, max_size=16 * 1024)
    before = tree(out)
    index = json.loads((out / INDEX_NAME).read_text())
    (out / index["series"]["train"]["shards"][-2]["name"]).unlink()
    result = write_shards(folder, out, max_size=16 * 1024)
    assert result.resumed == len(index["series"]["train"]["shards"]) - 2 and tree(out) == before
    assert write_shards(folder, out, max_size=16 * 1024).resumed == result.shards  # complete: nothing to do


def test_a_folder_with_train_and_test_gives_two_series(tmp_path):
    folder = make_folder(tmp_path / "images", {"train/cat/a.jpg": "JPEG", "train/dog/b.png": "PNG",
                                               "train/dog/c.jpg": "JPEG", "test/cat/d.jpg": "JPEG",
                                               "test/dog/e.bmp": "BMP"}, bad=None)
    out = tmp_path / "shards"
    result = write_shards(folder, out, max_size=10**9)
    index, members, samples = read_shards(out)
    assert set(members) == {"train-000000.tar", "test-000000.tar"} and list(index["series"]) == ["train", "test"]
    assert (index["series"]["train"]["samples"], index["series"]["test"]["samples"], result.samples) == (3, 2, 5)
    assert index["classes"] == ["cat", "dog"] and index["series"]["test"]["pattern"] == "test-000000.tar"
    tests = {json.loads(s["json"])["path"]: int(s["cls"]) for k, s in samples.items() if k.startswith("test/")}
    assert tests == {"test/cat/d.jpg": 0, "test/dog/e.bmp": 1}


def test_an_unlabelled_folder_has_no_cls(tmp_path):
    folder = make_folder(tmp_path / "images", {"a.jpg": "JPEG", "b.png": "PNG", "sub/c.jpg": "JPEG"}, bad=None)
    write_shards(folder, tmp_path / "shards")
    index, _, samples = read_shards(tmp_path / "shards")
    assert index["classes"] is None and len(samples) == 3
    assert all("cls" not in s and json.loads(s["json"])["class"] is None for s in samples.values())


def invoke(*args):
    return CliRunner().invoke(app, ["shards", *map(str, args)])


def test_the_command_writes_shards_and_a_summary(folder, tmp_path):
    r = invoke(folder, tmp_path / "shards", "--max-size", "16KiB", "--max-count", "2")
    assert r.exit_code == 0, r.output
    assert r.stdout == ""  # data only on stdout: there is none
    last = r.stderr.strip().splitlines()
    assert "skipped dog/bad.jpg" in last[-1] and "10 samples" in last[-2] and "1 skipped" in last[-2]
    assert json.loads((tmp_path / "shards" / INDEX_NAME).read_text())["settings"] == {
        "max_size": 16384, "max_count": 2, "seed": 0}


def bad_inputs(tmp_path: Path, folder: Path) -> dict[str, list]:
    (tmp_path / "empty").mkdir()
    make_folder(tmp_path / "allbad", {}, bad="x/bad.jpg")
    (tmp_path / "afile").write_text("hello")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    write_shards(folder, tmp_path / "seed0", max_size=10**9)
    write_shards(make_folder(tmp_path / "fewer", dict(list(FILES.items())[:3])), tmp_path / "fewer-shards",
                 max_size=10**9)
    new = tmp_path / "new" / "shards"  # nested: a run that finds no image removes both again
    return {"missing": [tmp_path / "nope", new], "a file": [folder / "cat/a.jpg", new],
            "empty": [tmp_path / "empty", new],
            "all bad": [tmp_path / "allbad", new], "size unit": [folder, new, "--max-size", "1XB"],
            "size small": [folder, new, "--max-size", "100"], "count": [folder, new, "--max-count", "0"],
            "seed": [folder, new, "--seed", "-1"], "out a file": [folder, tmp_path / "afile"],
            "out not empty": [folder, tmp_path / "full"], "other settings": [folder, tmp_path / "seed0", "--seed", "1"],
            "other listing": [folder, tmp_path / "fewer-shards"]}


SAYS = {"missing": "does not exist", "empty": "no images", "all bad": "none of the 1 images", "size unit": "1XB",
        "out not empty": "not empty", "other settings": "seed 0, not 1", "other listing": "another listing"}


def test_each_bad_input_is_one_line_and_exit_2_and_writes_nothing(folder, tmp_path):
    rows = bad_inputs(tmp_path, folder)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    problems = []
    for name, args in rows.items():
        r = invoke(*args)
        err = r.stderr.strip()
        if r.exit_code != 2 or len(err.splitlines()) != 1 or not err.startswith("error: ") or "Traceback" in r.output:
            problems.append(f"{name}: exit {r.exit_code}, {err!r}")
        elif SAYS.get(name, "") not in err:
            problems.append(f"{name}: {err!r} does not say {SAYS[name]!r}")
    assert not problems
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before and not (tmp_path / "new").exists()
    r = invoke(folder, tmp_path / "seed0", "--seed", "1", "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "seed0" / INDEX_NAME).read_text())["settings"]["seed"] == 1
