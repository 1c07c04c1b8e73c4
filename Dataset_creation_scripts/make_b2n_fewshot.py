#!/usr/bin/env python
"""Base-to-novel and few-shot list files from full train/test list files.

``b2n``: split a dataset's classes into base and novel, sample K training videos per base class
(one training set per seed), and write the base and novel test lists.
``fewshot``: K training videos per class over all classes, for each K and seed.

Sampling is deterministic across machines, Python and NumPy versions: within a class, videos are
ranked by SHA-256 of ``"<seed>:<folder>"`` and the first K are taken. So the K=2 set of a seed is
inside its K=4 set, and so on; the output is sorted by label, then folder.

Base/novel convention (looked up in ViFi-CLIP's published files, datasets_splits/base2novel_splits
and labels/*_base_labels.csv): ViFi-CLIP ships a FIXED list of base classes per dataset, with
ceil(C/2) base classes of C (UCF-101 51/50, HMDB-51 26/25, K-400 200/200, SSv2 87/87), base test videos
from the split-1 test list, and 16-shot training sets from the split-1 train list for three seeds.
Its base list is NOT the first half of the alphabetical class list (HMDB-51's base classes are the
alphabetically last 26, "pour".."wave"; UCF-101's and K-400's are a mixed selection). Therefore:
  * --base-classes FILE  reproduces a published split exactly: give ViFi-CLIP's
    labels/<dataset>_base_labels.csv (or any 'id,name' CSV or one-name-per-line file); the base
    class order (and so the base label ids) follows that file, like ViFi-CLIP's base label ids.
  * --rule first-half    (the default without --base-classes): base = the first ceil(C/2) classes of
    --classes, novel = the rest, in class-list order.
  * --rule frequency     base = the ceil(C/2) classes with the most training videos (ties: lower id).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import _common
from _common import ClassMatcher, InputFormatError, format_list_line, read_classes_csv, read_list_file

logger = logging.getLogger("make_b2n_fewshot")

ListEntry = Tuple[str, int, int]  # (folder, num_frames, label)


def sample_per_class(
    entries: Sequence[ListEntry],
    k: int,
    seed: int,
    classes: Optional[Sequence[int]] = None,
    allow_fewer: bool = False,
) -> List[ListEntry]:
    """K entries per class (``classes``: the labels to sample, default all present), deterministic in ``seed``.

    Raises ValueError when a class has fewer than K videos, unless ``allow_fewer`` (then it keeps all).
    """
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    by_class: Dict[int, List[ListEntry]] = defaultdict(list)
    for e in entries:
        by_class[e[2]].append(e)
    labels = sorted(by_class) if classes is None else list(classes)
    out: List[ListEntry] = []
    short = []
    for label in labels:
        group = by_class.get(label, [])
        if len(group) < k:
            short.append((label, len(group)))
            if not allow_fewer:
                continue
        ranked = sorted(group, key=lambda e: (_common.rank_key(seed, e[0]), e[0]))
        out.extend(sorted(ranked[:k], key=lambda e: e[0]))
    if short and not allow_fewer:
        desc = ", ".join(f"label {lab}: {n}" for lab, n in short[:10])
        raise ValueError(f"{len(short)} class(es) have fewer than {k} training videos ({desc}); use --allow-fewer to keep all of theirs")
    if short:
        logger.warning("%d class(es) have fewer than %d videos and keep all they have", len(short), k)
    return out


def read_class_names_file(path) -> List[str]:
    """Class names from an ``id,name`` CSV (in id order) or a plain one-name-per-line text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"base class file not found: {path}")
    with open(path, encoding="utf-8-sig") as f:
        first = f.readline().strip().lower().replace(" ", "")
    if first.startswith("id,name"):
        return read_classes_csv(path)
    names = []
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                names.append(line.strip())
    if not names:
        raise InputFormatError(path, None, "no class names")
    return names


def choose_base_classes(
    class_names: Sequence[str],
    train: Sequence[ListEntry],
    rule: str = "first-half",
    base_names: Optional[Sequence[str]] = None,
    base_source: str = "base classes",
) -> Tuple[List[int], List[int]]:
    """Return (base ids, novel ids) as ids of ``class_names``, each in output order.

    ``base_names`` (a published split) wins over ``rule``; see the module docstring.
    """
    n = len(class_names)
    if base_names is not None:
        matcher = ClassMatcher(class_names, "--classes")
        ids = matcher.resolve(base_names, f"classes of {base_source}")
        base = [ids[name] for name in base_names]
        if len(set(base)) != len(base):
            raise ValueError(f"{base_source}: a class is listed twice")
        novel = [i for i in range(n) if i not in set(base)]
    elif rule == "first-half":
        half = math.ceil(n / 2)
        base, novel = list(range(half)), list(range(half, n))
    elif rule == "frequency":
        counts = Counter(e[2] for e in train)
        order = sorted(range(n), key=lambda i: (-counts.get(i, 0), i))
        half = math.ceil(n / 2)
        base, novel = sorted(order[:half]), sorted(order[half:])
    else:
        raise ValueError(f"unknown rule {rule!r}")
    if not base or not novel:
        raise ValueError(f"the split leaves {len(base)} base and {len(novel)} novel classes; both must be non-empty")
    return base, novel


def _check_labels(entries: Sequence[ListEntry], n: int, path) -> None:
    bad = sorted({e[2] for e in entries if not 0 <= e[2] < n})
    if bad:
        raise ValueError(f"{path}: labels {bad[:10]} are outside the {n} classes of --classes")


def _relabel(entries: Sequence[ListEntry], mapping: Dict[int, int]) -> List[str]:
    return [format_list_line(f, t, mapping[lab]) for f, t, lab in entries if lab in mapping]


def run_b2n(args) -> None:
    """Subcommand ``b2n``."""
    names = read_classes_csv(args.classes)
    train = read_list_file(args.train_list)
    test = read_list_file(args.test_list)
    _check_labels(train, len(names), args.train_list)
    _check_labels(test, len(names), args.test_list)
    base_names = read_class_names_file(args.base_classes) if args.base_classes else None
    if base_names is None and args.rule == "first-half":
        logger.warning("base = first half of %s; this is not ViFi-CLIP's published split (pass --base-classes for that)", args.classes)
    base, novel = choose_base_classes(names, train, args.rule, base_names, args.base_classes or "")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.global_labels:
        base_map = {c: c for c in base}
        novel_map = {c: c for c in novel}
    else:
        base_map = {c: i for i, c in enumerate(base)}
        novel_map = {c: i for i, c in enumerate(novel)}
        _common.write_classes_csv(out / "base_classes.csv", [names[c] for c in base])
        _common.write_classes_csv(out / "novel_classes.csv", [names[c] for c in novel])
    for seed in args.seeds:
        picked = sample_per_class(train, args.shots, seed, classes=base, allow_fewer=args.allow_fewer)
        path = out / f"base_train_{args.shots}shot_seed{seed}.txt"
        _common.write_list_file(path, _relabel(picked, base_map))
        logger.info("wrote %s (%d videos)", path, len(picked))
    base_set, novel_set = set(base), set(novel)
    for name, keep, mapping in (("base_test.txt", base_set, base_map), ("novel_test.txt", novel_set, novel_map)):
        lines = _relabel(sorted((e for e in test if e[2] in keep), key=lambda e: (mapping[e[2]], e[0])), mapping)
        _common.write_list_file(out / name, lines)
        logger.info("wrote %s (%d videos)", out / name, len(lines))
    logger.info("%d base and %d novel classes; labels are %s", len(base), len(novel),
                "ids of --classes" if args.global_labels else "ids of base_classes.csv / novel_classes.csv")


def run_fewshot(args) -> None:
    """Subcommand ``fewshot``."""
    names = read_classes_csv(args.classes)
    train = read_list_file(args.train_list)
    _check_labels(train, len(names), args.train_list)
    out = Path(args.out_dir)
    for k in args.shots:
        for seed in args.seeds:
            picked = sample_per_class(train, k, seed, classes=range(len(names)), allow_fewer=args.allow_fewer)
            path = out / f"train_{k}shot_seed{seed}.txt"
            _common.write_list_file(path, [format_list_line(*e) for e in picked])
            logger.info("wrote %s (%d videos)", path, len(picked))


EPILOG = """\
examples:
  # ViFi-CLIP's UCF-101 base-to-novel protocol: base classes from their published file,
  # 16 shots per base class from split-1 train, three seeds; base/novel test from split-1 test
  python Dataset_creation_scripts/make_b2n_fewshot.py b2n --classes lists/ucf101_classes.csv \\
      --train-list data/lists/ucf101_train_split1.txt --test-list data/lists/ucf101_test_split1.txt \\
      --base-classes ucf_101_base_labels.csv --shots 16 --seeds 1 2 3 --out-dir data/lists/ucf101_b2n
      -> base_classes.csv novel_classes.csv base_train_16shot_seed{1,2,3}.txt base_test.txt novel_test.txt

  # without a published file: base = first half of the class list (or --rule frequency)
  python Dataset_creation_scripts/make_b2n_fewshot.py b2n --classes lists/hmdb51_classes.csv \\
      --train-list data/lists/hmdb51_train_split1.txt --test-list data/lists/hmdb51_test_split1.txt \\
      --out-dir data/lists/hmdb51_b2n

  # few-shot over all classes, K = 2 4 8 16
  python Dataset_creation_scripts/make_b2n_fewshot.py fewshot --classes lists/ssv2_classes.csv \\
      --train-list data/lists/ssv2_train.txt --shots 2 4 8 16 --seeds 1 --out-dir data/lists/ssv2_fewshot
      -> train_{2,4,8,16}shot_seed1.txt (labels: ids of --classes)
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[2:]),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("b2n", help="base-to-novel split", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Base-to-novel lists; see the main --help for the base/novel convention.")
    b.add_argument("--classes", required=True, help="class list 'id,name' that the input lists' labels index")
    b.add_argument("--train-list", required=True, help="full training list (e.g. split 1 train)")
    b.add_argument("--test-list", required=True, help="full test list (e.g. split 1 test)")
    b.add_argument("--base-classes", help="published base classes ('id,name' CSV or one name per line)")
    b.add_argument("--rule", choices=["first-half", "frequency"], default="first-half",
                   help="how to choose base classes without --base-classes (default: first-half)")
    b.add_argument("--shots", type=int, default=16, help="training videos per base class (default 16)")
    b.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one training set per seed (default 1 2 3)")
    b.add_argument("--global-labels", action="store_true",
                   help="keep the labels as ids of --classes instead of base/novel ids (then no base/novel CSVs)")
    b.add_argument("--allow-fewer", action="store_true", help="a class with fewer than K videos keeps all of them")
    b.add_argument("--out-dir", required=True)
    b.add_argument("-v", "--verbose", action="store_true")
    b.set_defaults(func=run_b2n)
    f = sub.add_parser("fewshot", help="K videos per class over all classes", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--classes", required=True, help="class list 'id,name' that the list's labels index")
    f.add_argument("--train-list", required=True, help="full training list (e.g. split 1 train)")
    f.add_argument("--shots", type=int, nargs="+", default=[2, 4, 8, 16], help="values of K (default 2 4 8 16)")
    f.add_argument("--seeds", type=int, nargs="+", default=[1], help="one training set per seed and K (default 1)")
    f.add_argument("--allow-fewer", action="store_true", help="a class with fewer than K videos keeps all of them")
    f.add_argument("--out-dir", required=True)
    f.add_argument("-v", "--verbose", action="store_true")
    f.set_defaults(func=run_fewshot)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    _common.setup_logging(args.verbose)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(_common.run_cli(main))
