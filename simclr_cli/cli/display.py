"""Rich renderers of the core's events and results: panels, progress bars, tables and one-line messages.

Everything goes to stderr (`console`): stdout carries data only (`simclr embed images/ > vectors.npy`).
Only the cli wing imports rich; the core reports through callbacks and return values.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from simclr_cli import __version__
from simclr_cli.score.evaluation import table_columns

console = Console(stderr=True)


def error(message: str) -> None:
    # escaped: "pip install 'simclr-cli[report]'" or a path like runs/[exp] is text, not Rich markup
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def note(message: str) -> None:
    console.print(f"[yellow]note:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


def line(message: str) -> None:
    """One plain line (for logs: soft-wrapped, so a long path never breaks it in two)."""
    console.print(message, highlight=False, soft_wrap=True, markup=False)


class CacheProgress:
    """The first decode of an image folder into the cache: one bar with images/s and ETA, then one line."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.t0 = 0.0

    def __call__(self, d: dict) -> None:
        if self.progress is None:
            line(f"decoding {d['total']} images into the folder cache (once; later runs map it)")
            self.progress = Progress(TextColumn("cache"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]} images/s"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), console=console, transient=True,
                                     disable=not console.is_terminal)  # in a log: the two lines only
            self.task = self.progress.add_task("cache", total=d["total"], rate="-")
            self.progress.start()
            self.t0 = time.perf_counter()
        seconds = time.perf_counter() - self.t0
        self.progress.update(self.task, completed=d["done"], rate=f"{d['done'] / seconds:.0f}" if seconds else "-")
        if d["done"] >= d["total"]:
            self.progress.stop()
            bad = f", {d['bad']} did not decode" if d["bad"] else ""
            line(f"cached {d['total']} images in {seconds:.1f} s ({d['total'] / max(seconds, 1e-9):.0f} images/s){bad}")
            self.progress = None


class PretrainDisplay:
    """Rich panel at start, one progress bar over all steps, and a line per epoch; rank 0 only."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress: Progress | None = None
        self.task = None
        self.on_cache = CacheProgress()

    def __call__(self, event: str, data: dict) -> None:
        if not self.enabled:
            return
        getattr(self, f"on_{event}", lambda d: None)(data)

    def on_start(self, d: dict) -> None:
        table = Table.grid(padding=(0, 2))
        for key, value in d["info"].items():
            table.add_row(f"[bold]{key}[/bold]", str(value))
        console.print(Panel(table, title=f"simclr pretrain {__version__}", expand=False))
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[rate]} views/s{task.fields[wait]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)
        total = d["epochs"] * d["steps_per_epoch"]
        self.task = self.progress.add_task("pretrain", total=total, completed=d["step"], epoch=d["start_epoch"] + 1,
                                           epochs=d["epochs"], loss="-", lr="-", rate="-", wait="")
        self.progress.start()

    def on_log(self, d: dict) -> None:
        self.progress.update(self.task, completed=d["step"], epoch=d["epoch"], loss=f"{d['loss']:.4f}",
                             lr=f"{d['lr']:.3g}", rate=f"{d['views_per_s']:.0f}",
                             wait=f"  data wait {100 * d['data_wait']:.0f}%" if d.get("data_wait", 0) > 0.1 else "")

    def on_epoch(self, d: dict) -> None:
        self.progress.console.print(f"epoch {d['epoch']}: loss {d['loss']:.4f}  lr {d['lr']:.3g}", highlight=False)

    def on_eval(self, d: dict) -> None:
        health = f"; effective rank h {d['rank_h']:.1f}, z {d['rank_z']:.1f}" if "rank_z" in d else ""
        self.progress.console.print(f"epoch {d['epoch']}: kNN top-1 {100 * d['knn_top1']:.2f}% ({d.get('split', 'test')})"
                                    f"{health}", highlight=False)

    def on_notice(self, d: dict) -> None:
        note(d["message"])

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class ProbeDisplay:
    """Panel with the encoder recognised, a transient progress bar per extraction, a line per stage."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console, transient=True)
        self.tasks: dict = {}
        self.on_cache = CacheProgress()

    def __call__(self, event: str, data: dict) -> None:
        getattr(self, f"on_{event}", lambda d: None)(data)

    def on_start(self, d: dict) -> None:
        e, ds = d["encoder"], d["dataset"]
        grid = Table.grid(padding=(0, 2))
        rows = {"encoder": f"{e['path']}: recognised as {e['kind']}",
                "model": f"{e['arch']}, {e['stem']} stem" + (f", width {e['width']}" if "width" in e else "") + ", "
                         + (f"h of {e['feature_dim']}" if not d["layer"] else f"head layer {d['layer']}"),
                "input": f"{e['image_size']}px, mean {tuple(round(m, 4) for m in e['mean'])}, "
                         f"std {tuple(round(s, 4) for s in e['std'])}",
                "dataset": f"{ds['name']}: {ds['train_size']} train, {ds['test_size']} test, {ds['num_classes']} classes"
                           + (f" (labels {ds['labels']['labels']}, seed {ds['labels']['seed']})"
                              if ds.get("labels", {}).get("labels", "all") != "all" else ""),
                "device": f"{d['device']}, {d['precision']}"}
        if e["provenance"]:
            p = e["provenance"]
            rows["from"] = f"epoch {p.get('epoch')}, step {p.get('step')} on {p.get('dataset')}, seed {p.get('seed')}"
        for key, value in rows.items():
            grid.add_row(f"[bold]{key}[/bold]", value)
        console.print(Panel(grid, title=f"simclr probe {__version__}", expand=False), highlight=False)
        for message in [*e["notes"], *d["notes"]]:
            note(message)
        self.progress.start()

    def on_extract(self, d: dict) -> None:
        key = (d["model"], d["split"])
        if key not in self.tasks:
            self.tasks[key] = (self.progress.add_task(f"{d['model']} {d['split']}", total=d["total"], rate="-"),
                               time.perf_counter())
        task, t0 = self.tasks[key]
        self.progress.update(task, completed=d["done"], rate=f"{d['done'] / max(time.perf_counter() - t0, 1e-9):.0f}")

    def on_stage(self, d: dict) -> None:
        self.progress.console.print(f"{d['model']}: {d['message']}...", highlight=False)

    def stop(self) -> None:
        self.progress.stop()


def probe_table(report: dict) -> Table:
    columns = table_columns()
    table = Table(title=f"{report['dataset']['name']} test split ({report['dataset']['test_size']} images)")
    for i, header in enumerate(["encoder", *(c.header for c in columns), "extract img/s"]):
        table.add_column(header, justify="left" if i == 0 else "right")
    for name, r in report["results"].items():
        table.add_row(name.replace("_", " "), *(c.cell(r) for c in columns), f"{r['images_per_s']:.0f}")
    return table


def pretrain_summary(summary: dict) -> None:
    final = f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "-"
    knn = (f", kNN top-1 {100 * summary['knn_top1']:.2f}% ({summary.get('knn_split', 'test')})"
           if summary.get("knn_top1") is not None else "")
    console.print(f"done: {summary['epochs']} epochs, final loss {final}{knn}; "
                  f"encoder {escape(summary['encoder'])}, checkpoint {escape(summary['checkpoint'])}", highlight=False)


def pretrain_stopped(stop, resume_hint: str) -> None:
    """The line after a graceful stop: where the state is and how to go on."""
    if stop.saved:
        what = f"at step {stop.step}; checkpoint written to {stop.checkpoint}. Resume with: {resume_hint}"
    elif stop.checkpoint:
        what = f"at step {stop.step}; {stop.checkpoint} is unchanged. Resume with: {resume_hint}"
    else:
        what = "before the first checkpoint; nothing to resume (run the same command to start again)"
    console.print(f"[yellow]stopped by {stop.signal_name}[/yellow] {escape(what)}", highlight=False, soft_wrap=True)


def pretrain_stopped_at_once(signal_name: str, output_dir: str, resume_hint: str) -> None:
    console.print(f"[yellow]stopped at once by {signal_name}[/yellow]; the last checkpoint in {escape(output_dir)} "
                  f"(if any) is intact. Resume with: {escape(resume_hint)}", highlight=False, soft_wrap=True)


def extracted(info: dict) -> None:
    p = info["provenance"]
    model = f"{info['arch']}, {info['stem']} stem" + (f", width {info['width']}" if "width" in info else "")
    gives = f"{len(info['classes'])} classes" if info.get("classes") else f"h of {info['feature_dim']}"
    line(f"wrote {info['path']} ({info['format']}): {model}, {gives}, "
         f"{info['image_size']}px; from epoch {p.get('epoch')} step {p.get('step')} on {p.get('dataset')} "
         f"(config {p.get('config_digest')}); {info['bytes'] / 2**20:.1f} MiB")
    if "parity" in info:
        line(f"checked against the PyTorch encoder: largest |difference| {info['parity']:.2g}"
             + (f"; dynamic axes: {', '.join(info['dynamic'])}" if "dynamic" in info else ""))
    if info["load"]:
        line(f"load it with: {info['load']}")


class EmbedDisplay:
    """A line saying what is embedded, a transient progress bar (on a terminal only: in a log it would
    leave blank lines), a line per bad image, and the closing line."""

    def __init__(self, label: str = "embed") -> None:  # `simclr predict` shows its files the same way
        self.progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
                                 disable=not console.is_terminal)
        self.task = self.progress.add_task(label, total=None)

    def on_start(self, d: dict) -> None:
        line(f"embedding {d['images']} images at {d['image_size']} px into h of {d['dim']} ({d['kind']}; "
             f"{d['device']}, {d['precision']})")
        for message in d["notes"]:
            note(message)

    def __call__(self, event: str, d: dict) -> None:
        if event == "start":
            self.on_start(d)
            self.progress.update(self.task, total=d["images"])
            self.progress.start()
        elif event == "bad":
            self.progress.console.print(f"[yellow]bad image:[/yellow] {escape(str(d['path']))} "
                                        f"({escape(d['reason'])})", highlight=False, soft_wrap=True)
        elif event == "progress":
            self.progress.update(self.task, completed=d["done"])

    def stop(self) -> None:
        if not self.progress.disable:  # rich before 14.3 printed an empty line stopping a disabled bar
            self.progress.stop()

    @staticmethod
    def done(result) -> None:
        skipped = f"; left out {len(result.failures)} bad images" if result.failures else ""
        line(f"embedded {result.rows} images -> {result.output}: ({result.rows}, {result.dim}) float32, "
             f"{result.images_per_s:.0f} images/s{skipped}")


def probe_done(report: dict, json_path) -> None:
    console.print(probe_table(report))
    t = report["timing"]
    console.print(f"done in {t['total_s']:.1f} s (loading {t['load_s']:.1f} s)"
                  + (f"; report {escape(str(json_path))}" if json_path is not None else ""), highlight=False)


class StagedDisplay:
    """`simclr report` and `simclr neighbors`: a line at start, one progress bar per image pass (images/s
    and ETA; on a terminal only), a line per stage and per bad image."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]} images/s"), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
                                 disable=not console.is_terminal)
        self.tasks: dict[str, int] = {}
        self.started: dict[str, float] = {}

    def __call__(self, event: str, d: dict) -> None:
        if event == "start":
            where = d.get("index") or d.get("output")
            line(f"{self.command}: {where} ({d['device']}, {d['precision']})")
            for message in d.get("notes", []):
                note(message)
            self.progress.start()
        elif event in ("extract", "progress"):
            name = d.get("split") or d.get("stage", "")
            if name not in self.tasks:
                self.tasks[name] = self.progress.add_task(f"embed {name}", total=d.get("total"), rate="-")
                self.started[name] = time.perf_counter()
            seconds = time.perf_counter() - self.started[name]
            self.progress.update(self.tasks[name], completed=d["done"], total=d.get("total"),
                                 rate=f"{d['done'] / seconds:.0f}" if seconds > 0 else "-")
        elif event == "bad":
            self.progress.console.print(f"[yellow]bad image:[/yellow] {escape(str(d['path']))} "
                                        f"({escape(d['reason'])})", highlight=False, soft_wrap=True)
        elif event == "stage":
            self.progress.console.print(f"{self.command}: {d.get('message') or d.get('stage')}", highlight=False,
                                        markup=False)

    def stop(self) -> None:
        self.progress.stop()


def report_done(report) -> None:
    for message in report.notes:
        note(message)
    for name, _ in report.figures:
        line(f"  {report.folder / name}")
    line(f"report: {report.folder / 'index.html'} (open it in a browser; it needs no network)")
