"""Measurements of predict.py's timeline mode (not tests: run once, record the figures in docs/FEATURES.md).

    # frame accuracy on a long video made of demo validation clips of known classes, with the trained demo model
    python benchmarks/timeline.py accuracy --data demo_data --model demo_output/train/last.pt --work /tmp/tl
    # memory over a 30-minute 320x240 video (generated cheaply into --work, deleted afterwards) and windows/s
    python benchmarks/timeline.py memory --model demo_output/train/last.pt --classes demo_data/classes.csv \\
        --minutes 30 --work /tmp/tl
    # windows/s of a full-size model (T2L on a random ViT-B/16 CLIP, 224 px) over 2 minutes of video
    python benchmarks/timeline.py memory --random-size ViT-B/16 --classes demo_data/classes.csv --minutes 2 \\
        --work /tmp/tl

accuracy: the validation videos (unseen in training) are put end to end in a seeded random order, ``--clips-per-action``
clips of one class after another (an action lasts that many clips), and re-encoded as one video; the truth is the
class of every frame. The timeline's frame labels (segments, see timeline.py) are compared with it.

memory: the video is a few low-detail frames (a bright square moving over a dark background) repeated at 25 fps
with a fast codec, so it costs little to make. The resident set size (RSS, /proc/self/status) is read after every
batch of windows; the figures are the RSS and the peak RSS when the decoder passes 1, 10 and 30 minutes.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "Dataset_creation_scripts"))

from datasets import read_list_file  # noqa: E402
from datasets.readers import VideoFile  # noqa: E402
from features import load_model, read_class_texts  # noqa: E402
from benchmarks.report import emit  # noqa: E402
from timeline import find_segments, frame_labels, score_timeline, write_timeline  # noqa: E402

logger = logging.getLogger("benchmarks.timeline")


def rss_mb() -> tuple:
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", float("nan")), fields.get("VmHWM", float("nan"))


def make_concatenated(data: Path, out: Path, clips_per_action: int, seed: int) -> tuple:
    """The validation clips end to end -> (video path, per-frame truth, fps, [(class, start frame, end frame)])."""
    import make_synthetic_demo

    records = read_list_file(str(data / "val_videos.txt"), root=str(data / "videos"))
    by_class: dict = {}
    for r in records:
        by_class.setdefault(r.label, []).append(r.path)
    rng = np.random.default_rng(seed)
    for paths in by_class.values():
        rng.shuffle(paths)
    # Actions: groups of clips_per_action clips of one class, classes in a random order (each clip used once).
    groups = []
    for label, paths in by_class.items():
        groups += [(label, paths[i:i + clips_per_action]) for i in range(0, len(paths) - clips_per_action + 1,
                                                                         clips_per_action)]
    order = rng.permutation(len(groups))
    frames, truth, actions = [], [], []
    for g in order:
        label, paths = groups[g]
        start = len(truth)
        for p in paths:
            clip = VideoFile(p, backend="pyav").read(range(VideoFile(p, backend="pyav").num_frames))  # (T, 3, H, W)
            frames.append(clip.permute(0, 2, 3, 1).numpy())
            truth += [label] * clip.shape[0]
        actions.append((int(label), start, len(truth)))
    video = np.concatenate(frames)
    make_synthetic_demo.write_video(out, video, fps=make_synthetic_demo.FPS)
    return out, np.array(truth), float(make_synthetic_demo.FPS), actions


def accuracy(args) -> dict:
    data = Path(args.data)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    video, truth, fps, actions = make_concatenated(data, work / "concatenated.mp4", args.clips_per_action, args.seed)
    encoder = load_model(args.model, device="cpu", test_rules=args.rules)
    classes = read_class_texts(str(data / "classes.csv"), descriptions=str(data / "descriptions.csv"))
    text_emb = encoder.encode_class_texts(classes)
    results = []
    for window, stride, min_segment in args.settings:
        tl = score_timeline(encoder, video, text_emb, classes.names, window=window, stride=stride,
                            batch_size=args.batch_size)
        segs = find_segments(tl, threshold=0.0, min_segment=min_segment)
        labels = frame_labels(segs, tl.num_frames)
        n = min(len(labels), len(truth))
        acc = float((labels[:n] == truth[:n]).mean() * 100)
        # the windows alone: each window's top class against the majority truth of its frames
        win_acc = float(np.mean([tl.probs[i].argmax() == np.bincount(truth[w.start:w.end]).argmax()
                                 for i, w in enumerate(tl.windows)]) * 100)
        results.append({"window": window, "stride": stride, "min_segment_s": min_segment,
                        "frame_accuracy": round(acc, 2), "window_accuracy": round(win_acc, 2),
                        "windows": len(tl.windows), "segments": len(segs), "true_segments": len(actions),
                        "windows_per_second": round(tl.windows_per_second, 1)})
        logger.info("%s", results[-1])
        if args.keep_outputs:
            write_timeline(tl, segs, work / f"timeline_{window}_{stride}_{min_segment}")
    summary = {"video_frames": int(len(truth)), "fps": fps, "duration_s": len(truth) / fps,
               "actions": len(actions), "clips_per_action": args.clips_per_action, "model": args.model,
               "test_rules": args.rules,
               "threads": torch.get_num_threads(), "results": results}
    if not args.keep_outputs:
        os.unlink(video)
    return summary


def make_long_video(path: Path, minutes: float, fps: int = 25, width: int = 320, height: int = 240) -> int:
    """A cheap long video: 50 low-detail frames (a bright square moving over a dark background), repeated."""
    import av

    n = int(round(minutes * 60 * fps))
    period = 50
    with av.open(str(path), "w", format="mp4") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "30", "g": "250"}
        pattern = []
        for i in range(period):
            img = np.full((height, width, 3), 20, np.uint8)
            x = int((width - 40) * i / (period - 1))
            img[100:140, x:x + 40] = (230, 200, 60)
            pattern.append(av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p"))
        for k in range(n):
            frame = pattern[k % period]
            frame.pts = k
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return n


def random_checkpoint(size: str, work: Path) -> str:
    """A T2L checkpoint on a random CLIP of one of benchmarks/throughput.py's sizes (speed only: no trained weights)."""
    from benchmarks.throughput import SIZES
    from modules import build_t2l, make_checkpoint, random_clip
    from utils.checkpoint import atomic_save

    path = work / f"random_{size.replace('/', '-')}.pt"
    if not path.exists():
        model = build_t2l(random_clip(SIZES[size], seed=0), num_frames=8)
        atomic_save(make_checkpoint(model, backbone={"name_or_path": "random", "seed": 0,
                                                     "config": dict(SIZES[size])}), path)
    return str(path)


def memory(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.random_size:
        args.model = random_checkpoint(args.random_size, work)
    video = work / f"long_{args.minutes:g}min.mp4"
    t0 = time.perf_counter()
    n = make_long_video(video, args.minutes)
    made = time.perf_counter() - t0
    logger.info("generated %s: %d frames, %.0f MB, in %.0f s", video, n, video.stat().st_size / 2**20, made)
    encoder = load_model(args.model, device="cpu", test_rules=args.rules)
    classes = read_class_texts(args.classes, descriptions=args.descriptions)
    text_emb = encoder.encode_class_texts(classes)
    # the last mark one minute before the end too: the final, shorter batch is a new tensor shape for the model's
    # kernels, which costs a few MB once, whatever the length of the video
    marks = sorted({m for m in (1, 10, 30, 60) if m <= args.minutes} | {args.minutes, max(1, args.minutes - 1)})
    before = rss_mb()
    samples, at_marks = [], {}
    if args.tracemalloc:
        tracemalloc.start()

    def on_batch(done, tl):
        last = tl.windows[-1]
        minute = last.end / tl.fps / 60
        rss, peak = rss_mb()
        samples.append((round(minute, 3), round(rss, 1), round(peak, 1)))
        for m in marks:
            if m not in at_marks and minute >= m - 1e-9:
                at_marks[m] = {"rss_mb": round(rss, 1), "peak_rss_mb": round(peak, 1), "windows": done}
                if args.tracemalloc:  # Python-level allocations (numpy arrays included), now and at most so far
                    now, top = tracemalloc.get_traced_memory()
                    at_marks[m].update(traced_mb=round(now / 2**20, 2), traced_peak_mb=round(top / 2**20, 2))

    try:
        tl = score_timeline(encoder, video, text_emb, classes.names, window=args.window, stride=args.stride,
                            batch_size=args.batch_size, on_batch=on_batch)
    finally:
        if not args.keep_video:
            os.unlink(video)
    after = rss_mb()
    rss = [s[1] for s in samples]
    return {"video": {"minutes": args.minutes, "frames": n, "size": "320x240", "fps": 25, "generation_s": round(made)},
            "model": args.random_size or args.model, "input_size": encoder.input_size,
            "window": args.window, "stride": args.stride, "windows": len(tl.windows),
            "seconds": round(tl.seconds, 1), "windows_per_second": round(tl.windows_per_second, 3),
            "decoded_frames_per_second": round(n / tl.seconds, 1), "max_cached_frames": tl.max_cached_frames,
            "rss_before_mb": round(before[0], 1), "rss_at": at_marks, "rss_min_mb": min(rss), "rss_max_mb": max(rss),
            "peak_rss_end_mb": round(after[1], 1), "threads": torch.get_num_threads(),
            "whole_video_decoded_would_be_mb": round(n * 320 * 240 * 3 / 2**20),
            "samples_minute_rss_peak": samples[::max(1, len(samples) // 20)] + samples[-3:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("accuracy", help="frame accuracy on concatenated demo validation clips")
    a.add_argument("--data", default="demo_data")
    a.add_argument("--model", default="demo_output/train/last.pt")
    a.add_argument("--clips-per-action", type=int, default=2)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--keep-outputs", action="store_true", help="keep the video and write each timeline")
    a.add_argument("--setting", dest="settings", nargs=3, action="append", metavar=("WINDOW", "STRIDE", "MIN_SEG"),
                   help="window, stride, minimum segment seconds (repeatable; default 2s 1s 0 and 2s 1s 2 and "
                        "2s 0.5s 2)")
    m = sub.add_parser("memory", help="RSS over a long generated video, and windows/s")
    m.add_argument("--model", default="demo_output/train/last.pt")
    m.add_argument("--classes", default="demo_data/classes.csv")
    m.add_argument("--descriptions", default=None)
    m.add_argument("--minutes", type=float, default=30)
    m.add_argument("--window", default="2s")
    m.add_argument("--stride", default="1s")
    m.add_argument("--keep-video", action="store_true")
    m.add_argument("--tracemalloc", action="store_true", help="also trace Python allocations (slower)")
    m.add_argument("--random-size", help="instead of --model: T2L on a random CLIP of this size (ViT-B/16 ...), for "
                                         "the speed of a full-size model")
    for q in (a, m):
        q.add_argument("--work", required=True, help="scratch folder for the generated video (outside the repo)")
        q.add_argument("--batch-size", type=int, default=16)
        q.add_argument("--threads", type=int, default=None)
        q.add_argument("--json-out", help="also write the figures here")
        q.add_argument("--rules", default="published", choices=("published", "centre"), help="test-time rules")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "accuracy":
        args.settings = [(w, s, float(ms)) for w, s, ms in (args.settings or [("2s", "1s", 0), ("2s", "1s", 2),
                                                                              ("2s", "0.5s", 2)])]
        return emit(accuracy(args), args.json_out)
    return emit(memory(args), args.json_out)


if __name__ == "__main__":
    sys.exit(main())
