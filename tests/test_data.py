"""Datasets (CIFAR batch files, image folders, synthetic) and image decoding: each claim of data.py/images.py."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from simclr_cli import data
from simclr_cli.config import DataConfig
from simclr_cli.data import ImageSet, load_dataset, normalization_for
from simclr_cli.data.images import ImageFolderDataset, decode_image, iter_decoded, list_images
from simclr_cli.errors import DatasetError, ImageDecodeError

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def save(path: Path, img: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def solid(colour=RED, size=(12, 8), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


# --- CIFAR ------------------------------------------------------------------------------------------------

def as_images(rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rows).view(-1, 3, 32, 32)


def test_cifar10_batches_read_back_exactly(fake_cifar10):
    root, expected = fake_cifar10  # batch files written with pickle protocols 2, 4 and 5
    for split, n in (("train", 30), ("test", 6)):
        s = load_dataset(DataConfig(dataset="cifar10", root=root, download=False), split)
        assert s.name == f"cifar10/{split}" and len(s) == n
        assert s.images.dtype == torch.uint8 and s.images.shape == (n, 3, 32, 32) and s.images.is_contiguous()
        assert torch.equal(s.images, as_images(expected[split][0]))  # values and batch order
        assert s.labels.dtype == torch.int64 and s.labels.tolist() == expected[split][1].tolist()
        assert s.classes == expected["classes"]


def test_cifar100_fine_labels_and_classes(fake_cifar100):
    root, expected = fake_cifar100
    s = load_dataset(DataConfig(dataset="cifar100", root=root, download=False), "test")
    assert torch.equal(s.images, as_images(expected["test"][0]))
    assert s.labels.tolist() == expected["test"][1].tolist()
    assert s.classes == expected["classes"] and len(s.classes) == 100


def test_cifar_image_size_resizes(fake_cifar10):
    s = load_dataset(DataConfig(dataset="cifar10", root=fake_cifar10[0], download=False), "test", image_size=16)
    assert s.images.shape == (6, 3, 16, 16) and s.images.dtype == torch.uint8


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_cifar_names_the_fix(tmp_path, name, folder):
    with pytest.raises(DatasetError) as e:
        load_dataset(DataConfig(dataset=name, root=tmp_path, download=False), "train")
    msg = str(e.value)
    assert "download" in msg and folder in msg and str(tmp_path) in msg and "\n" not in msg


def test_download_uses_torchvision_then_our_reader(tmp_path, monkeypatch, write_cifar):
    from torchvision.datasets import utils as tv_utils
    calls = []

    def fake_download(url, root, filename=None, md5=None, **kw):  # stands in for the network
        calls.append((url, md5))
        write_cifar(Path(root), "cifar10")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    s = load_dataset(DataConfig(dataset="cifar10", root=tmp_path, download=True), "test")
    assert len(s) == 6 and calls and calls[0][0].endswith("cifar-10-python.tar.gz") and calls[0][1]
    load_dataset(DataConfig(dataset="cifar10", root=tmp_path, download=True), "train")
    assert len(calls) == 1  # files present: no second download


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    from torchvision.datasets import utils as tv_utils

    def offline(*a, **kw):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DatasetError, match="network unreachable") as e:
        load_dataset(DataConfig(dataset="cifar100", root=tmp_path, download=True), "train")
    assert "\n" not in str(e.value)


class _WritesFile:
    """Unpickling this calls open(target, "w"): the file appearing proves the payload ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_malicious_pickle_is_refused(fake_cifar10, tmp_path):
    root, _ = fake_cifar10
    canary, proof = tmp_path / "pwned", tmp_path / "payload-works"
    pickle.loads(pickle.dumps({b"data": _WritesFile(proof)}))[b"data"].close()  # plain pickle runs it
    assert proof.exists()
    batch = root / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({b"data": _WritesFile(canary), b"labels": [0]}, protocol=2))
    with pytest.raises(DatasetError, match="refusing"):
        load_dataset(DataConfig(dataset="cifar10", root=root, download=False), "test")
    assert not canary.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),  # wrong row length
    pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),  # label out of range
    pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}),  # no labels
    pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})[:-40],  # truncated
    pickle.dumps([1, 2, 3]),  # not a dict
    b"not a pickle at all",
])
def test_corrupt_cifar_batch_is_dataset_error(fake_cifar10, payload):
    root, _ = fake_cifar10
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(payload)
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset(DataConfig(dataset="cifar10", root=root, download=False), "test")


# --- real CIFAR-10 -----------------------------------------------------------------------------------------

def test_real_cifar10(cifar10_root):
    train = load_dataset(DataConfig(dataset="cifar10", root=cifar10_root, download=False), "train")
    assert train.images.shape == (50_000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.bincount().tolist() == [5000] * 10
    assert train.classes[:3] == ["airplane", "automobile", "bird"] and len(train.classes) == 10
    test = load_dataset(DataConfig(dataset="cifar10", root=cifar10_root, download=False), "test")
    assert test.images.shape == (10_000, 3, 32, 32) and test.labels.bincount().tolist() == [1000] * 10
    assert test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # the original test order
    # NORMALIZATION["cifar10"] holds the training set's stats (this JPEG copy is slightly smoother: std -0.002)
    total, total_sq = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for chunk in train.images.split(5000):  # chunks keep the float copy at 60 MB
        x = chunk.double() / 255
        total += x.sum((0, 2, 3))
        total_sq += (x * x).sum((0, 2, 3))
    n = train.images.numel() / 3
    mean, std = normalization_for("cifar10")
    assert torch.allclose(total / n, torch.tensor(mean, dtype=torch.float64), atol=1e-3)
    assert torch.allclose((total_sq / n - (total / n) ** 2).sqrt(), torch.tensor(std, dtype=torch.float64),
                          atol=4e-3)


# --- image folders --------------------------------------------------------------------------------------

def make_class_folder(root: Path, counts: dict[str, int]) -> None:
    colours = [RED, GREEN, BLUE, (200, 200, 0)]
    for k, (cls, n) in enumerate(counts.items()):
        for i in range(n):
            save(root / cls / f"{i:03d}.png", solid(colours[k % 4]))


def test_folder_with_classes_has_seeded_stratified_split(tmp_path):
    make_class_folder(tmp_path, {"cat": 10, "ant": 5})  # classes sorted: ant=0, cat=1
    train = load_dataset(DataConfig(dataset="folder", root=tmp_path, num_workers=0), "train", seed=3, image_size=8)
    test = load_dataset(DataConfig(dataset="folder", root=tmp_path, num_workers=0), "test", seed=3, image_size=8)
    assert train.classes == test.classes == ["ant", "cat"]
    assert train.labels.bincount().tolist() == [4, 8] and test.labels.bincount().tolist() == [1, 2]
    assert train.images.shape == (12, 3, 8, 8) and test.images.shape == (3, 3, 8, 8)
    assert (test.images[test.labels == 0][:, 1] == 255).all()  # "ant" images are green: labels match pixels
    assert (test.images[test.labels == 1][:, 0] == 255).all()  # "cat" images are red
    again = load_dataset(DataConfig(dataset="folder", root=tmp_path, num_workers=0), "test", seed=3, image_size=8)
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


def test_unlabelled_flat_folder_pretrains_on_every_image(tmp_path):
    """Without class folders nothing could use a held-out split: "train" is every image, "test" is refused."""
    for i in range(10):  # flat folder, each image a different grey level so images identify themselves
        save(tmp_path / f"{i}.png", solid((i * 20,) * 3))
    for seed in (0, 1):
        train = load_dataset(DataConfig(dataset="folder", root=tmp_path, num_workers=0), "train", seed=seed, image_size=4)
        assert train.labels is None and train.classes is None and len(train) == 10
        assert sorted(train.images[:, 0, 0, 0].tolist()) == [i * 20 for i in range(10)]
    with pytest.raises(DatasetError, match="no labelled test split"):
        load_dataset(DataConfig(dataset="folder", root=tmp_path, num_workers=0), "test", image_size=4)


def test_labelled_flat_folder_split_is_a_seeded_partition(tmp_path):
    for i in range(10):
        save(tmp_path / ("a" if i % 2 else "b") / f"{i}.png", solid((i * 20,) * 3))
    train = load_dataset(DataConfig(dataset="folder", root=tmp_path, num_workers=0), "train", seed=1, image_size=4)
    test = load_dataset(DataConfig(dataset="folder", root=tmp_path, num_workers=0), "test", seed=1, image_size=4)
    assert (len(train), len(test)) == (8, 2)
    ids = sorted(train.images[:, 0, 0, 0].tolist() + test.images[:, 0, 0, 0].tolist())
    assert ids == [i * 20 for i in range(10)]
    seeds = {tuple(load_dataset(DataConfig(dataset="folder", root=tmp_path, num_workers=0), "test", seed=s, image_size=4)
                   .images[:, 0, 0, 0].tolist()) for s in range(6)}
    assert len(seeds) > 1  # the seed matters


def test_folder_with_loose_images_has_no_labels(tmp_path):
    make_class_folder(tmp_path, {"a": 3})
    save(tmp_path / "loose.png", solid())
    s = load_dataset(DataConfig(dataset="folder", root=tmp_path, num_workers=0), "train", image_size=8)
    assert s.labels is None and s.classes is None


def test_folder_with_train_and_test_subfolders(tmp_path):
    make_class_folder(tmp_path / "train", {"a": 3, "b": 2, "c": 1})
    make_class_folder(tmp_path / "test", {"b": 2, "c": 1})  # no "a": indices must still match train's
    train = load_dataset(DataConfig(dataset="folder", root=tmp_path, num_workers=2), "train", image_size=8)
    test = load_dataset(DataConfig(dataset="folder", root=tmp_path, num_workers=0), "test", image_size=8)
    assert train.classes == test.classes == ["a", "b", "c"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 2] and test.labels.tolist() == [1, 1, 2]
    assert test.name == "folder/test"


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(DataConfig(dataset="folder", root=tmp_path / "nope"), "train")
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(DataConfig(dataset="folder", root=tmp_path), "train")
    with pytest.raises(DatasetError, match="root"):
        load_dataset(DataConfig(dataset="folder"), "train")
    save(tmp_path / "a" / "one.png", solid())
    with pytest.raises(DatasetError, match="test split .* is empty"):
        load_dataset(DataConfig(dataset="folder", root=tmp_path, num_workers=0), "test")
    save(tmp_path / "split" / "train" / "good.png", solid())
    save(tmp_path / "split" / "test" / "good.png", solid())
    (tmp_path / "split" / "train" / "bad.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="1 of 3 images could not be decoded: .*bad.jpg"):
        load_dataset(DataConfig(dataset="folder", root=tmp_path / "split", num_workers=0), "train")


def test_list_images_recursive_sorted_case_insensitive(tmp_path):
    for rel in ["b/2.JPG", "b/1.png", "a.Jpeg", "c/d/e.TIFF", "notes.txt", ".hidden.jpg", ".git/x.png", "a.gif"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "c" / "loop")  # a cycle must not hang or duplicate
    got = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert got == ["a.Jpeg", "a.gif", "b/1.png", "b/2.JPG", "c/d/e.TIFF"]
    assert list_images(tmp_path / "a.gif") == [tmp_path / "a.gif"]


# --- decoding ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"])
def test_every_format_decodes(tmp_path, ext):
    path = save(tmp_path / f"x.{ext}", solid(RED, size=(40, 20)))
    x = decode_image(path, 16)
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and x.is_contiguous()
    r, g, b = x.float().mean((1, 2)).tolist()
    assert r > 230 and g < 25 and b < 25


def _mode_image(mode: str) -> tuple[Image.Image, tuple[int, int, int]]:
    """An image in `mode` and the RGB every pixel should decode to."""
    if mode == "I;16":  # 16-bit samples: 32896 / 257 = 128
        return Image.fromarray(np.full((8, 8), 32896, np.uint16)), (128, 128, 128)
    if mode == "I":  # 16-bit range held in int32
        return Image.fromarray(np.full((8, 8), 65535, np.int32)), (255, 255, 255)
    if mode == "F":  # float in [0, 1]
        return Image.fromarray(np.full((8, 8), 0.5, np.float32)), (128, 128, 128)
    if mode == "P":
        return solid(RED, (8, 8)).convert("P"), RED
    if mode == "CMYK":
        return Image.new("CMYK", (8, 8), (0, 255, 255, 0)), RED
    if mode == "LA":
        return Image.new("LA", (8, 8), (0, 0)), (255, 255, 255)  # fully transparent black -> white
    if mode == "RGBA":
        return Image.new("RGBA", (8, 8), (255, 0, 0, 128)), (255, 127, 127)  # half red over white
    return Image.new("L", (8, 8), 77), (77, 77, 77)


@pytest.mark.parametrize("mode, ext", [("L", "png"), ("LA", "png"), ("P", "png"), ("RGBA", "png"),
                                       ("RGBA", "webp"), ("CMYK", "tiff"), ("CMYK", "jpg"), ("I;16", "png"),
                                       ("I;16", "tiff"), ("I", "tiff"), ("F", "tiff")])
def test_modes_become_rgb_with_alpha_on_white(tmp_path, mode, ext):
    img, want = _mode_image(mode)
    path = save(tmp_path / f"x.{ext}", img, **({"lossless": True} if ext == "webp" else {}))
    with Image.open(path) as saved:
        assert saved.mode == img.mode
    x = decode_image(path, 8)
    assert x.shape == (3, 8, 8)
    assert (x[:, 4, 4].int() - torch.tensor(want)).abs().max() <= (3 if ext == "jpg" else 1), x[:, 4, 4]


def test_palette_transparency_and_gif_first_frame(tmp_path):
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0] + list(GREEN) + [0] * 762)
    p.info["transparency"] = 1  # palette entry 1 is transparent -> white
    assert decode_image(save(tmp_path / "t.png", p), 8)[:, 0, 0].tolist() == [255, 255, 255]
    frames = [solid(c, (8, 8)).convert("P") for c in (BLUE, RED)]
    gif = save(tmp_path / "anim.gif", frames[0], save_all=True, append_images=frames[1:])
    with Image.open(gif) as saved:
        assert saved.n_frames == 2
    assert decode_image(gif, 8)[:, 4, 4].tolist() == list(BLUE)


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_exif_orientation_is_applied(tmp_path, ext):
    img = Image.new("RGB", (20, 10), RED)  # left half red, right half blue
    img.paste(BLUE, (10, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the left half ends up on top
    x = decode_image(save(tmp_path / f"o.{ext}", img, exif=exif.tobytes()), 10)
    assert x.shape == (3, 10, 10)
    top, bottom = x[:, 1, 5].tolist(), x[:, 8, 5].tolist()
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, (top, bottom)


def test_content_decides_the_decoder_not_the_extension(tmp_path):
    x = decode_image(save(tmp_path / "really_a_png.jpg", solid(GREEN), format="PNG"), 8)
    assert x[:, 0, 0].tolist() == list(GREEN)


def test_resize_shorter_side_then_centre_crop(tmp_path):
    img = Image.new("RGB", (60, 20), RED)  # 3:1; only the middle third survives the crop
    img.paste(GREEN, (20, 0, 40, 20))
    x = decode_image(save(tmp_path / "wide.png", img), 10)
    inner = x[:, :, 1:-1]  # the two edge columns blend with red under the bilinear filter
    assert x.shape == (3, 10, 10) and (inner[1] == 255).all() and (inner[0] == 0).all()
    small = decode_image(save(tmp_path / "small.png", solid(BLUE, (4, 6))), 12)  # upscales too
    assert small.shape == (3, 12, 12)


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good_jpg = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(good_jpg)
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)  # incompressible: a long file
    good_png = save(tmp_path / "good.png", Image.fromarray(noise))
    files = {"zero_byte": b"", "text": b"this is not an image\n" * 10,
             "truncated_jpg": good_jpg.read_bytes()[: good_jpg.stat().st_size // 2],
             "truncated_png": good_png.read_bytes()[: good_png.stat().st_size // 2],
             "corrupt_png": good_png.read_bytes()[:40] + b"\x00garbage" * 50}
    out = {}
    for kind, blob in files.items():
        out[kind] = tmp_path / f"{kind}.{'png' if 'png' in kind else 'jpg'}"
        out[kind].write_bytes(blob)
    out["missing"] = tmp_path / "missing.jpg"
    out["other_format"] = save(tmp_path / "ppm.png", solid(), format="PPM")  # PIL reads PPM; we must not
    return out


def test_each_bad_file_raises_naming_the_path(tmp_path):
    for kind, path in _bad_files(tmp_path).items():
        with pytest.raises(ImageDecodeError) as e:
            decode_image(path, 8)
        assert e.value.path == path and str(path) in str(e.value) and e.value.reason, kind
        assert isinstance(e.value, DatasetError)


def test_truncated_fails_even_if_someone_enabled_load_truncated(tmp_path, monkeypatch):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # importing our modules must not switch it on
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageDecodeError):
        decode_image(_bad_files(tmp_path)["truncated_jpg"], 8)
    assert ImageFile.LOAD_TRUNCATED_IMAGES  # restored for whoever set it


def test_dataset_reports_bad_files_from_workers(tmp_path):
    bad = _bad_files(tmp_path)
    paths = [save(tmp_path / "a.png", solid(RED)), bad["zero_byte"], save(tmp_path / "b.png", solid(BLUE)),
             bad["text"], bad["truncated_jpg"]]
    ds = ImageFolderDataset(paths, 8)
    i, x, err = ds[1]
    assert i == 1 and x.numel() == 0 and err
    batches = list(iter_decoded(paths, 8, batch_size=2, num_workers=2))
    indices = torch.cat([b.indices for b in batches]).tolist()
    images = torch.cat([b.images for b in batches])
    failures = [i for b in batches for i, _ in b.failures]
    assert indices == [0, 2] and failures == [1, 3, 4] and images.shape == (2, 3, 8, 8)
    assert images[1, 2, 0, 0] == 255  # b.png is blue: index 2 landed in the right slot
    assert all(b.images.shape[1:] == (3, 8, 8) for b in batches)  # all-bad batch keeps the shape


# --- ImageSet, synthetic, names ---------------------------------------------------------------------------

def test_subset_is_seeded_sorted_and_sized():
    s = ImageSet(torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 2, 2).clone(),
                 torch.arange(20), None, "toy")
    a, b, c = s.subset(5, seed=1), s.subset(5, seed=1), s.subset(5, seed=2)
    assert len(a) == 5 and torch.equal(a.labels, b.labels) and not torch.equal(a.labels, c.labels)
    assert a.labels.tolist() == sorted(a.labels.tolist())
    assert torch.equal(a.images[:, 0, 0, 0].long(), a.labels)  # images and labels stay paired
    assert s.subset(20, 0) is s and s.subset(99, 0) is s
    assert s.to("cpu").images.device.type == "cpu"
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(2, 3, 4, 4), None, None, "float")


def test_synthetic_is_deterministic_labelled_and_split():
    a = load_dataset(DataConfig(dataset="synthetic", synthetic_size=200), "train", seed=5, image_size=24)
    b = load_dataset(DataConfig(dataset="synthetic", synthetic_size=200), "train", seed=5, image_size=24)
    t = load_dataset(DataConfig(dataset="synthetic", synthetic_size=200), "test", seed=5, image_size=24)
    assert a.images.shape == (200, 3, 24, 24) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, t.images)
    assert a.labels.bincount().tolist() == [20] * 10 and a.classes == [f"class{i}" for i in range(10)]
    assert not torch.equal(a.images, load_dataset(DataConfig(dataset="synthetic", synthetic_size=200), "train", seed=6, image_size=24).images)


def test_synthetic_classes_are_learnable():
    """Nearest class mean on shift-invariant features (mean colour, |FFT| of grey) transfers train -> test."""
    def features(s: ImageSet) -> torch.Tensor:
        x = s.images.float() / 255
        spectrum = torch.fft.rfft2(x.mean(1)).abs().flatten(1)
        return torch.cat([x.mean((2, 3)) * 10, spectrum / spectrum.norm(dim=1, keepdim=True)], 1)

    train = load_dataset(DataConfig(dataset="synthetic", synthetic_size=500), "train", seed=0)
    test = load_dataset(DataConfig(dataset="synthetic", synthetic_size=200), "test", seed=0)
    f_train, f_test = features(train), features(test)
    centroids = torch.stack([f_train[train.labels == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(f_test, centroids).argmin(1) == test.labels).float().mean().item()
    assert accuracy > 0.9


def test_names_and_normalization(monkeypatch, tmp_path):
    with pytest.raises(DatasetError, match="did you mean 'cifar10'"):
        load_dataset(DataConfig(dataset="cifar-10", download=False), "train")
    with pytest.raises(DatasetError, match="split"):
        load_dataset(DataConfig(dataset="synthetic"), "val")
    assert tuple(data.SOURCES) == ("cifar10", "cifar100", "folder", "synthetic", "webdataset")
    assert normalization_for("folder") == normalization_for("synthetic") == data.NORMALIZATION["imagenet"]
    assert normalization_for("cifar100") == data.NORMALIZATION["cifar100"]
    with pytest.raises(DatasetError):
        normalization_for("mnist")
    monkeypatch.setenv("SIMCLR_DATA_DIR", str(tmp_path))
    assert data.default_data_root() == tmp_path
    monkeypatch.delenv("SIMCLR_DATA_DIR")
    assert data.default_data_root() == Path.home() / ".cache" / "simclr-cli" / "data"
