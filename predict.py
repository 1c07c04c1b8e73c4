"""Classify one video: the top-k classes with their probabilities, scored exactly as test.py scores.

The video (a file or a frames folder) is read with test.py's preprocessing; each class gets its description,
or the 16 prompt templates (class list without descriptions, a comma-separated list, or --templates), and the
probabilities are softmax(logit_scale * cosine) over the classes, averaged over text views and video views
(``engine.video_scores``). The table (or --json) goes to stdout; log messages go to stderr.
Exit status: 0 done, 2 bad input (missing file, unreadable video, empty class list, unusable model).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

import engine
from datasets import SampleLoadError
from features import load_model, read_class_texts
from utils.checkpoint import UnsafeCheckpointError

logger = logging.getLogger("predict")

EXAMPLES = """examples:
  python predict.py demo_data/videos/val/growing/growing_000.mp4 --model demo_output/train/last.pt \\
      --classes demo_data/classes.csv --descriptions demo_data/descriptions.csv
  python predict.py clip.mp4 --model ViT-B/16 --classes "playing guitar,juggling,riding a bike" --top-k 2
  python predict.py frames/v_Biking_g01_c01 --model k400_t2l.pt --classes lists/ucf101_classes.csv --templates --json
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
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default: the T2L model's, or 8)")
    p.add_argument("--input-size", type=int, default=None, help="frame side in pixels (default: the model's)")
    p.add_argument("--clips", type=int, default=1, help="temporal clips, averaged (default 1)")
    p.add_argument("--crops", type=int, default=1, choices=(1, 3), help="spatial crops per clip (default 1)")
    p.add_argument("--image-tmpl", default="img_{:05d}.jpg", help="frame file names (default img_{:05d}.jpg)")
    p.add_argument("--index-start", type=int, default=1, help="number of the first frame file (default 1)")
    p.add_argument("--rules", default="published", choices=("published", "centre"),
                   help="test-time rules, as test.py's eval.rules: published (the published test code's frames, "
                        "Pillow bicubic resize, logit scale 100; default) or centre (segment centres, torch bilinear "
                        "resize, the model's logit scale)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: fp32 on CPU, bf16/fp16 on GPU (default auto)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need full unpickling (can run code): only files you trust")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is loaded (to stderr)")
    return p


def predict(args) -> dict:
    """The prediction as a dict (what --json prints)."""
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if not os.path.exists(args.video):
        raise FileNotFoundError(f"video not found: {args.video} (expected a video file or a frames folder)")
    classes = read_class_texts(args.classes, descriptions=args.descriptions, templates=args.templates)
    encoder = load_model(args.model, device=args.device, precision=args.precision, num_frames=args.frames,
                         input_size=args.input_size, num_clips=args.clips, num_crops=args.crops,
                         image_tmpl=args.image_tmpl, index_start=args.index_start, trust=args.trust_checkpoint,
                         test_rules=args.rules)
    views = encoder.load_views(args.video)  # (V, T, 3, S, S)
    view_emb, _ = encoder.encode_views(views.unsqueeze(0))  # (1, V, ...) -> (V, E)
    text_emb = encoder.encode_class_texts(classes)  # (V_text, K, E)
    # test.py's scoring: probabilities per video view, averaged over text views inside, then over video views.
    probs = engine.video_scores(view_emb, text_emb, encoder.logit_scale).mean(dim=0)  # (V, K) -> (K,)
    k = min(args.top_k, len(classes.names))
    top = torch.topk(probs, k)
    return {"video": args.video, "model": encoder.describe(), "kind": encoder.kind,
            "num_frames": encoder.num_frames, "views": encoder.num_views, "input_size": encoder.input_size,
            "num_classes": len(classes.names), "text_mode": classes.mode, "classes_source": classes.source,
            "top": [{"rank": r + 1, "class_id": int(i), "class": classes.names[int(i)], "probability": float(p)}
                    for r, (p, i) in enumerate(zip(top.values, top.indices))]}


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
        result = predict(args)
    except (FileNotFoundError, ValueError, SampleLoadError, UnsafeCheckpointError, OSError) as e:
        # ValueError covers ListFileError, CheckpointError and CLIPLoadError: each names the file and the problem
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
