"""Tests of predict.py: the same top-1 and probabilities as test.py's scorer, the output formats, and exit status
2 with a one-line message (no traceback) for bad input."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Dataset_creation_scripts"))

import engine  # noqa: E402
from modules import factory  # noqa: E402
from conftest import TINY_CLIP, random_clip_opts, save_tiny_t2l  # noqa: E402
import predict  # noqa: E402
from datasets import VideoDataset  # noqa: E402

TINY = TINY_CLIP
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random T2L checkpoint of ours; T2L tensors perturbed so that adapters and tokens matter."""
    return save_tiny_t2l(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def reference(ckpt):
    """test.py's model, loaded the way test.py loads it."""
    from utils.config import load_config

    cfg = load_config(str(REPO / "configs/demo/demo_test.yaml"),
                      [*random_clip_opts(TINY), "network.random_seed=0", "data.input_size=32"])
    return factory.load_eval_model(cfg, str(ckpt))


def reference_scores(reference, list_file, root, classes, descriptions, mode):
    """test.py's probabilities (N, K) for every video of a list."""
    _, tokens = engine.class_tokens(str(classes), str(descriptions) if descriptions else None, mode)
    text_emb = engine.encode_class_texts(reference, tokens, CPU)
    ds = VideoDataset(str(list_file), root=str(root), num_frames=8, mode="test", input_size=32, on_error="raise")
    scores, _, _ = engine.score_dataset(reference, ds, text_emb, CPU, batch_size=8, num_workers=0)
    return scores, [r.path for r in ds.records]


def run_predict(capsys, *args):
    rc = predict.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("mode", ["descriptions", "templates"])
def test_same_top1_and_probabilities_as_test_py(demo, ckpt, reference, capsys, mode):
    descriptions = demo / "descriptions.csv" if mode == "descriptions" else None
    scores, paths = reference_scores(reference, demo / "val.txt", demo / "frames", demo / "classes.csv", descriptions,
                                mode)
    for i in (0, 5, 10, 15):
        extra = ["--descriptions", descriptions] if descriptions else ["--templates"]
        rc, out, err = run_predict(capsys, paths[i], "--model", ckpt, "--classes", demo / "classes.csv", *extra,
                                   "--json", "-k", "8")
        assert rc == 0, err
        result = json.loads(out)
        assert result["text_mode"] == mode and result["num_classes"] == 8
        assert result["top"][0]["class_id"] == int(scores[i].argmax())
        probs = torch.zeros(8)
        for t in result["top"]:
            probs[t["class_id"]] = t["probability"]
        torch.testing.assert_close(probs, scores[i], atol=1e-5, rtol=0)


def test_video_file_and_comma_separated_classes(demo, ckpt, reference, capsys):
    scores, paths = reference_scores(reference, demo / "val_videos.txt", demo / "videos", demo / "classes.csv", None,
                                "templates")
    names = "moving left,moving right,moving up,moving down,growing,shrinking,rotating clockwise," \
            "rotating anticlockwise"
    rc, out, err = run_predict(capsys, paths[3], "--model", ckpt, "--classes", names, "--json", "-k", "100")
    assert rc == 0, err
    result = json.loads(out)
    assert [t["rank"] for t in result["top"]] == list(range(1, 9))  # k is clipped to the number of classes
    probs = [t["probability"] for t in result["top"]]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert result["top"][0]["class_id"] == int(scores[3].argmax())
    assert result["top"][0]["class"] == names.split(",")[int(scores[3].argmax())]


def test_command_line_table_and_bad_input_without_traceback(demo, ckpt, tmp_path):
    video = sorted((demo / "videos" / "val").glob("*/*.mp4"))[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(REPO / "predict.py"), str(video), "--model", str(ckpt), "--classes",
                          str(demo / "classes.csv"), "--descriptions", str(demo / "descriptions.csv"), "-k", "3"],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == f"video: {video}"
    assert lines[1].startswith("model: t2l:tiny.pt:") and "8 frames x 1 view(s), 32 px" in lines[1]
    assert lines[2].startswith("classes: 8 (descriptions, ") and lines[3] == ""
    assert re.fullmatch(r"rank\s+probability\s+class\s+id", lines[4])
    rows = [re.fullmatch(r"\s*(\d)\s+(0\.\d{4}|1\.0000)\s+(.+?)\s+(\d+)", line) for line in lines[5:]]
    assert len(rows) == 3 and all(rows)
    names = [line.split(",", 1)[1] for line in (demo / "classes.csv").read_text().splitlines()[1:]]
    assert [int(r.group(1)) for r in rows] == [1, 2, 3]
    assert [float(r.group(2)) for r in rows] == sorted((float(r.group(2)) for r in rows), reverse=True)
    assert all(names[int(r.group(4))] == r.group(3) for r in rows)

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    run = subprocess.run([sys.executable, str(REPO / "predict.py"), str(broken), "--model", str(ckpt), "--classes",
                          "a,b"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2 and run.stdout == ""
    assert "Traceback" not in run.stderr
    assert f"predict.py: error: {broken}" in run.stderr


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing_video", "video not found"),
    ("empty_video", "empty (0 bytes)"),
    ("missing_model", "model not found"),
    ("empty_names", "empty class list"),
    ("header_only_csv", "has no classes"),
    ("missing_csv", "class file not found"),
    ("bad_csv", "expected a class list CSV"),
    ("top_k_zero", "--top-k must be >= 1"),
])
def test_bad_input_exits_2_with_a_clear_message(demo, ckpt, tmp_path, capsys, case, expected):
    video, model, classes, extra = demo / "frames/val/growing/growing_000", ckpt, "a,b", []
    if case == "missing_video":
        video = tmp_path / "nope.mp4"
    elif case == "empty_video":
        video = _write(tmp_path / "empty.mp4", "")
    elif case == "missing_model":
        model = tmp_path / "nope.pt"
    elif case == "empty_names":
        classes = " , "
    elif case == "header_only_csv":
        classes = _write(tmp_path / "classes.csv", "id,name\n")
    elif case == "missing_csv":
        classes = tmp_path / "nope.csv"
    elif case == "bad_csv":
        classes = _write(tmp_path / "weird.csv", "a,b,c\n1,2,3\n")
    elif case == "top_k_zero":
        extra = ["-k", "0"]
    rc, out, err = run_predict(capsys, video, "--model", model, "--classes", classes, *extra)
    assert rc == 2 and out == ""
    assert "predict.py: error: " in err and expected in err.split("predict.py: error: ", 1)[1]
    assert "Traceback" not in err
