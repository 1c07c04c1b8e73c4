"""Evaluate T2L: ``python test.py --config configs/ucf101/UCF_zero_shot_testing.yaml [--weights PATH ...]``.

Without weights (and without ``test.weights`` in the config) the frozen CLIP baseline is evaluated (frame-averaged
CLIP, the standard zero-shot baseline). Protocols follow from the config's ``eval.sets``: several list files give
mean and std over splits; ``class_subsets`` gives the Kinetics-600 subsets; sets with ``group: base|novel`` and
several weights (one per training set) give base-to-novel with the harmonic mean. Writes into ``output_dir``:
``results.json``, ``per_class_<set>_<split>.csv``, ``confusion_<set>_<split>.png``, ``scores_<set>_<split>.npz``
(per-video probabilities and labels), ``config.yaml`` and ``test_log.txt``.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from utils.lock import exit_if_busy, lock_output_folder

if __name__ == "__main__":  # a run into a busy output folder stops here, not after the seconds torch takes to import
    exit_if_busy("test", sys.argv[1:])

import numpy as np

import engine
from modules import convert_to_fp16_like_published, factory
from utils import distributed
from utils.io import atomic_write, atomic_write_text, remove_stale_tmp
from utils.config import check_paths, load_config, save_config, script_parser
from utils.logger import setup_logging
from utils.metrics import confusion_matrix, per_class_accuracy, save_confusion_png, write_per_class_csv
from utils.protocols import base_novel_summary, mean_std

logger = logging.getLogger("test")


def parse_args(argv=None):
    p = script_parser(__doc__, ["python test.py --config configs/ucf101/UCF_zero_shot_testing.yaml "
                                "--weights output/k400/best_ucf101.pt",
                                "python test.py --config configs/base_to_novel/hmdb51_base_to_novel.yaml "
                                "--weights s1/last.pt s2/last.pt s3/last.pt",
                                "python test.py --config configs/ucf101/UCF_zero_shot_testing.yaml --baseline"],
                      "eval.num_clips=4")
    p.add_argument("--weights", nargs="*", default=None,
                   help="T2L checkpoint(s), ours or published; several = one per training set (base-to-novel)")
    p.add_argument("--baseline", action="store_true", help="evaluate the frozen CLIP (frame average), no T2L")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need full unpickling (can run code): only for files you trust")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    opts = list(args.opts)
    if args.weights is not None:
        opts.append(f"test.weights={json.dumps(args.weights)}")
    if args.baseline:
        opts.append("test.baseline=true")
    if args.trust_checkpoint:
        opts.append("network.trust_checkpoint=true")
    if args.compile:
        opts.append(f"network.compile={args.compile}")
    cfg = load_config(args.config, opts)
    if not cfg.eval.sets:
        raise ValueError(f"{args.config}: no evaluation sets (eval.sets) to test on")
    check_paths(cfg, train=False)
    dist_info = distributed.setup(cfg.device)
    out = Path(cfg.output_dir)
    try:
        lock = lock_output_folder(out, "test.py", dist_info)  # one writer per output folder
        try:
            setup_logging(str(out), dist_info.rank, filename="test_log.txt")
            if lock:
                lock.log_takeover()
                remove_stale_tmp(out)  # unfinished result files of a killed run (never read); the folder is ours now
            return run(cfg, dist_info, out)
        finally:
            if lock:
                lock.release()
    finally:
        distributed.cleanup()


def run(cfg, dist_info, out: Path) -> dict:
    device = dist_info.device
    weights = [None] if cfg.test.baseline or not cfg.test.weights else list(cfg.test.weights)
    runs = []
    for w in weights:
        model = factory.load_eval_model(cfg, w)
        if engine.uses_fp16_weights(device, cfg.solver.precision):
            convert_to_fp16_like_published(model)  # fp16-pure: the published test runs its fp16 weights on a GPU
        model = model.to(device)
        if cfg.network.compile != "off":
            engine.compile_model(model, cfg.network.compile)
        sets = {}
        for s in cfg.eval.sets:
            res = engine.evaluate_set(model, cfg, s, device, dist_info, keep_scores=dist_info.is_main)
            if dist_info.is_main:
                write_class_files(res, out, tag="" if len(weights) == 1 else f"_run{len(runs) + 1}")
            sets[s.name] = engine.strip_private(res)
            agg = res["aggregate"]
            logger.info("%s%s: top-1 %.2f +- %.2f, top-5 %.2f, mean-class %.2f (%s over %d %s)", s.name,
                        f" [{w}]" if w else " [frozen CLIP]", agg["top1"]["mean"], agg["top1"]["std"],
                        agg["top5"]["mean"], agg["mean_class_acc"]["mean"], "mean", agg["count"], agg["over"])
        runs.append({"weights": w or f"frozen CLIP baseline ({cfg.network.pretrained})", "sets": sets})
        del model

    results = {"config": cfg.output_dir, "model": cfg.network.pretrained, "num_frames": cfg.data.num_frames,
               "views": {"clips": cfg.eval.num_clips, "crops": cfg.eval.num_crops}, "runs": runs}
    # One entry per evaluated set: the figures of a single run, or the mean over runs (training sets).
    results["results"] = {name: summarise_over_runs([r["sets"][name] for r in runs]) for name in runs[0]["sets"]}
    groups = {g: [s.name for s in cfg.eval.sets if s.group == g] for g in ("base", "novel")}
    if groups["base"] and groups["novel"]:
        per_run = [{"base": mean_of([r["sets"][n]["aggregate"]["top1"]["mean"] for n in groups["base"]]),
                    "novel": mean_of([r["sets"][n]["aggregate"]["top1"]["mean"] for n in groups["novel"]])}
                   for r in runs]
        results["base_to_novel"] = base_novel_summary(per_run)
        b2n = results["base_to_novel"]
        logger.info("base-to-novel over %d training set(s): base %.2f, novel %.2f, HM %.2f", len(runs), b2n["base"],
                    b2n["novel"], b2n["hm"])
    if dist_info.is_main:
        # config.yaml describes results.json, so both are written together: a run that fails (bad weights, bad
        # list) leaves an earlier run's pair in the folder as it was.
        save_config(cfg, out / "config.yaml")
        atomic_write_text(out / "results.json", json.dumps(results, indent=2), what="results file")
        logger.info("results written to %s\n%s", out / "results.json", results_table(results))
    return results


def mean_of(values):
    return sum(values) / len(values)


def summarise_over_runs(per_run: list[dict]) -> dict:
    """The results.json entry of a set: splits and aggregate of one run; over several runs, their mean/std."""
    if len(per_run) == 1:
        entry = dict(per_run[0])
    else:
        entry = {"name": per_run[0]["name"], "group": per_run[0]["group"], "num_classes": per_run[0]["num_classes"],
                 "runs": per_run}
        entry["aggregate"] = {m: mean_std([r["aggregate"][m]["mean"] for r in per_run])
                              for m in ("top1", "top5", "mean_class_acc")}
        entry["aggregate"].update(over="training sets", count=len(per_run))
    first = per_run[0]["splits"][0]
    entry.update(top1=entry["aggregate"]["top1"]["mean"], top5=entry["aggregate"]["top5"]["mean"],
                 mean_class_acc=entry["aggregate"]["mean_class_acc"]["mean"], num_videos=first["num_videos"],
                 num_classes=first["num_classes"])
    return entry


def write_class_files(res: dict, out: Path, tag: str = "") -> None:
    for split in res["splits"]:
        stem = f"{res['name']}_{Path(split['split']).stem}{tag}"
        scores, labels, names = split["_scores"], split["_labels"], split["_names"]
        write_per_class_csv(per_class_accuracy(scores, labels, names), out / f"per_class_{stem}.csv")
        # Per-video class probabilities, for analyses of one's own (retrieval of errors, pairwise accuracy).
        atomic_write(out / f"scores_{stem}.npz", lambda f: np.savez_compressed(f, scores=scores.numpy(),
                                                                              labels=labels.numpy()),
                     what="scores file")
        save_confusion_png(confusion_matrix(scores, labels, len(names)), names, out / f"confusion_{stem}.png",
                           title=f"{res['name']} {split['split']}")


def results_table(results: dict) -> str:
    """A markdown table of every set's aggregate figures (what the demo prints at the end)."""
    lines = ["| set | top-1 | top-5 | mean-class | videos | classes | over |", "|---|---|---|---|---|---|---|"]
    for name, r in results["results"].items():
        a = r["aggregate"]
        lines.append(f"| {name} | {a['top1']['mean']:.2f} +- {a['top1']['std']:.2f} | {a['top5']['mean']:.2f} | "
                     f"{a['mean_class_acc']['mean']:.2f} | {r['num_videos']} | {r['num_classes']} | "
                     f"{a['count']} {a['over']} |")
    if "base_to_novel" in results:
        b = results["base_to_novel"]
        lines.append(f"\nbase-to-novel: base {b['base']:.2f}, novel {b['novel']:.2f}, HM {b['hm']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        logging.getLogger("test").error("interrupted: stopped before the end, so results.json and config.yaml were not "
                                        "written (a finished run writes them)")
        sys.exit(130)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:  # RuntimeError: FolderLockedError too
        logging.getLogger("test").error("%s", e)
        sys.exit(1)
