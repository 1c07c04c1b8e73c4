"""Data-loading throughput: clips/s from frame folders and from video files, by DataLoader workers.

Makes its own synthetic data in a temporary folder (frame folders of JPEGs and mp4 videos with the
same content), then times full passes of a ``DataLoader`` over ``datasets.VideoDataset`` and prints a
markdown table. A benchmark, not a test: the figures depend on the machine and its load.

Examples:
    python benchmarks/data_loading.py                          # 64 videos x 300 frames, 320x240
    python benchmarks/data_loading.py --workers 0,4,8,16 --mode test
    python benchmarks/data_loading.py --videos 16 --frames 120 --keep-data bench_data
    python benchmarks/data_loading.py --sources frames --transform-on loader,device --workers 1,2   # issue 19
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from datasets import VideoDataset, set_video_backend, video_backend  # noqa: E402

logger = logging.getLogger("benchmarks.data_loading")


def available_cpus() -> int:
    """CPUs this process may use (the affinity mask, which containers restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def synthetic_frame(v: int, k: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: a coloured gradient, a moving square and noise (so codecs have real work)."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 255 * x / width
    img[..., 1] = 255 * y / height
    img[..., 2] = (37 * v) % 256
    size = height // 4
    cx = int((width - size) * (0.5 + 0.5 * np.sin(2 * np.pi * (k / 90 + v / 7))))
    cy = int((height - size) * (0.5 + 0.5 * np.cos(2 * np.pi * (k / 120 + v / 11))))
    img[cy:cy + size, cx:cx + size] = (255, 255 - 3 * v % 256, 60)
    img += rng.normal(0, 4, size=(height, width, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_data(root: str, videos: int, frames: int, width: int, height: int, codec: str, gop: int):
    """Write ``videos`` frame folders and mp4 files plus a list file for each; returns the two lists."""
    import av

    frame_lines, video_lines = [], []
    for v in tqdm(range(videos), desc="writing synthetic videos", unit="video"):
        rng = np.random.default_rng(v)
        folder = os.path.join(root, "frames", f"video_{v:03d}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(root, "videos", f"video_{v:03d}.mp4")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        container = av.open(path, "w")
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop > 0:
            # Seeking decodes from the previous keyframe, so the keyframe interval sets the cost
            # of reading 8 frames spread over the whole video.
            stream.gop_size = gop
        for k in range(frames):
            img = synthetic_frame(v, k, width, height, rng)
            Image.fromarray(img).save(os.path.join(folder, f"img_{k + 1:05d}.jpg"), quality=90)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        container.close()
        frame_lines.append(f"frames/video_{v:03d} {frames} {v % 10}")
        # 0: the count comes from the container, as it does for lists made without extraction
        video_lines.append(f"videos/video_{v:03d}.mp4 0 {v % 10}")
    lists = {}
    for name, lines in (("frames", frame_lines), ("videos", video_lines)):
        lists[name] = os.path.join(root, f"{name}.txt")
        with open(lists[name], "w") as f:
            f.write("\n".join(lines) + "\n")
    return lists


def time_loader(dataset: VideoDataset, workers: int, batch_size: int, passes: int) -> float:
    """Clips per second over ``passes`` timed passes, after one untimed warm-up pass.

    Only the loader is timed: what the main process does with a batch is nothing here, so with the transform on
    the device (``dataset.deferred``) this is the rate of decoding alone, what a GPU would be fed at.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0),
                        collate_fn=dataset.collate)
    clips, elapsed = 0, 0.0
    for p in range(passes + 1):
        dataset.set_epoch(p)
        start = time.perf_counter()
        n = sum(len(batch["video"]) for batch in loader)
        if p > 0:  # pass 0 warms the page cache and starts the workers
            clips += n
            elapsed += time.perf_counter() - start
    return clips / elapsed


def time_device_half(dataset: VideoDataset, batch_size: int, batches: int = 4) -> float:
    """Milliseconds per clip of ``dataset.finish`` (the transform of a deferred batch) on the CPU."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=dataset.collate)
    it = iter(loader)
    batch_list = [next(it) for _ in range(min(batches, len(loader)))]
    dataset.finish(batch_list[0], torch.device("cpu"))  # warm-up
    start = time.perf_counter()
    clips = 0
    for batch in batch_list:
        clips += dataset.finish(batch, torch.device("cpu")).shape[0]
    return 1000 * (time.perf_counter() - start) / clips


def parse_workers(text: str, cpus: int):
    out = []
    for item in text.split(","):
        w = cpus if item.strip().upper() == "N" else int(item)
        if w not in out:
            out.append(w)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=64, help="synthetic videos (default 64)")
    parser.add_argument("--frames", type=int, default=300, help="frames per video (default 300)")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--codec", default="libx264", help="video codec for the mp4s (default libx264)")
    parser.add_argument("--gop", type=int, default=0,
                        help="keyframe interval of the mp4s; 0 = the codec's default (250 for libx264)")
    parser.add_argument("--video-backend", choices=["decord", "pyav"], default=None,
                        help="force the video reader (default: decord when importable)")
    parser.add_argument("--main-threads", type=int, default=1,
                        help="torch threads of the main process, which does the work when workers=0 "
                             "(default 1, as in each DataLoader worker)")
    parser.add_argument("--num-frames", type=int, default=8, help="T, frames per clip (default 8)")
    parser.add_argument("--input-size", type=int, default=224, help="S, output side (default 224)")
    parser.add_argument("--mode", choices=["train", "test"], default="train",
                        help="train: random segments + augmentation; test: middles + centre crop")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", default="0,1,2,N",
                        help="comma-separated DataLoader worker counts; N = all CPUs (default 0,1,2,N)")
    parser.add_argument("--passes", type=int, default=2, help="timed passes per setting (default 2)")
    parser.add_argument("--transform-on", default="loader",
                        help="comma-separated: loader (the workers decode and transform, the path before issue 19) "
                             "and/or device (the workers only decode; the transform's cost on this CPU is timed "
                             "separately) (default loader)")
    parser.add_argument("--sources", default="frames,videos", help="comma-separated: frames, videos")
    parser.add_argument("--keep-data", default=None,
                        help="write the synthetic data here and keep it, or reuse what an earlier run "
                             "left there (default: a temp folder, removed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.set_num_threads(args.main_threads)
    if args.video_backend:
        set_video_backend(args.video_backend)
    cpus = available_cpus()
    workers = parse_workers(args.workers, cpus)
    root = args.keep_data or tempfile.mkdtemp(prefix="t2l_bench_")
    os.makedirs(root, exist_ok=True)
    try:
        existing = {name: os.path.join(root, f"{name}.txt") for name in ("frames", "videos")}
        if args.keep_data and all(os.path.isfile(p) for p in existing.values()):
            logger.info("reusing the synthetic data in %s (delete it to regenerate)", root)
            lists = existing
        else:
            lists = make_data(root, args.videos, args.frames, args.width, args.height, args.codec, args.gop)
        rows, device_half = [], {}
        places = [p.strip() for p in args.transform_on.split(",") if p.strip()]
        for source in [x.strip() for x in args.sources.split(",") if x.strip()]:
            for place in places:
                ds = VideoDataset(lists[source], root=root, num_frames=args.num_frames, mode=args.mode,
                                  input_size=args.input_size, on_error="raise", deferred=place == "device",
                                  test_rules="centre" if place == "device" else "published")
                for w in tqdm(workers, desc=f"timing {source}, transform in the {place}", unit="setting"):
                    rows.append((source, place, w, time_loader(ds, w, args.batch_size, args.passes)))
                if place == "device":
                    device_half[source] = time_device_half(ds, args.batch_size)
    finally:
        if args.keep_data is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n{args.videos} videos x {args.frames} frames of {args.width}x{args.height}; "
          f"clips of {args.num_frames} frames at {args.input_size} px, mode={args.mode}, "
          f"batch {args.batch_size}; video reader: {video_backend()}; {cpus} CPUs "
          f"({platform.processor() or platform.machine()}); torch {torch.__version__}; "
          f"main-process torch threads (workers=0): {torch.get_num_threads()}; "
          f"keyframe interval: {args.gop or 'codec default'}\n")
    print("| source | transform in | DataLoader workers | clips/s | clips/s per loader core | frames/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for source, place, w, rate in rows:
        label = "frame folders (JPEG)" if source == "frames" else f"video files ({args.codec} mp4)"
        print(f"| {label} | {place} | {w} | {rate:.1f} | {rate / max(w, 1):.1f} | {rate * args.num_frames:.0f} |")
    for source, ms in device_half.items():
        print(f"\nthe device half on this CPU ({source}, {args.mode}, main process, "
              f"{torch.get_num_threads()} thread(s)): {ms:.1f} ms per clip")


if __name__ == "__main__":
    main()
