"""Run logging: console and file set-up per rank, a per-epoch metrics CSV, training curves and optional wandb.

Rank 0 alone writes files; other ranks only print warnings and errors, tagged with their rank, so a
multi-GPU run's console stays readable. Console lines go through ``tqdm.write`` so that they appear above a
progress bar instead of breaking it.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOG_FORMAT = "[%(asctime)s] %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# Third-party loggers that flood DEBUG output with lines no one asked for (font search, PNG chunks).
_NOISY_LOGGERS = ("matplotlib", "PIL", "urllib3", "filelock", "fsspec", "h5py")


class TqdmHandler(logging.Handler):
    """Console handler that prints through ``tqdm.write``, which clears and redraws any active progress bar.

    The stream is looked up when a record is emitted (``sys.stderr`` unless one is given), so redirected or
    captured streams are honoured.
    """

    def __init__(self, stream=None, level: int = logging.NOTSET):
        super().__init__(level)
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self._stream if self._stream is not None else sys.stderr)
        except Exception:  # logging must never crash the run; report the way logging.Handler does
            self.handleError(record)


def setup_logging(output_dir: str | os.PathLike | None, rank: int = 0, level: int = logging.INFO,
                  filename: str = "log.txt") -> None:
    """Configure the root logger for one process of a run.

    Rank 0: ``level`` and above to the console, and to ``output_dir/filename`` (appended, so a resumed run
    continues its log) when ``output_dir`` is given. Other ranks: WARNING and above to the console only,
    each line prefixed ``[rank N]``. Idempotent: a second call replaces the handlers of the first instead of
    adding duplicates (so it can also switch to a new output folder). Python warnings are logged too.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_t2l_handler", False)]:
        root.removeHandler(handler)
        handler.close()

    if rank == 0:
        console_level = level
        fmt = LOG_FORMAT
    else:
        console_level = max(level, logging.WARNING)
        fmt = f"[rank {rank}] {LOG_FORMAT}"
    formatter = logging.Formatter(fmt, datefmt=DATE_FORMAT)

    console = TqdmHandler(level=console_level)
    console.setFormatter(formatter)
    console._t2l_handler = True
    root.addHandler(console)

    if rank == 0 and output_dir is not None:
        log_path = Path(output_dir) / filename
        log_path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
        file_handler.setLevel(level)
        file_handler.setFormatter(formatter)
        file_handler._t2l_handler = True
        root.addHandler(file_handler)

    root.setLevel(console_level)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, console_level))
    logging.captureWarnings(True)


def _parse_cell(text: str) -> Any:
    """CSV cell -> int, float or str; an empty cell (a column added after that epoch) -> None."""
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back as the same float
    if hasattr(value, "item") and callable(value.item):  # a 0-d tensor or numpy scalar
        return _format_cell(value.item())
    return str(value)


def read_metrics_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics CSV as dicts of parsed values (missing cells are None). An empty file has no rows."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"metrics file not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return []
        if "epoch" not in header:
            raise ValueError(f"{path}: line 1: expected a header with an 'epoch' column, got {header}")
        rows = []
        for line_no, cells in enumerate(reader, start=2):
            if not cells:
                continue
            if len(cells) != len(header):
                raise ValueError(f"{path}: line {line_no}: expected {len(header)} cells ({','.join(header)}), "
                                 f"got {len(cells)}")
            row = {name: _parse_cell(cell) for name, cell in zip(header, cells)}
            if not isinstance(row["epoch"], int):
                raise ValueError(f"{path}: line {line_no}: epoch must be an integer, "
                                 f"got {cells[header.index('epoch')]!r}")
            rows.append(row)
    return rows


class MetricsCSV:
    """Per-epoch metrics table (``metrics.csv``), one row per epoch, rewritten whole on every ``log``.

    Each write goes to a temporary file in the same folder that is then renamed over the CSV, so a crash
    leaves the previous complete table. Columns appear in the order keys are first seen (``epoch`` first); a
    key that appears later gets an empty cell in earlier rows. Logging an epoch already in the table merges
    the new keys into that row (so training and evaluation metrics of one epoch can be logged separately).

    ``start_epoch``: on construction an existing file is read and rows with ``epoch >= start_epoch`` are
    dropped, since those epochs will be run again: pass the first epoch this run will train (the resumed
    epoch); 0 for a fresh run, which starts the table over.
    """

    def __init__(self, path: str | os.PathLike, start_epoch: int = 0):
        self.path = Path(path)
        self._rows: list[dict] = []
        self._columns: list[str] = ["epoch"]
        if self.path.exists():
            old = read_metrics_csv(self.path)
            # Empty cells are left out of the kept rows, so a column only the dropped epochs had disappears.
            kept = [{k: v for k, v in row.items() if v is not None} for row in old if row["epoch"] < start_epoch]
            for row in kept:
                self._add_columns(row)
            self._rows = kept
            if len(kept) != len(old):
                logger.info("%s: dropped %d row(s) of epoch >= %d, which this run will redo",
                            self.path, len(old) - len(kept), start_epoch)
                self._write()

    @property
    def rows(self) -> list[dict]:
        """A copy of the rows logged so far (including those kept from a resumed file)."""
        return [dict(row) for row in self._rows]

    @property
    def columns(self) -> list[str]:
        """Column names in file order."""
        return list(self._columns)

    def _add_columns(self, row: dict) -> None:
        for key in row:
            if key not in self._columns:
                self._columns.append(key)

    def log(self, row: dict) -> None:
        """Add (or merge into) the row of ``row['epoch']`` and rewrite the file."""
        if "epoch" not in row:
            raise KeyError(f"a metrics row needs an 'epoch' key, got {sorted(row)} (writing {self.path})")
        row = {str(k): (v.item() if hasattr(v, "item") and callable(v.item) else v) for k, v in row.items()}
        if isinstance(row["epoch"], bool) or not isinstance(row["epoch"], int):
            raise TypeError(f"'epoch' must be an int, got {row['epoch']!r} (writing {self.path})")
        self._add_columns(row)
        for existing in self._rows:
            if existing["epoch"] == row["epoch"]:
                existing.update(row)
                break
        else:
            self._rows.append(dict(row))
            self._rows.sort(key=lambda r: r["epoch"])
        self._write()

    def _write(self) -> None:
        from utils.io import atomic_write_text

        buf = io.StringIO(newline="")
        if self._rows:
            writer = csv.writer(buf)
            writer.writerow(self._columns)
            for row in self._rows:
                writer.writerow([_format_cell(row.get(c)) for c in self._columns])
        atomic_write_text(self.path, buf.getvalue(), what="metrics file")


def plot_curves(csv_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Plot the training curves of a metrics CSV into a PNG: losses on the left, ``*top1`` columns on the right.

    Loss panel: the ``loss`` column and any column whose name ends in ``loss``; accuracy panel: columns whose
    name ends in ``top1``. Empty cells (an epoch without evaluation) are skipped. Nothing is drawn, with a
    debug message, when the CSV has no rows or none of those columns.
    """
    rows = read_metrics_csv(csv_path)
    if len(rows) < 1:
        logger.debug("no rows in %s yet: no curves drawn", csv_path)
        return
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    loss_cols = [c for c in columns if c.endswith("loss")]
    top1_cols = [c for c in columns if c.endswith("top1")]
    panels = [(cols, ylabel) for cols, ylabel in ((loss_cols, "loss"), (top1_cols, "top-1 (%)")) if cols]
    if not panels:
        logger.debug("%s has no loss or *top1 columns (%s): no curves drawn", csv_path, columns)
        return

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(panels), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    for i, (cols, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for col in cols:
            points = [(r["epoch"], r.get(col)) for r in rows]
            points = [(e, float(v)) for e, v in points
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=col)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    from utils.io import atomic_write

    atomic_write(png_path, lambda f: fig.savefig(f, format="png"), what="training curves")


class WandbLogger:
    """Optional Weights & Biases logging; build it only when the config enables wandb, and only on rank 0.

    ``mode`` is passed to ``wandb.init``: "online", "offline" (writes under ``dir`` for a later ``wandb sync``)
    or "disabled". Extra keyword arguments go to ``wandb.init`` as well.
    """

    def __init__(self, project: str, name: str | None = None, config: dict | None = None, mode: str = "online",
                 dir: str | os.PathLike | None = None, **init_kwargs: Any):
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"wandb mode must be 'online', 'offline' or 'disabled', got {mode!r}")
        try:
            import wandb
        except ImportError as e:
            raise ImportError("wandb logging is enabled but wandb is not installed: pip install wandb "
                              "(or turn wandb off in the config)") from e
        self._wandb = wandb
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
            dir = str(dir)
        self.run = wandb.init(project=project, name=name, config=config, mode=mode, dir=dir, **init_kwargs)

    def log(self, data: dict, step: int | None = None) -> None:
        """Log a dict of scalars at ``step`` (wandb's own counter when None)."""
        self.run.log(dict(data), step=step)

    def finish(self) -> None:
        """Flush and close the run."""
        self.run.finish()
