"""Classify one video: the top-k classes with their probabilities, scored exactly as test.py scores.
With --window, a long video instead: which action happens when (a timeline, see timeline.py).

The video (a file or a frames folder) is read with test.py's preprocessing; each class gets its description,
or the 16 prompt templates (class list without descriptions, a comma-separated list, or --templates), and the
probabilities are softmax(logit_scale * cosine) over the classes, averaged over text views and video views
(``engine.class_probabilities``). The table (or --json) goes to stdout; log messages go to stderr.

Timeline mode (--window 2s --stride 1s, or in frames: --window 16): every window of the video is scored the same
way (the model's frames sampled over the window as at test time), and --out gets windows.csv (top-k per window),
segments.csv (runs where the top class holds, --threshold, --min-segment), timeline.json, probabilities.npy and
timeline.png. The video is decoded once, front to back, without holding it in memory.
Exit status: 0 done, 1 the video broke off while decoding (the timeline so far is written), 2 bad input (missing
file, unreadable video, empty class list, unusable model), 130 interrupted (the windows scored so far are written).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from datasets import SampleLoadError
import features
from features import load_model, read_class_texts
from utils.checkpoint import UnsafeCheckpointError

logger = logging.getLogger("predict")

EXAMPLES = """examples:
  python predict.py demo_data/videos/val/growing/growing_000.mp4 --model demo_output/train/last.pt \\
      --classes demo_data/classes.csv --descriptions demo_data/descriptions.csv
  python predict.py clip.mp4 --model ViT-B/16 --classes "playing guitar,juggling,riding a bike" --top-k 2
  python predict.py frames/v_Biking_g01_c01 --model k400_t2l.pt --classes lists/ucf101_classes.csv --templates --json
  # a timeline of a long video: 2-second windows every second, segments where the top class holds for 3 s
  python predict.py match.mp4 --model k400_t2l.pt --classes lists/kinetics_400_descriptions.csv --window 2s --stride 1s \\
      --min-segment 3 --out match_timeline
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", help="a video file or a folder of frames (img_00001.jpg ...)")
    p.add_argument("--model", required=True,
                   help="T2L checkpoint (ours or published), a CLIP name (ViT-B/16 ...) or a CLIP weights file")
    p.add_argument("--classes", required=True,
                   help="class list CSV (id,name), descriptions CSV (SNo,Class Name,Description) or "
                        "comma-separated class names")
    p.add_argument("--descriptions", help="descriptions CSV for a class list (SNo,Class Name,Description)")
    p.add_argument("--templates", action="store_true", help="use the 16 prompt templates instead of descriptions")
    p.add_argument("--top-k", "-k", type=int, default=5, help="how many classes to show (default 5)")
    p.add_argument("--json", action="store_true", help="machine-readable output (one JSON object)")
    features.add_view_arguments(p, device="cpu")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is loaded (to stderr)")
    t = p.add_argument_group("timeline of a long video (with --window)")
    t.add_argument("--window", help="score windows of this length: seconds (2s, 1.5s, 500ms) or frames (16, 16f)")
    t.add_argument("--stride", help="start a window every this much (default: half the window)")
    t.add_argument("--fps", type=float, default=None,
                   help="frames per second (default: the video's; needed for seconds with a frames folder)")
    t.add_argument("--out", help="folder for the timeline files (default: timeline_<video name>)")
    t.add_argument("--threshold", type=float, default=0.0,
                   help="a window whose top probability is below this gets no class (default 0: always the top one)")
    t.add_argument("--min-segment", type=float, default=0.0,
                   help="merge segments shorter than this (seconds; frames without a frame rate) into a neighbour")
    t.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default 16)")
    t.add_argument("--no-plot", action="store_true", help="do not draw timeline.png")
    t.add_argument("--progress", action="store_true", help="show a progress bar (to stderr)")
    return p


def _load(args):
    """(classes, encoder) from the arguments, after checking the inputs exist."""
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if not os.path.exists(args.video):
        raise FileNotFoundError(f"video not found: {args.video} (expected a video file or a frames folder)")
    classes = read_class_texts(args.classes, descriptions=args.descriptions, templates=args.templates)
    encoder = load_model(args.model, device=args.device, precision=args.precision, num_frames=args.frames,
                         input_size=args.input_size, num_clips=args.clips, num_crops=args.crops,
                         image_tmpl=args.image_tmpl, index_start=args.index_start, trust=args.trust_checkpoint,
                         test_rules=args.rules)
    return classes, encoder


def _header(args, classes, encoder) -> dict:
    return {"video": args.video, "model": encoder.describe(), "kind": encoder.kind,
            "num_frames": encoder.num_frames, "views": encoder.num_views, "input_size": encoder.input_size,
            "num_classes": len(classes.names), "text_mode": classes.mode, "classes_source": classes.source}


def predict(args) -> dict:
    """The prediction as a dict (what --json prints)."""
    classes, encoder = _load(args)
    views = encoder.load_views(args.video)  # (V, T, 3, S, S)
    view_emb, _ = encoder.encode_views(views.unsqueeze(0))  # (1, V, ...) -> (V, E)
    text_emb = encoder.encode_class_texts(classes)  # (V_text, K, E)
    # test.py's scoring: probabilities per video view, averaged over text views inside, then over video views.
    probs = encoder.class_probabilities(view_emb, text_emb)[0]  # (1, K) -> (K,)
    k = min(args.top_k, len(classes.names))
    top = torch.topk(probs, k)
    return {**_header(args, classes, encoder),
            "top": [{"rank": r + 1, "class_id": int(i), "class": classes.names[int(i)], "probability": float(p)}
                    for r, (p, i) in enumerate(zip(top.values, top.indices))]}


def predict_timeline(args):
    """Timeline mode: score every window, write the files into --out; returns (the ``timeline.Timeline``, its
    segments, the paths written by ``timeline.write_timeline``)."""
    import timeline

    if args.min_segment < 0:
        raise ValueError(f"--min-segment must be >= 0, got {args.min_segment}")
    if args.fps is not None and args.fps <= 0:
        raise ValueError(f"--fps must be > 0, got {args.fps}")
    classes, encoder = _load(args)
    text_emb = encoder.encode_class_texts(classes)  # (V_text, K, E), once for all windows
    tl = timeline.score_timeline(encoder, args.video, text_emb, classes.names, window=args.window,
                                 stride=args.stride, fps=args.fps, batch_size=args.batch_size,
                                 progress=args.progress)
    segments = timeline.find_segments(tl, threshold=args.threshold, min_segment=args.min_segment)
    out = args.out or f"timeline_{os.path.basename(os.path.normpath(args.video))}"
    settings = {**_header(args, classes, encoder), "test_rules": encoder.test_rules, "threshold": args.threshold,
                "min_segment": args.min_segment}
    settings.pop("video")
    paths = timeline.write_timeline(tl, segments, out, top_k=args.top_k, extra=settings, plot=not args.no_plot)
    logger.info("timeline of %s: %d windows in %.1f s (%.1f windows/s), %d segments, written to %s", args.video,
                len(tl.windows), tl.seconds, tl.windows_per_second or 0, len(segments), out)
    return tl, segments, paths


def format_table(result: dict) -> str:
    """The human-readable output: a header and one line per class."""
    width = max(len("class"), *(len(t["class"]) for t in result["top"]))
    lines = [f"video: {result['video']}",
             f"model: {result['model']} ({'T2L' if result['kind'] == 't2l' else 'frame-averaged CLIP'}, "
             f"{result['num_frames']} frames x {result['views']} view(s), {result['input_size']} px)",
             f"classes: {result['num_classes']} ({result['text_mode']}, {result['classes_source']})",
             "",
             f"{'rank':>4}  {'probability':>11}  {'class':<{width}}  id"]
    for t in result["top"]:
        lines.append(f"{t['rank']:>4}  {t['probability']:>11.4f}  {t['class']:<{width}}  {t['class_id']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Print the prediction; returns the exit status (0, or 2 for bad input with a one-line message)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.window:
            return _print_timeline(args, *predict_timeline(args))
        result = predict(args)
    except (FileNotFoundError, ValueError, SampleLoadError, UnsafeCheckpointError, OSError) as e:
        # ValueError covers ListFileError, CheckpointError and CLIPLoadError: each names the file and the problem
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _print_timeline(args, tl, segments, paths) -> int:
    import timeline

    if args.json:
        print(Path(paths["json"]).read_text(encoding="utf-8"), end="")
    else:
        print(f"video: {args.video} ({tl.num_frames} frames" + (f", {tl.num_frames / tl.fps:.1f} s" if tl.fps else "")
              + f"), {len(tl.windows)} windows, {len(segments)} segments")
        print(timeline.segments_table(tl, segments))
        print(f"written: {', '.join(paths.values())}")
    if tl.interrupted:
        print(f"predict.py: interrupted; the {len(tl.windows)} windows scored so far are written", file=sys.stderr)
        return 130
    if not tl.complete:
        print(f"predict.py: the video broke off while decoding ({tl.error}); the timeline covers its first "
              f"{tl.num_frames} frames", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
