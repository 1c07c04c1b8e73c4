"""Actions over time in a long video: every window scored as test.py scores a clip, merged into segments.

    from features import load_model, read_class_texts
    from timeline import score_timeline, find_segments, write_timeline
    m = load_model("demo_output/train/last.pt")
    classes = read_class_texts("demo_data/classes.csv", descriptions="demo_data/descriptions.csv")
    tl = score_timeline(m, "long.mp4", m.encode_class_texts(classes), classes.names, window="2s", stride="1s")
    segments = find_segments(tl, threshold=0.3, min_segment=2.0)
    write_timeline(tl, segments, "timeline_out")      # windows.csv, segments.csv, timeline.json, timeline.png, ...

Windows (``datasets.windows``): ``window`` frames every ``stride`` frames, plus one ending at the last frame; each
window gets the model's T frames sampled as at test time and the test views, and class probabilities by test.py's
rule (``engine.class_probabilities``: softmax(logit_scale * cosine) over the classes, averaged over text views and then
video views). The video is decoded once, front to back, and only the frames still to be sampled are held; windows
are scored in batches on the model's device while the next ones are decoded in a background thread.

Segments: every frame belongs to the window whose centre is nearest (the boundaries are the midpoints between
window centres), a window's label is its top class, or none (-1) when the top probability is below ``threshold``;
runs of windows with the same label are one segment. With ``min_segment`` (seconds, or frames without a frame rate),
a shorter segment is merged into the neighbour whose class its windows score higher, shortest first, so that a
label has to hold for a while to count.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

import engine
from datasets import TEST_RULES, SampleLoadError, build_transform
from datasets.windows import Window, WindowStream, parse_span, plan_windows, video_info

logger = logging.getLogger(__name__)

__all__ = ["Timeline", "Segment", "score_timeline", "find_segments", "frame_labels", "write_timeline",
           "plot_timeline"]

PathLike = Union[str, os.PathLike]
NO_LABEL = -1


@dataclass
class Timeline:
    """The scored windows of one video.

    ``probs[i, k]``: probability of class k in ``windows[i]``. ``num_frames``: frames the timeline covers (the
    video's, or fewer when decoding stopped early: then ``complete`` is False and ``error`` says why).
    """

    video: str
    fps: Optional[float]
    num_frames: int
    window_frames: int
    stride_frames: int
    windows: list
    probs: np.ndarray
    names: list
    complete: bool = True
    error: str = ""
    interrupted: bool = False
    seconds: float = 0.0
    max_cached_frames: int = 0
    info: dict = field(default_factory=dict)

    def time(self, frame: float) -> Optional[float]:
        """Seconds at a frame boundary (None without a frame rate)."""
        return round(frame / self.fps, 4) if self.fps else None

    @property
    def windows_per_second(self) -> Optional[float]:
        return len(self.windows) / self.seconds if self.seconds > 0 else None


@dataclass
class Segment:
    """Frames ``[start, end)`` labelled ``label`` (a class id, or -1: no class above the threshold)."""

    start: int
    end: int
    label: int
    first_window: int
    last_window: int
    score: float  # mean probability of ``label`` over the segment's windows (of the top class for -1)


# ---------------------------------------------------------------------------------------------- scoring
def _prefetch(items: Iterable, depth: int) -> Iterator:
    """Iterate ``items`` in a background thread, at most ``depth`` ahead; its exceptions are raised here."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer, which raises it in its own thread
            q.put(e)

    thread = threading.Thread(target=work, name="timeline-decoder", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def score_timeline(encoder, video: PathLike, text_emb: torch.Tensor, names: Sequence[str], window: str = "2s",
                   stride: Optional[str] = None, fps: Optional[float] = None, batch_size: int = 16,
                   progress: bool = False, on_batch: Optional[Callable[[int, "Timeline"], None]] = None) -> Timeline:
    """Score every window of a long video; returns a :class:`Timeline`.

    Args:
        encoder: a ``features.VideoTextEncoder`` (its frames per clip, views, size and device are used).
        video: a video file or a frames folder.
        text_emb: class text embeddings (V_text, K, E) from ``encoder.encode_class_texts``.
        window, stride: spans as ``parse_span`` reads them ("2s", "16f", "16"); stride defaults to half the window.
        fps: frames per second; defaults to the container's (a frames folder has none: give it for seconds).
        batch_size: windows per forward pass.
        on_batch: called as ``on_batch(windows_done, timeline_so_far)`` after every batch (progress, measurements).

    A video that breaks off while decoding gives a timeline of the windows read so far, ``complete=False`` and the
    reason in ``error``; a video that cannot be opened at all raises ``SampleLoadError``.
    """
    video = os.fspath(video)
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    total, container_fps = video_info(video, encoder.image_tmpl, encoder.index_start)
    fps = float(fps) if fps else container_fps
    w_frames = parse_span(window, fps, "--window")
    s_frames = parse_span(stride, fps, "--stride") if stride else max(1, w_frames // 2)
    if w_frames < encoder.num_frames:
        logger.warning("a window of %d frames is shorter than the %d frames the model samples: frames repeat",
                       w_frames, encoder.num_frames)
    windows = plan_windows(total, w_frames, s_frames)
    K = len(names)
    if text_emb.shape[1] != K:
        raise ValueError(f"{K} class names but text embeddings for {text_emb.shape[1]} classes")
    rules = TEST_RULES[encoder.test_rules]  # test.py's eval.rules: which frames, which resize
    transform = build_transform("test", encoder.input_size, num_crops=encoder.num_crops, resize=rules["resize"])
    stream = WindowStream(video, windows, encoder.num_frames, transform, num_clips=encoder.num_clips,
                          total_frames=total, image_tmpl=encoder.image_tmpl, index_start=encoder.index_start,
                          frame_rule=rules["frames"])
    probs = np.zeros((len(windows), K), dtype=np.float32)
    tl = Timeline(video=video, fps=fps, num_frames=total, window_frames=w_frames, stride_frames=s_frames,
                  windows=[], probs=probs, names=list(names))
    logger.info("%s: %d frames%s, %d windows of %d frames every %d", video, total,
                f" at {fps:g} fps" if fps else "", len(windows), w_frames, s_frames)
    scale = encoder.logit_scale
    done, batch, start = 0, [], time.perf_counter()
    bar = tqdm(total=len(windows), desc="windows", unit="window", disable=not progress, dynamic_ncols=True)

    def flush():
        nonlocal done
        clips = torch.stack([v for _, v in batch])  # (B, V, T, 3, S, S)
        B, V = clips.shape[:2]
        view_emb, _ = encoder.encode_views(clips)  # (B*V, E)
        # test.py's rule: probabilities per video view (averaged over text views inside), then over video views
        p = engine.class_probabilities(view_emb, text_emb, scale, V)  # (B*V, E) -> (B, K)
        for (w, _), row in zip(batch, p.numpy()):
            probs[w.index] = row
            tl.windows.append(w)
        done += B
        batch.clear()
        bar.update(B)
        if on_batch is not None:
            on_batch(done, tl)

    try:
        for item in _prefetch(stream, depth=2 * batch_size):
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    except SampleLoadError as e:
        if batch:
            flush()
        if not tl.windows:
            raise
        tl.complete, tl.error = False, e.reason or str(e)
        logger.error("%s; the timeline covers the %d windows read before (up to frame %d)", e, len(tl.windows),
                     tl.windows[-1].end)
    except KeyboardInterrupt:  # Ctrl-C: keep what was decoded and scored, so that the caller can write it
        tl.complete, tl.error, tl.interrupted = False, "interrupted", True
        if batch:
            try:
                flush()
            except KeyboardInterrupt:  # a second Ctrl-C: stop now, with the batches done before
                pass
        logger.error("interrupted after %d of %d windows", len(tl.windows), len(windows))
    finally:
        bar.close()
    tl.num_frames = stream.length or total  # fewer than the header said when the stream ended or broke off early
    if tl.interrupted:
        tl.num_frames = tl.windows[-1].end if tl.windows else 0  # the timeline covers what was scored
    tl.probs = probs[:len(tl.windows)]
    tl.seconds = time.perf_counter() - start
    tl.max_cached_frames = stream.max_cached
    return tl


# ---------------------------------------------------------------------------------------------- segments
def _boundaries(windows: Sequence[Window], num_frames: int) -> np.ndarray:
    """Frame boundaries (len(windows) + 1,): window i owns the frames nearer its centre than any other window's."""
    centres = np.array([w.centre for w in windows], dtype=np.float64)
    mid = np.floor((centres[:-1] + centres[1:]) / 2).astype(np.int64)
    return np.concatenate([[0], np.clip(mid, 0, num_frames), [num_frames]])


def _runs(labels: np.ndarray) -> list:
    """[(first, last) window index] of runs of equal labels."""
    cuts = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(labels)]]) - 1
    return list(zip(starts.tolist(), ends.tolist()))


def find_segments(tl: Timeline, threshold: float = 0.0, min_segment: Optional[float] = None) -> list:
    """The segments of a timeline (see the module docstring).

    ``threshold``: a window whose top probability is below it has no label (-1). ``min_segment``: shortest segment
    kept, in seconds (frames when the timeline has no frame rate); shorter ones are merged into a neighbour.
    """
    if not tl.windows:
        return []
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
    probs = tl.probs
    labels = probs.argmax(axis=1)
    labels[probs.max(axis=1) < threshold] = NO_LABEL
    bounds = _boundaries(tl.windows, tl.num_frames)
    min_frames = 0
    if min_segment:
        min_frames = int(round(min_segment * tl.fps)) if tl.fps else int(min_segment)

    def class_score(first: int, last: int, label: int) -> float:
        if label == NO_LABEL:
            return float(probs[first:last + 1].max(axis=1).mean())
        return float(probs[first:last + 1, label].mean())

    while min_frames > 0:
        runs = _runs(labels)
        if len(runs) < 2:
            break
        lengths = [bounds[b + 1] - bounds[a] for a, b in runs]
        i = int(np.argmin(lengths))  # the shortest, the earliest on ties
        if lengths[i] >= min_frames:
            break
        a, b = runs[i]
        options = [runs[j] for j in (i - 1, i + 1) if 0 <= j < len(runs)]
        # the neighbour whose class this segment's windows score higher; "no label" only when nothing else is near
        best = max(options, key=lambda r: (labels[r[0]] != NO_LABEL,
                                           class_score(a, b, labels[r[0]]) if labels[r[0]] != NO_LABEL else 0.0))
        labels[a:b + 1] = labels[best[0]]
    return [Segment(start=int(bounds[a]), end=int(bounds[b + 1]), label=int(labels[a]), first_window=a,
                    last_window=b, score=class_score(a, b, int(labels[a]))) for a, b in _runs(labels)]


def frame_labels(segments: Sequence[Segment], num_frames: int) -> np.ndarray:
    """The label of every frame (int64, -1 where no class), from the segments."""
    out = np.full(num_frames, NO_LABEL, dtype=np.int64)
    for s in segments:
        out[s.start:s.end] = s.label
    return out


# ---------------------------------------------------------------------------------------------- writing
def _atomic_text(path: Path, text: str) -> None:
    from utils.io import atomic_write_text

    atomic_write_text(path, text, what="timeline file")


def _class_name(tl: Timeline, label: int) -> Optional[str]:
    return tl.names[label] if label != NO_LABEL else None


def window_rows(tl: Timeline, top_k: int = 5) -> list:
    """One dict per window: frames, seconds and the top-k classes with probabilities."""
    k = min(top_k, len(tl.names))
    rows = []
    for w, p in zip(tl.windows, tl.probs):
        order = np.argsort(-p, kind="stable")[:k]
        rows.append({"window": w.index, "start_frame": w.start, "end_frame": w.end, "start_s": tl.time(w.start),
                     "end_s": tl.time(w.end),
                     "top": [{"rank": r + 1, "class_id": int(c), "class": tl.names[int(c)], "probability": float(p[c])}
                             for r, c in enumerate(order)]})
    return rows


def segment_rows(tl: Timeline, segments: Sequence[Segment]) -> list:
    return [{"segment": i, "start_frame": s.start, "end_frame": s.end, "start_s": tl.time(s.start),
             "end_s": tl.time(s.end), "class_id": s.label if s.label != NO_LABEL else None,
             "class": _class_name(tl, s.label), "mean_probability": round(s.score, 6),
             "first_window": s.first_window, "last_window": s.last_window} for i, s in enumerate(segments)]


def _csv(rows: list, header: list) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_timeline(tl: Timeline, segments: Sequence[Segment], out: PathLike, top_k: int = 5,
                   extra: Optional[dict] = None, plot: bool = True) -> dict:
    """Write the timeline into folder ``out``; returns ``{what: path}``.

    ``windows.csv`` (per window: frames, seconds, top-k classes and probabilities), ``segments.csv``,
    ``timeline.json`` (everything, with ``extra`` settings), ``probabilities.npy`` (float32 (windows, K), rows in
    window order) and ``timeline.png`` (class probabilities over time above the segments). Every file is written
    atomically.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wins, segs = window_rows(tl, top_k), segment_rows(tl, segments)
    k = min(top_k, len(tl.names))
    header = ["window", "start_frame", "end_frame", "start_s", "end_s"]
    header += [f"{f}_{r}" for r in range(1, k + 1) for f in ("class", "class_id", "probability")]
    rows = [[w["window"], w["start_frame"], w["end_frame"], w["start_s"], w["end_s"],
             *[v for t in w["top"] for v in (t["class"], t["class_id"], f"{t['probability']:.6f}")]] for w in wins]
    paths = {"windows_csv": out / "windows.csv", "segments_csv": out / "segments.csv", "json": out / "timeline.json",
             "probabilities": out / "probabilities.npy"}
    _atomic_text(paths["windows_csv"], _csv(rows, header))
    seg_header = ["segment", "start_frame", "end_frame", "start_s", "end_s", "class_id", "class", "mean_probability"]
    _atomic_text(paths["segments_csv"], _csv([[s[h] for h in seg_header] for s in segs], seg_header))
    from utils.io import atomic_write

    atomic_write(paths["probabilities"], lambda f: np.save(f, tl.probs.astype(np.float32)))
    doc = {"video": tl.video, **(extra or {}), "fps": tl.fps, "num_frames": tl.num_frames,
           "duration_s": tl.time(tl.num_frames),
           "window": {"frames": tl.window_frames, "seconds": tl.time(tl.window_frames)},
           "stride": {"frames": tl.stride_frames, "seconds": tl.time(tl.stride_frames)},
           "complete": tl.complete, "error": tl.error or None, "classes": list(tl.names),
           "num_windows": len(tl.windows), "seconds": round(tl.seconds, 3),
           "windows_per_second": round(tl.windows_per_second, 3) if tl.windows_per_second else None,
           "segments": segs, "windows": wins}
    _atomic_text(paths["json"], json.dumps(doc, indent=1) + "\n")
    if plot and tl.windows:
        paths["png"] = out / "timeline.png"
        plot_timeline(tl, segments, paths["png"])
    return {k: str(v) for k, v in paths.items()}


def plot_timeline(tl: Timeline, segments: Sequence[Segment], path: PathLike, max_classes: int = 16) -> None:
    """A strip plot: probabilities of the leading classes over time (one row each) above the segments.

    With many classes only those that reach the highest probabilities are drawn (at most ``max_classes``: every
    class that is some window's top class first).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches  # noqa: F401  (the legend's patches)
    import matplotlib.pyplot as plt

    K = len(tl.names)
    peak = tl.probs.max(axis=0)
    tops = set(tl.probs.argmax(axis=1).tolist())
    shown = sorted(sorted(range(K), key=lambda c: (c not in tops, -peak[c]))[:max_classes])
    scale, unit = (1.0 / tl.fps, "s") if tl.fps else (1.0, "frame")
    x_end = tl.num_frames * scale
    cmap = plt.get_cmap("tab20")
    fig, (ax, strip) = plt.subplots(2, 1, figsize=(12, 2.2 + 0.3 * len(shown)), sharex=True,
                                    gridspec_kw={"height_ratios": [max(1, len(shown)), 1.2]})
    bounds = _boundaries(tl.windows, tl.num_frames) * scale  # each window drawn over the frames it owns
    img = ax.pcolormesh(bounds, np.arange(len(shown) + 1), tl.probs[:, shown].T, cmap="viridis", vmin=0, vmax=1,
                        shading="flat")
    ax.set_yticks(np.arange(len(shown)) + 0.5, [tl.names[c] for c in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(f"{Path(tl.video).name}: class probabilities per window "
                 f"({len(tl.windows)} windows, {len(shown)} of {K} classes shown)", fontsize=9)
    fig.colorbar(img, ax=[ax, strip], fraction=0.02, pad=0.01, label="probability")
    for s in segments:
        colour = (0.85, 0.85, 0.85) if s.label == NO_LABEL else cmap(s.label % 20)
        width = (s.end - s.start) * scale
        strip.barh(0, width, left=s.start * scale, color=colour, edgecolor="white", linewidth=0.5, height=1)
        if width > x_end / 12:  # room for the name; narrower segments are read off the legend's colours
            strip.text(s.start * scale + width / 2, 0, "-" if s.label == NO_LABEL else tl.names[s.label],
                       ha="center", va="center", fontsize=7, clip_on=True)
    labels = sorted({s.label for s in segments})
    handles = [matplotlib.patches.Patch(color=(0.85, 0.85, 0.85) if c == NO_LABEL else cmap(c % 20),
                                        label="no class" if c == NO_LABEL else tl.names[c]) for c in labels[:24]]
    strip.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.9), ncol=min(6, len(handles)),
                 fontsize=7, frameon=False)
    strip.set_yticks([0], ["segments"], fontsize=8)
    strip.set_xlim(0, x_end)
    strip.set_xlabel(f"time ({unit})")
    from utils.io import atomic_write

    try:  # atomically, like every result file: a full disk leaves no partial PNG, and the error names it
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"), what="timeline plot")
    finally:
        plt.close(fig)


def segments_table(tl: Timeline, segments: Sequence[Segment]) -> str:
    """The human-readable segment list."""
    rows = segment_rows(tl, segments)
    width = max([len("class")] + [len(r["class"] or "-") for r in rows])
    fmt = (lambda v: f"{v:9.2f}") if tl.fps else (lambda v: f"{v:9d}")
    unit = "s" if tl.fps else "frame"
    lines = [f"{'start':>9}  {'end':>9}  {'class':<{width}}  mean p   ({unit})"]
    for r in rows:
        a, b = (r["start_s"], r["end_s"]) if tl.fps else (r["start_frame"], r["end_frame"])
        lines.append(f"{fmt(a)}  {fmt(b)}  {r['class'] or '-':<{width}}  {r['mean_probability']:.3f}")
    return "\n".join(lines)
