"""`simclr report RUN_DIR`: figures of a run, from its files alone, in RUN_DIR/report/ with one index.html.

What is drawn, and from what:
- curves.png     metrics.jsonl: loss, lr and views/s per logged step, kNN top-1 per evaluation, resumes;
- health.png     metrics.jsonl: the representation's health per evaluation, the data wait per window;
- map.png        the encoder (encoder.pth, else the latest checkpoint.pt of a run still going or stopped)
                 on the test split of the run's dataset: h projected to 2-D (t-SNE when scikit-learn is
                 installed, else PCA through torch.pca_lowrank), coloured by class;
- neighbors.png  the first test image of each class, followed by its nearest train images by cosine on h;
                 a neighbour of another class is framed in red;
- a figure of the method's own, where it has one (`Method.report_figure`), from checkpoint.pt on the first
                 test image of each class: mae's reconstructions.png (original, masked, reconstructed).
The map and the grid need labels; a flat folder of images gets the curves alone. Nothing here trains or
changes the run, so a report can be drawn while the run goes on.
"""

from __future__ import annotations

import dataclasses
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simclr_cli.artifacts import open_artifact
from simclr_cli.config import Config
from simclr_cli.data import ImageSet, load_dataset, source_for
from simclr_cli.errors import DatasetError, MissingExtraError, OptionError
from simclr_cli import figures
from simclr_cli.serve.inference import Inference
from simclr_cli.score.knn import knn_accuracy
from simclr_cli.serve.search import top_k_cosine
from simclr_cli.files import atomic_write_text, check_output_path
from simclr_cli.methods.base import Method
from simclr_cli.models.encoder_file import LoadedEncoder
from simclr_cli.registry import METHODS
from simclr_cli.rundir import RunDir, scalars
from simclr_cli.runtime import Callback

MAPS = ("auto", "tsne", "pca")


@dataclass
class Report:
    folder: Path
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    facts: dict[str, str] = field(default_factory=dict)  # shown as a table in index.html
    notes: list[str] = field(default_factory=list)


def project_2d(h: torch.Tensor, method: str, seed: int) -> tuple[np.ndarray, str]:
    """(N, D) -> (N, 2) points and the method's name for the title. auto: t-SNE where scikit-learn is
    installed (neighbourhoods kept: classes show as islands), else PCA (needs nothing more)."""
    if method not in MAPS:
        raise OptionError(f"unknown map {method!r}: use one of {', '.join(MAPS)}")
    if method in ("auto", "tsne"):
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            if method == "tsne":
                raise MissingExtraError("--map tsne needs scikit-learn: pip install 'simclr-cli[map]', or use "
                                        "--map pca") from None
        else:
            x = torch.nn.functional.normalize(h.float(), dim=1).numpy()  # cosine geometry, as kNN sees it
            xy = TSNE(2, init="pca", perplexity=min(30.0, (len(x) - 1) / 3), random_state=seed).fit_transform(x)
            return xy.astype(np.float32), "t-SNE"
    x = torch.nn.functional.normalize(h.float(), dim=1)  # the same cosine geometry: raw h lets a few dims rule
    x = x - x.mean(dim=0)
    _, _, v = torch.pca_lowrank(x, q=min(2, *x.shape), center=False, niter=6)  # (D, 2)
    return (x @ v[:, :2]).numpy(), "PCA"


def first_of_each_class(labels: torch.Tensor, count: int) -> list[int]:
    """The fixed queries: the first image of each class, for the first `count` classes present."""
    firsts = {}
    for i, c in enumerate(labels.tolist()):
        firsts.setdefault(c, i)
    return [firsts[c] for c in sorted(firsts)[:count]]


def _splits(cfg: Config, loaded: LoadedEncoder, root: str | Path | None, limit: int | None,
            num_workers: int) -> tuple[ImageSet, ImageSet] | None:
    d = dataclasses.replace(cfg.data, num_workers=num_workers, **({} if root is None else {"root": str(root)}))
    if source_for(d.dataset).kind != "map":  # streamed shards: no split to hold whole (the note says so)
        return None
    try:
        train = load_dataset(d, "train", seed=cfg.train.seed, image_size=loaded.image_size)
        if train.labels is None:
            return None
        test = load_dataset(d, "test", seed=cfg.train.seed, image_size=loaded.image_size)
    except DatasetError as err:
        raise DatasetError(f"{str(err).rstrip('.')} (the report reads the run's {d.dataset} data: pass --data-root "
                           "where it is now)") from None
    if limit is not None:
        train, test = train.subset(limit, cfg.train.seed), test.subset(limit, cfg.train.seed + 1)
    return train, test


def _embed(loaded: LoadedEncoder, data: ImageSet, opts: dict, emit: Callback) -> torch.Tensor:
    def progress(done: int, total: int) -> None:
        emit("extract", {"split": data.name, "done": done, "total": total})

    return opts["run"].features(loaded, data.images, opts["batch_size"], callback=progress)


def _grid_rows(train: ImageSet, test: ImageSet, h_train: torch.Tensor, h_test: torch.Tensor, queries: int,
               k: int) -> list[dict[str, Any]]:
    asked = first_of_each_class(test.labels, queries)
    sims, rows = top_k_cosine(h_test[asked], h_train, k)
    names = test.classes
    out = []
    for q, srow, rrow in zip(asked, sims.tolist(), rows.tolist()):
        cls = int(test.labels[q])
        neighbors = [{"image": train.images[r].numpy(), "other_class": int(train.labels[r]) != cls,
                      "caption": f"{s:.3f} {names[int(train.labels[r])]}"} for s, r in zip(srow, rrow)]
        out.append({"image": test.images[q].numpy(), "caption": names[cls], "neighbors": neighbors})
    return out


def _draw_encoder_figures(report: Report, cfg: Config, loaded: LoadedEncoder, splits, opts: dict,
                          emit: Callback) -> None:
    train, test = splits
    h_train, h_test = _embed(loaded, train, opts, emit), _embed(loaded, test, opts, emit)
    classes = len(train.classes)
    knn = knn_accuracy(h_train, train.labels, h_test, test.labels, classes, cfg.train.knn_k, cfg.train.knn_temperature)
    report.facts["kNN top-1 (this report)"] = (f"{100 * knn:.2f}% (k={cfg.train.knn_k}, {len(train)} train, "
                                               f"{len(test)} test images)")
    emit("stage", {"message": "map"})
    g = torch.Generator().manual_seed(cfg.train.seed + 2)  # the same images on every report of this run
    idx = torch.randperm(len(test), generator=g)[:opts["map_points"]].sort().values
    xy, how = project_2d(h_test[idx], opts["map"], cfg.train.seed)
    figures.embedding_map(xy, test.labels[idx].numpy(), test.classes, report.folder / "map.png",
                        f"{how} of h, {len(idx)} {test.name} images, coloured by class")
    report.figures.append(("map.png", f"{how} map of the representation h of {len(idx)} test images"))
    emit("stage", {"message": "neighbours"})
    rows = _grid_rows(train, test, h_train, h_test, opts["queries"], opts["k"])
    figures.neighbors_grid(rows, report.folder / "neighbors.png",
                         f"nearest {train.name} images by cosine on h (red frame: another class)")
    report.figures.append(("neighbors.png", f"the first {test.name} image of each class and its {opts['k']} nearest "
                                            f"{train.name} images; red frame: another class"))


def _draw_method_figure(report: Report, cfg: Config, rundir: RunDir, test: ImageSet, emit: Callback) -> None:
    """The method's own figure from the run's checkpoint (its networks beyond the encoder), where it has one."""
    method = METHODS[cfg.method.name]
    if method.report_figure.__func__ is Method.report_figure.__func__ or not rundir.checkpoint.is_file():
        return  # no figure of its own (most methods), or no checkpoint to draw it from
    emit("stage", {"message": cfg.method.name})
    ckpt = open_artifact(rundir.checkpoint)
    images = torch.stack([torch.as_tensor(test.images[i]) for i in first_of_each_class(test.labels, 8)])
    figure = method.report_figure(ckpt.config, ckpt.model, images)
    if figure is not None:
        figures.image_rows(figure.columns, figure.rows, report.folder / figure.file, f"{cfg.method.name}: {test.name}")
        report.figures.append((figure.file, figure.caption))


def _facts(cfg: Config, records: list[dict], encoder: Path | None) -> dict[str, str]:
    steps = [r for r in records if r.get("kind") == "step"]
    evals = [r for r in records if r.get("kind") == "eval"]
    epochs = max((r["epoch"] for r in records if r.get("kind") == "epoch"), default=0)
    facts = {"method": cfg.method.name, "model": f"{cfg.model.arch} width {cfg.model.width}, {cfg.model.stem} stem",
             "data": cfg.data.dataset, "epochs done": f"{epochs} of {cfg.train.epochs}",
             "steps logged": str(len(steps))}
    if steps:
        facts["last logged loss"] = f"{steps[-1]['loss']:.4f} (step {steps[-1]['step']})"
    if evals:
        facts["last kNN monitor"] = (f"{100 * evals[-1]['knn_top1']:.2f}% ({evals[-1].get('split', 'test')} split, "
                                     f"step {evals[-1]['step']})")
    resumes = [str(r["step"]) for r in records if r.get("kind") == "resume"]
    if resumes:
        facts["resumed at step"] = ", ".join(resumes)
    facts["encoder"] = str(encoder) if encoder else "none yet"
    return facts


def write_index(report: Report, title: str) -> Path:
    """index.html beside the figures: no scripts, no network, the PNGs by relative path."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in report.facts.items())
    notes = "".join(f"<p class=note>{html.escape(n)}</p>" for n in report.notes)
    figures = "".join(f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
                      f"<figcaption>{html.escape(caption)}</figcaption></figure>" for name, caption in report.figures)
    page = (f"<!doctype html><html lang=en><meta charset=utf-8><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1150px;margin:2em auto;color:#222}"
            "th{text-align:left;padding-right:1.5em;font-weight:600}img{max-width:100%}"
            "figure{margin:2em 0}figcaption{color:#555}.note{color:#8a5a00}</style>"
            f"<h1>{html.escape(title)}</h1><table>{rows}</table>{notes}{figures}</html>\n")
    return atomic_write_text(page, report.folder / "index.html")


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingExtraError("--tensorboard needs the tensorboard package: pip install "
                                "'simclr-cli[tensorboard]'") from None
    return SummaryWriter


def write_tensorboard(records: list[dict], folder: Path) -> Path:
    """The same scalars as event files for TensorBoard (`tensorboard --logdir FOLDER`), rewritten whole."""
    SummaryWriter = _summary_writer()
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("events.out.tfevents.*"):  # a second report replaces the scalars, not doubles them
        old.unlink()
    with SummaryWriter(str(folder)) as writer:
        for r in records:
            for tag, value in scalars(r).items():  # the tags a live run's train.loggers tensorboard gives them
                writer.add_scalar(tag, value, r["step"])
    return folder


def _draw_curves(report, records: list[dict], title: str) -> None:
    """curves.png, and health.png where the run logged its health or data wait (older runs logged neither)."""
    figures.curves(records, report.folder / "curves.png", title)
    report.figures.append(("curves.png", "loss, learning rate and views/s per logged step; kNN top-1 per "
                                         "evaluation; dashed: resumed"))
    if any("rank_z" in r or "data_wait" in r for r in records):
        figures.health_curves(records, report.folder / "health.png", f"{title}: representation health, data wait")
        report.figures.append(("health.png", "effective ranks of h and z, spread, alignment and uniformity per "
                                             "evaluation; data wait per logged window; red: collapse warnings"))


def make_report(run_dir: str | Path, *, output: str | Path | None = None, data_root: str | Path | None = None,
                device: str = "auto", precision: str = "auto", map_method: str = "auto", map_points: int = 5000,
                queries: int = 10, k: int = 8, limit: int | None = None, batch_size: int = 512,
                num_workers: int = 2, tensorboard: bool = False, callback: Callback | None = None) -> Report:
    """Draw the run's figures into `output` (default RUN_DIR/report) and write index.html last."""
    emit = callback or (lambda event, data: None)
    if min(map_points, queries, k, batch_size) < 1 or (limit is not None and limit < 1) or map_method not in MAPS:
        raise OptionError("need --map-points, --queries, -k, --batch-size and --limit >= 1 and --map in "
                          f"{'|'.join(MAPS)}; got {map_points}, {queries}, {k}, {batch_size}, {limit}, {map_method!r}")
    rundir = RunDir(Path(run_dir).expanduser())
    run, cfg, encoder = rundir.path, rundir.read_config(), rundir.latest_encoder_source()
    figures.require()
    if tensorboard:
        _summary_writer()  # a missing extra fails now, not after minutes of embedding
    report = Report(Path(output).expanduser() if output is not None else run / "report")
    check_output_path(report.folder / "index.html")
    records = rundir.records()
    report.facts = _facts(cfg, records, encoder)
    inference = Inference(device, precision)
    opts = {"run": inference, "batch_size": batch_size, "map": map_method, "map_points": map_points,
            "queries": queries, "k": k}
    report.facts["drawn with"] = inference.describe()
    loaded = splits = None
    if encoder is not None:  # every input is read before anything is drawn
        loaded = inference.load(encoder)
        if encoder != rundir.encoder:
            report.facts["encoder"] += f" (epoch {loaded.provenance.get('epoch', '?')}: the run has no encoder.pth yet)"
        splits = _splits(cfg, loaded, data_root, limit, num_workers)
    emit("start", {"run": str(run), "output": str(report.folder), "encoder": str(encoder) if encoder else None,
                   "device": str(inference.device), "precision": inference.precision})
    report.folder.mkdir(parents=True, exist_ok=True)
    _draw_curves(report, records, f"{run.name}: {cfg.method.name}, {cfg.data.dataset}")
    if encoder is None:
        report.notes.append(f"{run} has no encoder.pth or checkpoint.pt yet: only the curves are drawn; the map "
                            "and the neighbours come once the run has saved its first checkpoint")
    elif splits is None:
        why = "streams its shards" if source_for(cfg.data.dataset).kind != "map" else "has no labels (a flat folder)"
        report.notes.append(f"the run's {cfg.data.dataset} data {why}: no map or neighbour grid, which colour and "
                            "frame by class")
    else:
        _draw_encoder_figures(report, cfg, loaded, splits, opts, emit)
        _draw_method_figure(report, cfg, rundir, splits[1], emit)
    if tensorboard:
        write_tensorboard(records, report.folder / "tensorboard")
        report.notes.append(f"TensorBoard: tensorboard --logdir {report.folder / 'tensorboard'}")
    write_index(report, f"simclr report: {run.name}")
    emit("end", {"folder": str(report.folder)})
    return report
