"""Peak memory and time of ``predict.py`` with many classes: the class texts are encoded in batches.

Writes a random CLIP of a released size (nothing is downloaded), a class list of ``--classes`` names and an 8-frame
video into a temporary folder, runs ``python predict.py VIDEO --model CLIP --classes CSV --templates`` (16 texts per
class) as a child process, and reports the child's peak resident memory (``ru_maxrss`` from ``wait4``) with its RSS
sampled every second, so that a reader sees whether memory grows with the number of texts or stays flat after the
first batch.

Examples:
    python benchmarks/class_text_memory.py --classes 5000                          # ViT-B/16: slow on a CPU
    python benchmarks/class_text_memory.py --classes 5000 --text-layers 1          # same widths, one text block
    python benchmarks/class_text_memory.py --classes 500 --size tiny               # seconds
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import clip  # noqa: E402
from benchmarks.data_loading import synthetic_frame  # noqa: E402
from clip.model import CLIP, CLIPConfig  # noqa: E402

# The tests' tiny CLIP, for a quick check of the script itself.
TINY = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                  context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2,
                  vision_heads=1)


def write_inputs(folder: Path, config: CLIPConfig, num_classes: int) -> tuple[Path, Path, Path]:
    """(CLIP state dict file, class list CSV, frames folder) in ``folder``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIP(config)
    weights = folder / "clip.pt"
    torch.save(model.state_dict(), weights)
    classes = folder / "classes.csv"
    with classes.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "name"])
        writer.writerows([i, f"action number {i} with a tool"] for i in range(num_classes))
    frames = folder / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    side = config.image_resolution * 256 // 224
    for k in range(8):
        Image.fromarray(synthetic_frame(0, k, side, side, rng)).save(frames / f"img_{k + 1:05d}.jpg", quality=90)
    return weights, classes, frames


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=5000, help="number of classes (16 template texts each)")
    p.add_argument("--size", default="ViT-B/16", help="a released CLIP size (clip.available_models()) or 'tiny'")
    p.add_argument("--text-layers", type=int, default=None, help="text blocks (default: the size's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of predict.py (default 1)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    config = TINY if args.size == "tiny" else clip.model_config(args.size)
    if args.text_layers:
        config = replace(config, transformer_layers=args.text_layers)
    with tempfile.TemporaryDirectory() as tmp:
        weights, classes, frames = write_inputs(Path(tmp), config, args.classes)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, str(REPO / "predict.py"), str(frames), "--model", str(weights), "--classes",
               str(classes), "--templates", "--top-k", "1", "--json"]
        out_file, err_file = Path(tmp) / "stdout.txt", Path(tmp) / "stderr.txt"
        start = time.perf_counter()
        with out_file.open("w") as out, err_file.open("w") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
        samples = []
        while True:  # wait4, not poll: it returns the child's own peak RSS
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            rss = rss_mib(proc.pid)
            if rss == rss:  # a zombie's status has no VmRSS
                samples.append((round(time.perf_counter() - start), round(rss)))
            time.sleep(1.0)
        seconds = time.perf_counter() - start
        out, err = out_file.read_text(), err_file.read_text()
    if proc.returncode != 0:
        print(err[-2000:], file=sys.stderr)
        return 1
    peak_mib = usage.ru_maxrss / 1024  # kilobytes on Linux
    result = {"size": args.size, "text_width": config.transformer_width, "text_layers": config.transformer_layers,
              "classes": args.classes, "texts": 16 * args.classes, "threads": args.threads,
              "peak_rss_mib": round(peak_mib, 1), "seconds": round(seconds, 1),
              "rss_mib_over_time": ", ".join(f"{t}s {r}" for t, r in samples[:: max(1, len(samples) // 24)]),
              "top1": json.loads(out)["top"][0]}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
