"""Evaluation: preprocessing, feature extraction, weighted kNN against a slow reference, the linear probe on
separable and on random labels, and the whole protocol on synthetic images."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from simclr_cli.config import DataConfig, load_config
from simclr_cli.errors import OptionError
from simclr_cli.score.knn import knn_accuracy, knn_classify
from simclr_cli.score.linear import holdout_split, linear_probe
from simclr_cli.score.probe import random_encoder, run_probe
from simclr_cli.files import atomic_save
from simclr_cli.models import ProjectionHead, ResNetEncoder, build_model
from simclr_cli.models.encoder_file import encoder_payload, load_encoder
from simclr_cli.models.features import extract_features, preprocess

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_preprocess_scales_normalises_and_resizes():
    x = images(4)
    expected = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess(x, MEAN, STD, 16), expected)
    resized = F.interpolate(x.float(), size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    expected = (resized / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess(x, MEAN, STD, 8), expected)


def test_extract_features_equals_the_plain_forward_in_any_batch_size():
    torch.manual_seed(0)
    enc, head = ResNetEncoder(width=8).eval(), ProjectionHead(64, 32, 16, layers=3).eval()
    x = images(10)
    with torch.no_grad():
        h = enc(preprocess(x, MEAN, STD, 16))
        z1 = head(h, layer=1)
    seen = []
    feats = extract_features(enc, x, MEAN, STD, 16, torch.device("cpu"), batch_size=3,
                             callback=lambda done, total: seen.append((done, total)))
    assert feats.dtype == torch.float32 and feats.shape == (10, 64) and seen[-1] == (10, 10) and len(seen) == 4
    torch.testing.assert_close(feats, h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(extract_features(enc, x, MEAN, STD, 16, torch.device("cpu"), batch_size=7), feats,
                               rtol=1e-4, atol=1e-5)
    layer1 = extract_features(enc, x, MEAN, STD, 16, torch.device("cpu"), head=head, layer=1)
    assert layer1.shape == (10, 32)
    torch.testing.assert_close(layer1, z1, rtol=1e-4, atol=1e-5)
    for head_, layer in ((None, 1), (head, 4)):
        with pytest.raises(OptionError, match="layer"):
            extract_features(enc, x, MEAN, STD, 16, torch.device("cpu"), head=head_, layer=layer)


# --- kNN -------------------------------------------------------------------------------------------------

def knn_reference(train, train_labels, test, num_classes, k, t):
    """Written from Wu et al. 2018, one test point at a time: cosine similarity to every train point, the k
    largest, each voting exp(sim / t) for its class; ties go to the lower class index."""
    preds = []
    for q in test:
        sims = [(float(torch.dot(q, x) / (q.norm() * x.norm())), int(y)) for x, y in zip(train, train_labels)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, y in sims[:k]:
            votes[y] += math.exp(sim / t)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(preds)


@pytest.mark.parametrize("k,t", [(1, 0.1), (7, 0.1), (20, 0.5), (500, 0.1)])
def test_knn_matches_the_slow_reference(k, t):
    g = torch.Generator().manual_seed(k)
    train, test = torch.randn(120, 8, generator=g), torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 5, (120,), generator=g)
    got = knn_classify(train, labels, test, 5, k=k, temperature=t, chunk=7)  # chunks cut through the test set
    assert torch.equal(got, knn_reference(train, labels, test, 5, k, t))


def test_knn_finds_the_point_itself_and_scores_accuracy():
    g = torch.Generator().manual_seed(0)
    train, labels = torch.randn(50, 16, generator=g), torch.randint(0, 4, (50,), generator=g)
    assert knn_accuracy(train, labels, train * 3.0, labels, 4, k=1) == 1.0  # cosine: scale does not matter


# --- linear probe ----------------------------------------------------------------------------------------

def blobs(n: int, num_classes: int = 10, dim: int = 32, spread: float = 0.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, dim, generator=g), labels


def test_linear_probe_separates_separable_features():
    (xtr, ytr), (xte, yte) = blobs(1000, seed=1), blobs(500, seed=2)
    result = linear_probe(xtr * 50 + 7, ytr, xte * 50 + 7, yte, 10)  # scale and offset: standardised away
    assert result["top1"] > 0.98 and result["top5"] == 1.0 and 90 <= result["val_size"] <= 110
    assert result["weight_decay"] in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


@pytest.mark.parametrize("scale", [1e-9, 1e6])
def test_linear_probe_does_not_depend_on_the_features_scale(scale):
    """An untrained MobileNet's h is ~1e-9: an absolute floor on the std left it unscaled (10%, chance)."""
    (xtr, ytr), (xte, yte) = blobs(1000, seed=1), blobs(500, seed=2)
    xtr[:, 0], xte[:, 0] = 3.0, 3.0  # a dimension that never varies is only centred, at any scale
    result = linear_probe(xtr * scale, ytr, xte * scale, yte, 10)
    assert result["top1"] > 0.98 and result["top1"] == linear_probe(xtr, ytr, xte, yte, 10)["top1"]


def test_linear_probe_on_random_labels_is_near_chance():
    g = torch.Generator().manual_seed(0)
    xtr, xte = torch.randn(2000, 64, generator=g), torch.randn(2000, 64, generator=g)
    ytr, yte = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (2000,), generator=g)
    result = linear_probe(xtr, ytr, xte, yte, 10)
    assert abs(result["top1"] - 0.1) < 0.03 and abs(result["top5"] - 0.5) < 0.05


def test_linear_probe_never_looks_at_the_test_labels():
    (xtr, ytr), (xte, yte) = blobs(600, spread=1.5, seed=3), blobs(300, spread=1.5, seed=4)
    a = linear_probe(xtr, ytr, xte, yte, 10)
    b = linear_probe(xtr, ytr, xte, yte[torch.randperm(300, generator=torch.Generator().manual_seed(0))], 10)
    assert a["weight_decay"] == b["weight_decay"] and a["grid"] == b["grid"] and a["top1"] != b["top1"]


def test_holdout_split_is_stratified_disjoint_and_seeded():
    labels = torch.arange(10).repeat_interleave(20)  # 10 classes x 20
    fit, held = holdout_split(labels, 0.1, seed=0)
    assert len(held) == 20 and set(fit.tolist()).isdisjoint(held.tolist()) and len(fit) + len(held) == 200
    assert torch.bincount(labels[held]).tolist() == [2] * 10
    assert torch.equal(held, holdout_split(labels, 0.1, seed=0)[1])
    assert not torch.equal(held, holdout_split(labels, 0.1, seed=1)[1])


# --- the protocol ----------------------------------------------------------------------------------------

@pytest.fixture
def tiny_encoder_file(tmp_path):
    cfg = load_config(None, ["data.dataset=synthetic", "model.width=8", "data.image_size=16", "train.seed=5"])
    torch.manual_seed(5)
    model = build_model(cfg.model)
    return atomic_save(encoder_payload(model.encoder, cfg, model.head, (0.45,) * 3, (0.25,) * 3, epoch=0, step=0),
                       tmp_path / "encoder.pth"), model


def test_random_init_is_the_seeded_build_model_and_leaves_the_rng_alone(tiny_encoder_file):
    path, model = tiny_encoder_file
    with torch.no_grad():  # make the loaded weights differ from any init
        for p in model.parameters():
            p.add_(1.0)
    loaded = load_encoder(path)
    state = torch.get_rng_state()
    random = random_encoder(loaded, seed=5)
    encoder, head = random.encoder, random.head
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(5)
    fresh = build_model(load_config(None, ["model.width=8"]).model)
    for a, b in ((encoder, fresh.encoder), (head, fresh.head)):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb), ka


def test_probe_on_synthetic_reaches_well_above_chance(tiny_encoder_file):
    path, _ = tiny_encoder_file
    events = []
    report = run_probe(path, "synthetic", device="cpu", synthetic_size=300, baseline=True,
                       callback=lambda e, d: events.append(e))
    assert report["models"] == ["trained", "random_init"] and report["random_init_seed"] == 5
    assert report["dataset"]["num_classes"] == 10 and report["precision"] in ("fp32", "bf16")
    for res in report["results"].values():  # chance is 10%
        assert res["linear_top1"] > 0.5 and res["knn_top1"] > 0.3, res
    assert events[0] == "start" and events[-1] == "end" and "extract" in events
    again = run_probe(path, "synthetic", device="cpu", synthetic_size=300, random_init=True)
    assert list(again["results"]) == ["random_init"]
    assert again["results"]["random_init"]["linear"] == report["results"]["random_init"]["linear"]


# --- the validation split: recipes are chosen on it, the test split is reported once -------------------------

def test_the_monitor_queries_a_fixed_validation_split_of_the_training_images():
    from simclr_cli.data import load_dataset, split_validation
    from simclr_cli.train.monitor import load_monitor

    train = load_dataset(DataConfig(dataset="synthetic", synthetic_size=300), "train", image_size=16)
    rest, val = split_validation(train, 5000)
    assert (len(rest), len(val)) == (270, 30)  # capped at a tenth of the split
    again_rest, again_val = split_validation(train, 5000)
    assert torch.equal(val.images, again_val.images)  # fixed: the same images for every recipe and seed
    rows = {tuple(x.flatten().tolist()[:40]) for x in rest.images}
    assert not any(tuple(x.flatten().tolist()[:40]) in rows for x in val.images)  # disjoint
    assert len(split_validation(train, 12)[1]) == 12
    cfg = load_config(None, ["data.dataset=synthetic", "data.synthetic_size=300", "data.image_size=16"])
    assert cfg.train.eval_split == "val"
    monitor, why = load_monitor(cfg, train, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), "fp32")
    assert why is None and (len(monitor.bank), len(monitor.queries)) == (270, 30)
    cfg = load_config(None, ["data.dataset=synthetic", "data.synthetic_size=300", "data.image_size=16",
                             "train.eval_split=test"])
    monitor, _ = load_monitor(cfg, train, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), "fp32")
    assert (len(monitor.bank), len(monitor.queries)) == (300, 300)  # the test split, as before


def test_probe_on_the_validation_split(tmp_path):
    path = tmp_path / "encoder.pth"
    cfg = load_config(None, ["data.dataset=synthetic", "data.image_size=16", "model.width=8"])
    atomic_save(encoder_payload(build_model(cfg.model).encoder, cfg, mean=(0.5,) * 3, std=(0.25,) * 3), path)
    report = run_probe(path, "synthetic", device="cpu", precision="fp32", synthetic_size=200, split="val")
    d = report["dataset"]
    assert (d["train_size"], d["test_size"], d["evaluated_on"]) == (180, 20, "val")
    with pytest.raises(OptionError, match="test or val"):
        run_probe(path, "synthetic", device="cpu", synthetic_size=200, split="train")
