"""utils/metrics.py and utils/protocols.py: accuracies, confusion matrices and evaluation protocols checked
against numbers worked out by hand."""
import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from utils.metrics import (accuracy_metrics, confusion_matrix, per_class_accuracy, save_confusion_png,
                           true_class_rank, write_per_class_csv)
from utils.protocols import base_novel_summary, class_subsets, harmonic_mean, mean_std, restrict_to_classes

REPO_ROOT = Path(__file__).resolve().parents[1]

# 7 videos, 6 classes; class 5 has no video. Ties are broken towards the lower class id.
SCORES = torch.tensor([
    [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # v0 label 0: rank 0
    [0.5, 0.5, 0.1, 0.1, 0.1, 0.1],  # v1 label 0: tied with class 1, class 0 wins the tie -> rank 0
    [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],  # v2 label 1: tied with class 0, which wins -> rank 1, predicted 0
    [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # v3 label 2: rank 2, predicted 0
    [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],  # v4 label 3: all tied, classes 0..2 come first -> rank 3, predicted 0
    [0.2, 0.3, 0.1, 0.4, 0.5, 0.6],  # v5 label 2: five classes score higher -> rank 5 (top-5 miss), predicted 5
    [0.0, 0.0, 0.0, 0.0, 1.0, 0.0],  # v6 label 4: rank 0
])
LABELS = torch.tensor([0, 0, 1, 2, 3, 2, 4])
NAMES = ["run", "jump", "swim", "climb", "dive", "fly"]


def test_true_class_rank_breaks_ties_towards_lower_class_id():
    assert true_class_rank(SCORES, LABELS).tolist() == [0, 0, 1, 2, 3, 5, 0]


def test_accuracy_metrics_by_hand():
    m = accuracy_metrics(SCORES, LABELS)
    assert m["top1"] == pytest.approx(100 * 3 / 7)  # v0, v1, v6
    assert m["top5"] == pytest.approx(100 * 6 / 7)  # all but v5
    # per-class top-1: class 0 2/2, class 1 0/1, class 2 0/2, class 3 0/1, class 4 1/1; class 5 has no video
    # and is left out (counting it as 0 would give 200/6 = 33.3).
    assert m["mean_class_acc"] == pytest.approx(40.0)
    assert m["num_videos"] == 7 and m["num_classes"] == 6
    assert all(isinstance(m[k], float) for k in ("top1", "top5", "mean_class_acc"))


def test_top5_is_top_k_when_fewer_than_five_classes():
    scores = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    labels = torch.tensor([0, 2])  # both last of three: top-1 wrong, top-min(5, 3) = top-3 right
    m = accuracy_metrics(scores, labels)
    assert m["top1"] == 0.0 and m["top5"] == 100.0


def test_accuracy_metrics_same_in_chunks_and_in_half_precision():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(300, 17, generator=g)
    labels = torch.randint(0, 17, (300,), generator=g)
    assert torch.equal(true_class_rank(scores, labels, chunk=7), true_class_rank(scores, labels))
    # half precision rounds many scores onto the same value, so ties are frequent there
    for s in (scores, (scores * 4).round().half()):
        ref = accuracy_metrics(s, labels)
        # an independent count: top-1 by argmax, top-5 by a stable descending sort (equal scores keep the
        # lower class id first)
        top1 = (s.argmax(1) == labels).double().mean() * 100
        order = torch.sort(s.float(), dim=1, descending=True, stable=True).indices[:, :5]
        top5 = (order == labels[:, None]).any(1).double().mean() * 100
        assert ref["top1"] == pytest.approx(float(top1)) and ref["top5"] == pytest.approx(float(top5))


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="labels must lie in 0..5"):
        accuracy_metrics(SCORES, torch.tensor([0, 0, 1, 2, 3, 2, 6]))
    with pytest.raises(ValueError, match="7 rows"):
        accuracy_metrics(SCORES, LABELS[:3])
    with pytest.raises(ValueError, match="NaN"):
        accuracy_metrics(torch.full((2, 3), float("nan")), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no videos"):
        accuracy_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_per_class_accuracy_and_csv(tmp_path):
    rows = per_class_accuracy(SCORES, LABELS, NAMES)
    assert [(r["id"], r["name"], r["num_videos"]) for r in rows] == [
        (0, "run", 2), (1, "jump", 1), (2, "swim", 2), (3, "climb", 1), (4, "dive", 1), (5, "fly", 0)]
    assert [r["top1"] for r in rows] == [100.0, 0.0, 0.0, 0.0, 100.0, None]
    path = tmp_path / "out" / "per_class.csv"
    write_per_class_csv(rows, path)
    with path.open(newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["id", "name", "num_videos", "top1"]
    assert table[1] == ["0", "run", "2", "100.0000"]
    assert table[6] == ["5", "fly", "0", ""]
    assert len(table) == 7
    assert [p.name for p in path.parent.iterdir()] == ["per_class.csv"]  # no temp file left behind
    with pytest.raises(ValueError, match="6 score columns"):
        per_class_accuracy(SCORES, LABELS, NAMES[:5])


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(SCORES, LABELS, 6)
    expected = torch.zeros(6, 6, dtype=torch.long)
    expected[0, 0] = 2  # v0, v1
    expected[1, 0] = 1  # v2 (tie goes to class 0)
    expected[2, 0] = 1  # v3
    expected[2, 5] = 1  # v5
    expected[3, 0] = 1  # v4 (all tied)
    expected[4, 4] = 1  # v6
    assert cm.dtype == torch.long
    assert torch.equal(cm, expected)
    assert int(cm.trace()) == 3 and int(cm.sum()) == 7
    with pytest.raises(ValueError, match="num_classes=5"):
        confusion_matrix(SCORES, LABELS, 5)


@pytest.mark.parametrize("k", [6, 400])
def test_confusion_png_is_a_valid_image(tmp_path, k):
    g = torch.Generator().manual_seed(k)
    labels = torch.arange(k).repeat(2)
    scores = torch.randn(2 * k, k, generator=g)
    names = NAMES if k == 6 else [f"class {i}" for i in range(k)]
    path = tmp_path / f"cm{k}.png"
    save_confusion_png(confusion_matrix(scores, labels, k), names, path, title=f"{k} classes")
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert 500 <= img.width <= 2000 and 500 <= img.height <= 2000
        img.load()
    with pytest.raises(ValueError, match="class names"):
        save_confusion_png(torch.zeros(3, 3, dtype=torch.long), ["a", "b"], tmp_path / "x.png")


def test_mean_std_by_hand():
    r = mean_std([52.0, 54.0, 56.0])
    assert r["mean"] == pytest.approx(54.0)
    assert r["std"] == pytest.approx(2.0)  # sample std: sqrt((4 + 0 + 4) / 2)
    assert mean_std([52.0, 54.0, 56.0], ddof=0)["std"] == pytest.approx((8 / 3) ** 0.5)  # numpy's default
    assert mean_std([79.1]) == {"mean": pytest.approx(79.1), "std": 0.0}
    with pytest.raises(ValueError, match="empty"):
        mean_std([])


def test_harmonic_mean_by_hand():
    # T2L's published K-400 base-to-novel row: 73.1 / 60.6 -> 66.3
    assert harmonic_mean(73.1, 60.6) == pytest.approx(2 * 73.1 * 60.6 / 133.7)
    assert harmonic_mean(73.1, 60.6) == pytest.approx(66.2657, abs=1e-4)
    assert harmonic_mean(50.0, 50.0) == pytest.approx(50.0)
    assert harmonic_mean(80.0, 0.0) == 0.0
    assert harmonic_mean(0.0, 0.0) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean(-1.0, 50.0)


def test_base_novel_summary_uses_hm_of_the_means():
    s = base_novel_summary([dict(base=70.0, novel=60.0), dict(base=80.0, novel=40.0)])
    assert s["base"] == pytest.approx(75.0) and s["novel"] == pytest.approx(50.0)
    assert s["hm"] == pytest.approx(60.0)  # 2*75*50/125, not the mean of the runs' HMs (58.97)
    assert [r["hm"] for r in s["runs"]] == pytest.approx([2 * 70 * 60 / 130, 2 * 80 * 40 / 120])
    with pytest.raises(ValueError, match="novel"):
        base_novel_summary([dict(base=70.0)])


def test_class_subsets_pinned_small_case():
    # Pinned output: a change of method, key string or ordering would change these ids and reshuffle
    # every published subset evaluation.
    assert class_subsets(10, 4, 3, seed=0) == [[2, 4, 7, 9], [0, 1, 6, 7], [0, 2, 3, 5]]
    # The documented method, re-derived here: order ids by SHA-256 of the key string, keep the first 4.
    key = lambda c: hashlib.sha256(f"t2l-class-subsets/0/0/0/{c}".encode("ascii")).digest()  # noqa: E731
    assert sorted(sorted(range(10), key=key)[:4]) == [2, 4, 7, 9]


def test_class_subsets_all_different_even_when_few_exist():
    subsets = class_subsets(4, 3, 4, seed=1)  # all 4 possible 3-of-4 subsets: collisions must be redrawn
    assert sorted(map(tuple, subsets)) == [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]
    with pytest.raises(ValueError, match="only 4 exist"):
        class_subsets(4, 3, 5, seed=1)
    with pytest.raises(ValueError):
        class_subsets(10, 11, 1, seed=0)


def test_class_subsets_k600_properties_and_same_in_a_fresh_process():
    subsets = class_subsets(220, 160, 3, seed=1234)
    assert len(subsets) == 3
    for s in subsets:
        assert len(s) == 160 and s == sorted(s) and len(set(s)) == 160
        assert all(isinstance(c, int) and 0 <= c < 220 for c in s)
    assert len({tuple(s) for s in subsets}) == 3
    assert class_subsets(220, 160, 3, seed=1235) != subsets  # the seed matters
    code = ("import json, sys; from utils.protocols import class_subsets; "
            "print(json.dumps(class_subsets(220, 160, 3, 1234))); assert 'torch' not in sys.modules")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == subsets


def test_restrict_to_classes_reindexes():
    scores = torch.tensor([
        [0.1, 0.9, 0.0, 0.2],  # label 1
        [0.8, 0.1, 0.0, 0.5],  # label 3: wrong among all 4 classes, right among {3, 1}
        [0.0, 0.0, 1.0, 0.0],  # label 2: dropped
        [0.0, 0.3, 0.0, 0.4],  # label 0: dropped
        [0.2, 0.6, 0.1, 0.3],  # label 1
    ])
    labels = torch.tensor([1, 3, 2, 0, 1])
    sub_scores, sub_labels = restrict_to_classes(scores, labels, [3, 1])
    assert sub_labels.tolist() == [1, 0, 1]  # class 3 -> 0, class 1 -> 1, video order kept
    assert torch.equal(sub_scores, torch.tensor([[0.2, 0.9], [0.5, 0.1], [0.3, 0.6]]))
    assert accuracy_metrics(scores, labels)["top1"] == pytest.approx(60.0)
    assert accuracy_metrics(sub_scores, sub_labels)["top1"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="repeated"):
        restrict_to_classes(scores, labels, [1, 1])
    with pytest.raises(ValueError, match="0..3"):
        restrict_to_classes(scores, labels, [4])
