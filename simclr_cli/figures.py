"""The report's pictures, drawn with matplotlib from plain data: training curves, a 2-D map of embeddings
coloured by class, and grids of query images with their nearest neighbours.

matplotlib is the optional extra `report` (`pip install 'simclr-cli[report]'`): training, probing and
embedding never need it. Figures are built with matplotlib's object API (`Figure`, no pyplot), so nothing
depends on a display or a global backend, and each PNG is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from simclr_cli.errors import MissingExtraError
from simclr_cli.files import atomic_file

DPI = 100  # pixels per inch of every PNG: sizes below are in inches, so a 10 x 7 figure is 1000 x 700 px
OTHER_CLASS = "#d62728"  # frame of a neighbour whose class differs from the query's
RESUMED = "#7f7f7f"  # the dashed line where a run was resumed


def require() -> None:
    """Fail at once, in one line naming the extra, where matplotlib is missing: before minutes of work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingExtraError("drawing figures needs matplotlib: pip install 'simclr-cli[report]'") from None


def _figure(width: float, height: float):
    require()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save(fig, path: str | Path) -> Path:
    with atomic_file(path) as fp:
        fig.savefig(fp, format="png", dpi=DPI)
    return Path(path)


# --- curves ----------------------------------------------------------------------------------------------

def _series(records: Sequence[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def _steps_per_epoch(records: Sequence[dict]) -> float | None:
    ends = [r for r in records if r.get("kind") == "epoch" and r.get("epoch") and r.get("step")]
    return ends[0]["step"] / ends[0]["epoch"] if ends else None


def curves(records: Sequence[dict], path: str | Path, title: str) -> Path:
    """Loss, learning rate and views/s per logged step, kNN top-1 per evaluation, against the step; a dashed
    line where the run was resumed; epochs on the top axis."""
    fig = _figure(11, 7)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    panels = [("training loss", "step", "loss", "per logged window"), ("learning rate", "step", "lr", "lr"),
              ("views/s", "step", "views_per_s", "views/s"), ("kNN top-1 (%)", "eval", "knn_top1", "kNN monitor")]
    for ax, (ylabel, kind, key, name) in zip(axes, panels):
        x, y = _series(records, kind, key)
        if key == "knn_top1":
            y = [100 * v for v in y]
        ax.plot(x, y, marker="o" if kind == "eval" else None, markersize=4, linewidth=1.2, label=name)
        if key == "loss":
            ex, ey = _series(records, "epoch", "loss")
            ax.plot(ex, ey, "s", markersize=4, label="epoch mean")
        if key == "knn_top1" and y:
            ax.annotate(f"{y[-1]:.2f}%", (x[-1], y[-1]), textcoords="offset points", xytext=(-6, -4), ha="right",
                        va="top")  # below the last point: above it runs into the frame
        if not x:
            ax.text(0.5, 0.5, "no evaluation yet" if kind == "eval" else "nothing logged yet",
                    transform=ax.transAxes, ha="center", va="center", color=RESUMED)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for i, step in enumerate(r["step"] for r in records if r.get("kind") == "resume"):
        for ax in axes:
            ax.axvline(step, color=RESUMED, linestyle="--", linewidth=1, label="resumed" if i == 0 else None)
    axes[0].legend(fontsize=8)
    for ax in axes[2:]:
        ax.set_xlabel("step")
    spe = _steps_per_epoch(records)
    if spe:
        for ax in axes[:2]:
            ax.secondary_xaxis("top", functions=(lambda s: s / spe, lambda e: e * spe)).set_xlabel("epoch")
    fig.suptitle(title)
    return save(fig, path)


def health_curves(records: Sequence[dict], path: str | Path, title: str) -> Path:
    """The representation's health per evaluation (`score.health`: effective ranks of h and z, the spread
    of z per dimension against a uniform spread's, alignment, uniformity) and the data-wait share per logged
    window, against the step; a red line at each collapse warning."""
    fig = _figure(13, 7)
    axes = fig.subplots(2, 3, sharex=True).ravel()
    panels = [("effective rank", [("rank_h", "h"), ("rank_z", "z")]), ("std per dimension of z", [("z_std", "z")]),
              ("alignment (0: views agree)", [("alignment", "two views")]),
              ("uniformity (lower: more spread)", [("uniformity", "z")]), ("data wait (% of wall time)", [])]
    for ax, (ylabel, lines) in zip(axes, panels):
        for key, name in lines:
            x, y = _series(records, "eval", key)
            ax.plot(x, y, marker="o", markersize=4, linewidth=1.2, label=name)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    x, y = _series(records, "eval", "z_std_uniform")
    axes[1].plot(x, y, "--", color=RESUMED, linewidth=1, label="uniform spread")
    x, y = _series(records, "step", "data_wait")
    axes[4].plot(x, [100 * v for v in y], linewidth=1.2)
    axes[4].axhline(10, color=RESUMED, linestyle="--", linewidth=1, label="10%: shown on the progress line")
    for i, step in enumerate(r["step"] for r in records if r.get("kind") == "warning"):
        for ax in axes[:5]:
            ax.axvline(step, color=OTHER_CLASS, linewidth=1, label="collapse warning" if i == 0 else None)
    for ax in axes[:5]:
        ax.legend(fontsize=8)
    for ax in axes[2:5]:
        ax.set_xlabel("step")
    axes[2].xaxis.set_tick_params(labelbottom=True)  # nothing below it: its own step labels
    axes[5].axis("off")
    fig.suptitle(title)
    return save(fig, path)


# --- the map ---------------------------------------------------------------------------------------------

def embedding_map(xy: np.ndarray, labels: np.ndarray, classes: Sequence[str], path: str | Path, title: str) -> Path:
    """A scatter of 2-D points (N, 2) coloured by class, with a legend of class names up to 20 classes."""
    fig = _figure(9, 8)
    ax = fig.subplots()
    many = len(classes) > 20
    size = float(np.clip(20_000 / max(len(xy), 1), 3, 30))  # points in pt^2: fewer points, larger dots
    cmap = "gist_ncar" if many else "tab10" if len(classes) <= 10 else "tab20"
    import matplotlib

    palette = matplotlib.colormaps[cmap]
    for c, name in enumerate(classes):
        at = labels == c
        color = palette(c / max(len(classes) - 1, 1)) if many else palette(c)
        ax.scatter(xy[at, 0], xy[at, 1], s=size, alpha=0.6, color=color, label=name, linewidths=0)
    if not many:
        ax.legend(markerscale=3, fontsize=9, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=11)
    return save(fig, path)


# --- neighbour grids -------------------------------------------------------------------------------------

def _show(ax, image: np.ndarray, caption: str, frame: str | None) -> None:
    ax.imshow(image.transpose(1, 2, 0), interpolation="nearest" if image.shape[-1] <= 64 else "antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(frame is not None)
        if frame is not None:
            spine.set_edgecolor(frame)
            spine.set_linewidth(4)
    ax.set_xlabel(caption, fontsize=7, labelpad=2)


def neighbors_grid(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """One row per query: the query image, then its neighbours with their similarity (and class).

    rows: {"image": uint8 (3, H, W), "caption": str, "neighbors": [{"image", "caption", "other_class"}]};
    a neighbour with other_class True is framed in red."""
    cols = 1 + max(len(r["neighbors"]) for r in rows)
    fig = _figure(1.25 * cols + 0.3, 1.45 * len(rows) + 0.5)
    grid = fig.subplots(len(rows), cols, squeeze=False)
    for r, row in enumerate(rows):
        _show(grid[r, 0], row["image"], row["caption"], "black")
        for c in range(1, cols):
            ax = grid[r, c]
            if c - 1 < len(row["neighbors"]):
                n = row["neighbors"][c - 1]
                _show(ax, n["image"], n["caption"], OTHER_CLASS if n.get("other_class") else None)
            else:
                ax.set_axis_off()
    grid[0, 0].set_title("query", fontsize=9)
    for c in range(1, cols):
        grid[0, c].set_title(f"#{c}", fontsize=9)
    fig.suptitle(title, fontsize=11)
    return save(fig, path)


def image_rows(columns: Sequence[str], rows: Sequence[Sequence[np.ndarray]], path: str | Path, title: str) -> Path:
    """Rows of uint8 (3, H, W) images under one title per column: a method's own figure (mae's
    reconstructions: original, masked, reconstructed)."""
    fig = _figure(1.25 * len(columns) + 0.3, 1.3 * len(rows) + 0.6)
    grid = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            _show(grid[r, c], image, "", None)
    for c, name in enumerate(columns):
        grid[0, c].set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=11)
    return save(fig, path)
