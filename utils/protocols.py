"""Evaluation protocols: aggregates over splits, class subsets and base-to-novel summaries.

- Zero-shot (X-CLIP / ViFi-CLIP form): UCF-101 and HMDB-51 are scored on each of the three official test
  splits, K-600 on three subsets of 160 of its 220 new classes; the report is ``mean_std`` of the top-1s.
- Base-to-novel (ViFi-CLIP form): three training runs, each scored on base and novel classes; the report is
  ``base_novel_summary``: mean base, mean novel and the harmonic mean of those two means (ViFi-CLIP's
  published K-400 row, 76.4 / 61.1 / 67.9, is the HM of the means).
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def mean_std(values: Sequence[float], ddof: int = 1) -> dict:
    """Mean and standard deviation of per-split (or per-subset) results: ``dict(mean, std)``.

    The std is the *sample* standard deviation (``ddof=1``, divide by n-1) by default. Neither X-CLIP's nor
    ViFi-CLIP's released code computes the "mean ± std" of their papers: each split is a separate evaluation
    run (ViFi-CLIP ships one config per split, X-CLIP's ``validate`` returns one top-1), so the formula is not
    pinned by code. We use the sample std because the three splits are a sample of possible splits; note that
    ``numpy.std``'s default (``ddof=0``, the population std) is smaller by sqrt((n-1)/n), i.e. 0.816x for three
    splits. Pass ``ddof=0`` to get numpy's default. A single value has std 0.0.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value, got an empty list")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"mean_std got NaN among {values}")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1 or n - ddof <= 0:
        return dict(mean=mean, std=0.0)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - ddof)
    return dict(mean=mean, std=math.sqrt(var))


def harmonic_mean(base: float, novel: float) -> float:
    """Harmonic mean of base and novel accuracy, 2*B*N / (B+N); 0.0 when both are 0."""
    base, novel = float(base), float(novel)
    if base < 0 or novel < 0 or math.isnan(base) or math.isnan(novel):
        raise ValueError(f"base and novel accuracy must be non-negative numbers, got {base} and {novel}")
    if base + novel == 0:
        return 0.0
    return 2.0 * base * novel / (base + novel)


def _subset_key(seed: int, subset: int, attempt: int, class_id: int) -> bytes:
    return hashlib.sha256(f"t2l-class-subsets/{seed}/{subset}/{attempt}/{class_id}".encode("ascii")).digest()


def class_subsets(num_classes: int, size: int, num_subsets: int, seed: int) -> list[list[int]]:
    """``num_subsets`` different random subsets of ``size`` class ids out of 0..num_classes-1, each sorted.

    Method (hash-based, so it is the same on every machine and every Python/numpy/torch version): subset i
    orders the class ids by SHA-256 of the ASCII string ``"t2l-class-subsets/{seed}/{i}/{attempt}/{class_id}"``
    (digest compared as bytes) and keeps the first ``size``; ``attempt`` starts at 0 and is increased only if
    the subset equals an earlier one. ``numpy.random.Generator`` was not used because numpy promises the same
    stream only "on the same build of numpy ... on the same machine" (numpy's random compatibility policy,
    NEP 19), and a protocol's class subsets must not change with a library upgrade.

    Used for K-600 zero-shot: ``class_subsets(220, 160, 3, seed)`` picks 160 of the 220 new classes three times.
    """
    for name, value in (("num_classes", num_classes), ("size", size), ("num_subsets", num_subsets), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if num_classes < 1 or not 1 <= size <= num_classes:
        raise ValueError(f"need 1 <= size <= num_classes, got size={size}, num_classes={num_classes}")
    possible = math.comb(num_classes, size)
    if not 1 <= num_subsets <= possible:
        raise ValueError(f"cannot draw {num_subsets} different subsets of {size} out of {num_classes} classes "
                         f"(only {possible} exist)")
    subsets: list[list[int]] = []
    for i in range(num_subsets):
        attempt = 0
        while True:
            order = sorted(range(num_classes), key=lambda c: _subset_key(seed, i, attempt, c))
            subset = sorted(order[:size])
            if subset not in subsets:
                break
            attempt += 1  # a repeat is only likely when few subsets exist (e.g. 3 of 4 classes)
        subsets.append(subset)
    return subsets


def restrict_to_classes(scores: torch.Tensor, labels: torch.Tensor,
                        class_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate on a subset of classes: keep the videos of those classes and only their score columns.

    Args:
        scores: (N, K) class scores for all K classes.
        labels: (N,) class ids in 0..K-1.
        class_ids: the k classes to keep (distinct, in 0..K-1); their order defines the new ids 0..k-1.

    Returns:
        ``(scores (M, k), labels (M,))`` where M is the number of videos whose label is in ``class_ids``,
        column j of the new scores is column ``class_ids[j]`` of the old, and a video of class
        ``class_ids[j]`` gets label j. Videos keep their original order.
    """
    import torch  # here, not at the top: class_subsets and the aggregates must not need torch (or its import time)

    if scores.dim() != 2 or labels.dim() != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"need scores (N, K) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    k_all = scores.shape[1]
    ids = [int(c) for c in class_ids]
    if not ids:
        raise ValueError("class_ids is empty")
    if len(set(ids)) != len(ids):
        raise ValueError(f"class_ids has repeated ids: {sorted(c for c in set(ids) if ids.count(c) > 1)}")
    if min(ids) < 0 or max(ids) >= k_all:
        raise ValueError(f"class_ids must lie in 0..{k_all - 1}, got ids from {min(ids)} to {max(ids)}")
    # Lookup table old id -> new id (-1 for dropped classes), on the labels' device.
    new_id = torch.full((k_all,), -1, dtype=torch.long, device=labels.device)
    new_id[torch.tensor(ids, dtype=torch.long, device=labels.device)] = torch.arange(len(ids), device=labels.device)
    mapped = new_id[labels.long()]
    keep = mapped >= 0
    columns = torch.tensor(ids, dtype=torch.long, device=scores.device)
    return scores[keep.to(scores.device)][:, columns], mapped[keep]


def base_novel_summary(per_run: Sequence[dict]) -> dict:
    """Summarise base-to-novel runs: ``dict(base, novel, hm, runs)``.

    ``base`` and ``novel`` are the means over the runs, ``hm`` is the harmonic mean of those two means (the
    ViFi-CLIP reporting rule, not the mean of per-run HMs), and ``runs`` repeats each run's base and novel
    with its own ``hm``.
    """
    if not per_run:
        raise ValueError("base_novel_summary needs at least one run")
    runs = []
    for i, run in enumerate(per_run):
        if "base" not in run or "novel" not in run:
            raise ValueError(f"run {i} must have 'base' and 'novel' accuracies, got keys {sorted(run)}")
        base, novel = float(run["base"]), float(run["novel"])
        runs.append(dict(base=base, novel=novel, hm=harmonic_mean(base, novel)))
    base = math.fsum(r["base"] for r in runs) / len(runs)
    novel = math.fsum(r["novel"] for r in runs) / len(runs)
    return dict(base=base, novel=novel, hm=harmonic_mean(base, novel), runs=runs)
