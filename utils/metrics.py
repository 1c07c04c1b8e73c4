"""Classification metrics for video recognition: top-1, top-5, mean per-class accuracy, per-class tables and
confusion matrices.

Every function takes the full score matrix of an evaluation, ``scores`` (N videos, K classes; any monotonic
score: logits, cosine similarities or probabilities) and ``labels`` (N,) with class ids in 0..K-1.

Ties are broken towards the lower class id, on every device: a video's rank of its true class is the number
of classes that score strictly higher plus the number of lower-id classes that score exactly the same. This
is what ``argmax`` returns for the top-1 prediction (the first maximum), and it is deterministic, unlike
``torch.topk``, whose order among equal values is not specified. All accuracies are percentages.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
from pathlib import Path
from typing import Sequence

import torch

from utils.io import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

# Above this many classes a confusion matrix gets no tick labels: they would overlap into a black band.
MAX_TICK_LABELS = 60


def _check_inputs(scores: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D tensor (N videos, K classes), got "
                         f"{getattr(scores, 'shape', type(scores).__name__)}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor (N,), got {getattr(labels, 'shape', type(labels).__name__)}")
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} rows (videos) but labels has {labels.shape[0]} entries")
    if scores.shape[0] == 0:
        raise ValueError("no videos to score: scores and labels are empty (an empty test list?)")
    if scores.shape[1] == 0:
        raise ValueError("scores has 0 columns: no classes")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= scores.shape[1]:
        raise ValueError(f"labels must lie in 0..{scores.shape[1] - 1} (K={scores.shape[1]} score columns), "
                         f"got labels from {low} to {high}")
    if scores.dtype.is_floating_point and bool(torch.isnan(scores).any()):
        bad = int(torch.isnan(scores).any(dim=1).nonzero()[0])
        raise ValueError(f"scores contain NaN (first in video row {bad}): the model or its inputs diverged")


def true_class_rank(scores: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """0-based rank of each video's true class among the K scores, ties broken towards the lower class id.

    A video is correct at top-k when its rank is < k. Works in row chunks so that an (N, K) boolean matrix
    for a large test set (e.g. 20,000 x 400) is never held at once. Returns a LongTensor (N,) on the CPU.
    """
    _check_inputs(scores, labels)
    labels = labels.to(scores.device).long()
    class_ids = torch.arange(scores.shape[1], device=scores.device)
    ranks = []
    for start in range(0, scores.shape[0], chunk):
        s = scores[start:start + chunk]
        y = labels[start:start + chunk]
        true_score = s.gather(1, y[:, None])  # (n, 1)
        higher = (s > true_score).sum(dim=1)
        tied_before = ((s == true_score) & (class_ids[None, :] < y[:, None])).sum(dim=1)
        ranks.append((higher + tied_before).cpu())
    return torch.cat(ranks)


def predictions(scores: torch.Tensor) -> torch.Tensor:
    """Top-1 predicted class per video (the lowest class id among equal maxima), LongTensor (N,) on the CPU."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be a 2-D tensor (N, K) with K >= 1, got {getattr(scores, 'shape', scores)}")
    # torch.argmax documents that it returns the first maximal index, which matches true_class_rank's ties.
    return scores.argmax(dim=1).cpu()


def accuracy_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1, top-5 and mean per-class accuracy (percent) of one evaluation.

    Args:
        scores: (N, K) class scores per video.
        labels: (N,) true class ids in 0..K-1.

    Returns:
        ``dict(top1, top5, mean_class_acc, num_videos, num_classes)``. ``top5`` is top-min(5, K).
        ``mean_class_acc`` averages the top-1 recall of the classes that have at least one video in
        ``labels`` (a class absent from the test set has no recall, and counting it as 0 would punish the
        model for the test list).
    """
    rank = true_class_rank(scores, labels)
    labels = labels.cpu().long()
    num_classes = scores.shape[1]
    top1_hit = (rank < 1).double()
    top5_hit = (rank < min(5, num_classes)).double()
    per_class_videos = torch.bincount(labels, minlength=num_classes).double()
    per_class_hits = torch.bincount(labels, weights=top1_hit, minlength=num_classes)
    present = per_class_videos > 0
    recall = per_class_hits[present] / per_class_videos[present]
    return dict(
        top1=100.0 * float(top1_hit.mean()),
        top5=100.0 * float(top5_hit.mean()),
        mean_class_acc=100.0 * float(recall.mean()),
        num_videos=int(labels.shape[0]),
        num_classes=int(num_classes),
    )


def per_class_accuracy(scores: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> list[dict]:
    """Top-1 accuracy of each class: ``[dict(id, name, num_videos, top1), ...]`` in class-id order.

    A class with no videos in ``labels`` gets ``num_videos=0`` and ``top1=None`` (not 0: it was not tested).
    ``class_names`` must have one name per score column.
    """
    _check_inputs(scores, labels)
    if len(class_names) != scores.shape[1]:
        raise ValueError(f"got {len(class_names)} class names for {scores.shape[1]} score columns")
    hit = (predictions(scores) == labels.cpu().long()).double()
    counts = torch.bincount(labels.cpu().long(), minlength=scores.shape[1])
    hits = torch.bincount(labels.cpu().long(), weights=hit, minlength=scores.shape[1])
    rows = []
    for class_id, name in enumerate(class_names):
        n = int(counts[class_id])
        rows.append(dict(id=class_id, name=str(name), num_videos=n,
                         top1=100.0 * float(hits[class_id]) / n if n else None))
    return rows


def write_per_class_csv(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Write ``per_class_accuracy`` rows as CSV with header ``id,name,num_videos,top1``.

    ``top1`` is written with 4 decimals; a class without videos gets an empty cell. The file is written atomically
    (``utils.io.atomic_write``), so a reader never sees half a table, and an I/O error names the file.
    """
    path = Path(path)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["id", "name", "num_videos", "top1"])
    for i, row in enumerate(rows):
        missing = {"id", "name", "num_videos", "top1"} - set(row)
        if missing:
            raise ValueError(f"per-class row {i} lacks {sorted(missing)} (writing {path})")
        top1 = "" if row["top1"] is None else f"{row['top1']:.4f}"
        writer.writerow([row["id"], row["name"], row["num_videos"], top1])
    atomic_write_text(path, buf.getvalue(), what="per-class table")


def confusion_matrix(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts of (true class, top-1 predicted class): LongTensor (K, K), rows = true, columns = predicted."""
    _check_inputs(scores, labels)
    if scores.shape[1] != num_classes:
        raise ValueError(f"scores has {scores.shape[1]} class columns but num_classes={num_classes}")
    flat = labels.cpu().long() * num_classes + predictions(scores)  # (N,) index into the flattened (K, K)
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def save_confusion_png(matrix: torch.Tensor, class_names: Sequence[str], path: str | os.PathLike,
                       title: str = "") -> None:
    """Draw a row-normalised confusion matrix (each true class's row sums to 1; empty rows stay 0) as a PNG.

    Class names label the axes up to ``MAX_TICK_LABELS`` classes; beyond that (K-400, SSv2) the axes carry
    only class-id ticks, since hundreds of names would overlap. Uses matplotlib's Agg canvas directly, so it
    neither needs a display nor changes the global matplotlib backend.
    """
    # Imported here: matplotlib is only needed when a figure is drawn, and importing it costs ~0.5 s.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = torch.as_tensor(matrix)
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square (K, K), got shape {tuple(matrix.shape)}")
    k = matrix.shape[0]
    if len(class_names) != k:
        raise ValueError(f"got {len(class_names)} class names for a {k}x{k} confusion matrix")
    counts = matrix.double()
    row_sums = counts.sum(dim=1, keepdim=True)
    normalised = torch.where(row_sums > 0, counts / row_sums.clamp(min=1), torch.zeros_like(counts))

    side = min(20.0, max(6.0, 0.18 * k + 3.0))  # inches: names stay legible up to 60 classes, capped for 400
    fig = Figure(figsize=(side, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(normalised.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    if k <= MAX_TICK_LABELS:
        font = 8 if k <= 30 else 5
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xticklabels([str(n) for n in class_names], rotation=90, fontsize=font)
        ax.set_yticklabels([str(n) for n in class_names], fontsize=font)
    else:
        step = max(1, int(math.ceil(k / 20)))
        ax.set_xticks(range(0, k, step))
        ax.set_yticks(range(0, k, step))
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"), what="confusion matrix")
    logger.debug("wrote confusion matrix (%d classes) to %s", k, path)
