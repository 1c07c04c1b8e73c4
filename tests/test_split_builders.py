"""Tests of Dataset_creation_scripts/build_lists.py and make_b2n_fewshot.py on tiny fake official files."""

import json
import logging
import re
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "Dataset_creation_scripts"
sys.path.insert(0, str(SCRIPTS))

import build_lists  # noqa: E402
import make_b2n_fewshot  # noqa: E402
from _common import InputFormatError, read_list_file  # noqa: E402


def write(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def manifest(tmp_path, folders):
    return write(tmp_path / "frames" / "manifest.txt", "".join(f"{f} {n}\n" for f, n in folders))


# ------------------------------------------------------------------ UCF-101
@pytest.fixture
def ucf(tmp_path):
    sd = tmp_path / "ucfTrainTestlist"
    write(sd / "classInd.txt", "1 ApplyEyeMakeup\n2 HandstandPushups\n3 YoYo\n")
    write(sd / "trainlist01.txt",
          "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\n"
          "HandstandPushups/v_HandStandPushups_g08_c01.avi 2\r\n"
          "YoYo/v_YoYo_g09_c02.avi 3\r\n"
          "YoYo/v_YoYo_g10_c01.avi 3\r\n")
    write(sd / "testlist01.txt",
          "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\n"
          "HandstandPushups/v_HandStandPushups_g01_c02.avi\n")
    man = manifest(tmp_path, [
        ("UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01", 120),
        ("UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01", 90),
        ("UCF-101/HandstandPushups/v_HandStandPushups_g08_c01", 77),
        ("UCF-101/HandstandPushups/v_HandStandPushups_g01_c02", 60),
        ("UCF-101/YoYo/v_YoYo_g09_c02", 200),
        # v_YoYo_g10_c01 was never extracted
    ])
    classes = write(tmp_path / "ucf101_classes.csv", "id,name\n0,Apply Eye Makeup\n1,Handstand Pushups\n2,YoYo\n")
    return sd, man, classes


def test_ucf101_lists(tmp_path, ucf, caplog):
    sd, man, classes = ucf
    out = tmp_path / "lists"
    with caplog.at_level(logging.WARNING):
        assert build_lists.main(["ucf101", "--splits-dir", str(sd), "--manifest", str(man), "--classes", str(classes),
                                 "--out-dir", str(out), "--splits", "1"]) == 0
    assert (out / "ucf101_train_split1.txt").read_text() == (
        "UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01 120 0\n"
        "UCF-101/HandstandPushups/v_HandStandPushups_g08_c01 77 1\n"
        "UCF-101/YoYo/v_YoYo_g09_c02 200 2\n")
    assert (out / "ucf101_test_split1.txt").read_text() == (
        "UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01 90 0\n"
        "UCF-101/HandstandPushups/v_HandStandPushups_g01_c02 60 1\n")
    assert "1 videos of UCF-101 train split 1 have no frames" in caplog.text and "v_YoYo_g10_c01" in caplog.text
    with pytest.raises(ValueError, match="v_YoYo_g10_c01"):
        build_lists.main(["ucf101", "--splits-dir", str(sd), "--manifest", str(man), "--classes", str(classes),
                          "--out-dir", str(out), "--splits", "1", "--strict"])


def test_ucf101_bad_lines_name_file_and_line(tmp_path, ucf):
    sd, man, classes = ucf
    write(sd / "trainlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nYoYo/v_YoYo_g09_c02.avi three\n")
    with pytest.raises(InputFormatError, match=r"trainlist01\.txt:2: .*label 'three'"):
        build_lists.main(["ucf101", "--splits-dir", str(sd), "--manifest", str(man), "--classes", str(classes),
                          "--out-dir", str(tmp_path), "--splits", "1"])
    write(sd / "trainlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 3\n")
    with pytest.raises(InputFormatError, match=r"trainlist01\.txt:1: label 3 is 'YoYo'"):
        build_lists.read_ucf_split(sd / "trainlist01.txt", build_lists.read_ucf_class_ind(sd / "classInd.txt"), True)
    write(sd / "classInd.txt", "1 ApplyEyeMakeup\n2 HandstandPushups\nthree YoYo\n")
    with pytest.raises(InputFormatError, match=r"classInd\.txt:3"):
        build_lists.read_ucf_class_ind(sd / "classInd.txt")


def test_unknown_class_names_are_reported_not_guessed(tmp_path, ucf):
    sd, man, _ = ucf
    classes = write(tmp_path / "c.csv", "id,name\n0,Apply Eye Makeup\n1,Handstand Push-ups\n2,Yo-yo trick\n")
    with pytest.raises(ValueError, match=r"'YoYo'"):
        build_lists.main(["ucf101", "--splits-dir", str(sd), "--manifest", str(man), "--classes", str(classes),
                          "--out-dir", str(tmp_path / "o"), "--splits", "1"])


# ------------------------------------------------------------------ HMDB-51
def test_hmdb51_lists_and_errors(tmp_path):
    sd = tmp_path / "splits"
    write(sd / "brush_hair_test_split1.txt", "a_brush_hair_0.avi 1 \nb_brush_hair_1.avi 2 \nc_brush_hair_2.avi 0 \n")
    write(sd / "sword_exercise_test_split1.txt", "d_sword_exercise_0.avi 2\ne(1)!_sword_exercise_1.avi 1\n")
    write(sd / "brush_hair_test_split2.txt", "a_brush_hair_0.avi 2\n")  # other split: ignored with --splits 1
    man = manifest(tmp_path, [
        ("brush_hair/a_brush_hair_0", 50), ("brush_hair/b_brush_hair_1", 51), ("brush_hair/c_brush_hair_2", 52),
        ("sword_exercise/d_sword_exercise_0", 53), ("sword_exercise/e(1)!_sword_exercise_1", 54),
    ])
    classes = write(tmp_path / "hmdb.csv", "id,name\n0,sword exercise\n1,brush hair\n")
    out = tmp_path / "lists"
    build_lists.main(["hmdb51", "--splits-dir", str(sd), "--manifest", str(man), "--classes", str(classes),
                      "--out-dir", str(out), "--splits", "1"])
    assert (out / "hmdb51_train_split1.txt").read_text() == (
        "brush_hair/a_brush_hair_0 50 1\nsword_exercise/e(1)!_sword_exercise_1 54 0\n")
    assert (out / "hmdb51_test_split1.txt").read_text() == (
        "brush_hair/b_brush_hair_1 51 1\nsword_exercise/d_sword_exercise_0 53 0\n")
    write(sd / "sword_exercise_test_split1.txt", "d_sword_exercise_0.avi 2\ne_sword_exercise_1.avi 3\n")
    with pytest.raises(InputFormatError, match=r"sword_exercise_test_split1\.txt:2: expected '<video>\.avi <0\|1\|2>'"):
        build_lists.read_hmdb_splits(sd, 1)


# ------------------------------------------------------------------ Kinetics
def test_kinetics_lists(tmp_path):
    csv_path = write(tmp_path / "val.csv",
                     "label,youtube_id,time_start,time_end,split\n"
                     "abseiling,--abc,14,24,val\n"
                     "air drumming,xyz_1,0,10,val\n"
                     "\"passing American football (in game)\",q9,5,15,val\n"
                     "air drumming,missing,3,13,val\n"
                     "abseiling,byid,7,17,val\n")
    man = manifest(tmp_path, [
        ("val/abseiling/--abc_000014_000024", 250),  # class-folder layout
        ("xyz_1_000000_000010", 300),  # flat layout
        ("val/passing_American_football_(in_game)/q9_000005_000015", 240),
        ("abseiling/byid", 100),  # a mirror that names clips by YouTube id alone
    ])
    classes = write(tmp_path / "k.csv", 'id,name\n0,abseiling\n1,air drumming\n2,"passing American football (in game)"\n')
    out = tmp_path / "k400_val.txt"
    build_lists.main(["kinetics", "--csv", str(csv_path), "--manifest", str(man), "--classes", str(classes), "--out", str(out)])
    assert out.read_text() == (
        "val/abseiling/--abc_000014_000024 250 0\n"
        "xyz_1_000000_000010 300 1\n"
        "val/passing_American_football_(in_game)/q9_000005_000015 240 2\n"
        "abseiling/byid 100 0\n")
    # A subset class list (K-600's new classes) with --skip-unknown-classes.
    sub = write(tmp_path / "sub.csv", "id,name\n0,air drumming\n")
    with pytest.raises(ValueError, match="abseiling"):
        build_lists.main(["kinetics", "--csv", str(csv_path), "--manifest", str(man), "--classes", str(sub), "--out", str(out)])
    build_lists.main(["kinetics", "--csv", str(csv_path), "--manifest", str(man), "--classes", str(sub), "--out", str(out),
                      "--skip-unknown-classes"])
    assert out.read_text() == "xyz_1_000000_000010 300 0\n"
    write(csv_path, "label,youtube_id,time_start,time_end,split\nabseiling,--abc,14,24,val\nabseiling,zz,1.5,11,val\n")
    with pytest.raises(InputFormatError, match=r"val\.csv:3: time_start/time_end"):
        build_lists.read_kinetics_csv(csv_path)
    write(csv_path, "label,youtube_id,start,end\n")
    with pytest.raises(InputFormatError, match=r"val\.csv:1: missing column"):
        build_lists.read_kinetics_csv(csv_path)


# ------------------------------------------------------------------ Something-Something v2
def test_ssv2_lists_and_errors(tmp_path):
    labels = write(tmp_path / "labels.json", json.dumps({
        "Putting number of something onto something": "0", "Something falling like a rock": "1",
        "Taking something from somewhere": "2"}))
    val = write(tmp_path / "validation.json", json.dumps([
        {"id": "74225", "label": "putting 3 coins onto a box", "template": "Putting [number of] [something] onto [something]",
         "placeholders": ["3", "coins", "a box"]},
        {"id": "116154", "label": "pen falling like a rock", "template": "[Something] falling like a rock"},
        {"id": "9", "label": "taking a cup from a table", "template": "Taking [something] from [somewhere]"},
    ], indent=1))
    man = manifest(tmp_path, [("74225", 45), ("116154", 30), ("9", 52)])
    classes = write(tmp_path / "ssv2.csv",
                    "id,name\n0,Taking something from somewhere\n1,Something falling like a rock\n"
                    "2,Putting number of something onto something\n")
    out = tmp_path / "ssv2_val.txt"
    build_lists.main(["ssv2", "--labels", str(labels), "--split-json", str(val), "--manifest", str(man),
                      "--classes", str(classes), "--out", str(out)])
    assert out.read_text() == "74225 45 2\n116154 30 1\n9 52 0\n"
    broken = write(tmp_path / "broken.json", '[\n {"id": "1", "template": "x"},\n {"id": "2" "template": "y"}\n]')
    with pytest.raises(InputFormatError, match=r"broken\.json:3: invalid JSON"):
        build_lists.read_ssv2_split(broken)
    test_json = write(tmp_path / "test.json", json.dumps([{"id": "5"}]))
    with pytest.raises(InputFormatError, match=r"entry #0 .*no 'template'"):
        build_lists.read_ssv2_split(test_json)


# ------------------------------------------------------------------ base-to-novel and few-shot
def fake_lists(tmp_path, num_classes=5, per_class=10):
    classes = write(tmp_path / "classes.csv", "id,name\n" + "".join(f"{i},class {i}\n" for i in range(num_classes)))
    train = write(tmp_path / "train.txt", "".join(f"c{c}/train_{c}_{i:02d} {30 + i} {c}\n"
                                                  for c in range(num_classes) for i in range(per_class + c)))
    test = write(tmp_path / "test.txt", "".join(f"c{c}/test_{c}_{i} {20 + i} {c}\n" for c in range(num_classes) for i in range(3)))
    return classes, train, test


def test_fewshot_k_per_class_deterministic_and_nested(tmp_path):
    classes, train, _ = fake_lists(tmp_path)
    args = ["fewshot", "--classes", str(classes), "--train-list", str(train), "--shots", "2", "4", "--seeds", "1", "2"]
    make_b2n_fewshot.main(args + ["--out-dir", str(tmp_path / "a")])
    make_b2n_fewshot.main(args + ["--out-dir", str(tmp_path / "b")])
    for k in (2, 4):
        for s in (1, 2):
            name = f"train_{k}shot_seed{s}.txt"
            a = read_list_file(tmp_path / "a" / name)
            assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()  # same seed, same output
            assert sorted(lab for _, _, lab in a) == sorted(list(range(5)) * k)  # exactly K per class
            assert all(f.startswith(f"c{lab}/train_{lab}_") for f, _, lab in a)
    s1 = (tmp_path / "a" / "train_4shot_seed1.txt").read_text()
    assert s1 != (tmp_path / "a" / "train_4shot_seed2.txt").read_text()  # different seed, different draw
    assert set((tmp_path / "a" / "train_2shot_seed1.txt").read_text().splitlines()) <= set(s1.splitlines())


def test_sampling_is_pinned_across_machines():
    # Golden value: the SHA-256 ranking must not change with Python's hash seed, NumPy or the platform.
    entries = [(f"v{i}", 10, 0) for i in range(10)]
    picked = make_b2n_fewshot.sample_per_class(entries, 3, seed=1)
    assert [e[0] for e in picked] == ["v2", "v4", "v9"]  # the 3 smallest sha256("1:v<i>")


def test_fewshot_too_few_videos(tmp_path):
    classes, train, _ = fake_lists(tmp_path, per_class=3)
    with pytest.raises(ValueError, match="fewer than 4"):
        make_b2n_fewshot.main(["fewshot", "--classes", str(classes), "--train-list", str(train), "--shots", "4",
                               "--out-dir", str(tmp_path / "o")])
    make_b2n_fewshot.main(["fewshot", "--classes", str(classes), "--train-list", str(train), "--shots", "4",
                           "--out-dir", str(tmp_path / "o"), "--allow-fewer"])
    labels = [lab for _, _, lab in read_list_file(tmp_path / "o" / "train_4shot_seed1.txt")]
    assert labels.count(0) == 3 and labels.count(1) == 4


def test_b2n_first_half(tmp_path):
    classes, train, test = fake_lists(tmp_path)
    out = tmp_path / "b2n"
    make_b2n_fewshot.main(["b2n", "--classes", str(classes), "--train-list", str(train), "--test-list", str(test),
                           "--shots", "3", "--seeds", "1", "2", "3", "--out-dir", str(out)])
    assert (out / "base_classes.csv").read_text() == "id,name\n0,class 0\n1,class 1\n2,class 2\n"  # ceil(5/2) = 3
    assert (out / "novel_classes.csv").read_text() == "id,name\n0,class 3\n1,class 4\n"
    for s in (1, 2, 3):
        rows = read_list_file(out / f"base_train_3shot_seed{s}.txt")
        assert sorted(lab for _, _, lab in rows) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len({(out / f"base_train_3shot_seed{s}.txt").read_text() for s in (1, 2, 3)}) == 3
    novel = read_list_file(out / "novel_test.txt")
    assert [(f, lab) for f, _, lab in novel] == [(f"c{c}/test_{c}_{i}", c - 3) for c in (3, 4) for i in range(3)]
    assert len(read_list_file(out / "base_test.txt")) == 9


def test_b2n_published_base_list_sets_order_and_labels(tmp_path):
    classes, train, test = fake_lists(tmp_path)
    base = write(tmp_path / "base_labels.csv", "id,name\n0,class 4\n1,class 1\n")
    out = tmp_path / "b2n"
    make_b2n_fewshot.main(["b2n", "--classes", str(classes), "--train-list", str(train), "--test-list", str(test),
                           "--base-classes", str(base), "--shots", "2", "--seeds", "7", "--out-dir", str(out)])
    assert (out / "base_classes.csv").read_text() == "id,name\n0,class 4\n1,class 1\n"
    assert (out / "novel_classes.csv").read_text() == "id,name\n0,class 0\n1,class 2\n2,class 3\n"
    rows = read_list_file(out / "base_train_2shot_seed7.txt")
    assert [(f.split("/")[0], lab) for f, _, lab in rows] == [("c4", 0), ("c4", 0), ("c1", 1), ("c1", 1)]
    bad = write(tmp_path / "bad.txt", "class 1\nclass 9\n")
    with pytest.raises(ValueError, match="'class 9'"):
        make_b2n_fewshot.main(["b2n", "--classes", str(classes), "--train-list", str(train), "--test-list", str(test),
                               "--base-classes", str(bad), "--out-dir", str(out)])


def test_b2n_frequency_rule(tmp_path):
    classes, train, test = fake_lists(tmp_path)  # class c has 10 + c training videos
    base, novel = make_b2n_fewshot.choose_base_classes(
        make_b2n_fewshot.read_classes_csv(classes), read_list_file(train), rule="frequency")
    assert (base, novel) == ([2, 3, 4], [0, 1])


def test_list_file_errors_name_the_line(tmp_path):
    bad = write(tmp_path / "l.txt", "a/b 10 0\na/c ten 1\n")
    with pytest.raises(ValueError, match=r"l\.txt:2: num_frames must be an integer, got 'ten'"):
        read_list_file(bad)


# ------------------------------------------------------------------ the tools read and write as train.py reads
@pytest.mark.parametrize("rows, error", [
    # An unquoted comma in a name: the tools used to join the fields; train.py refuses the row.
    ("0,Apply Eye Makeup\n1,Handstand, Pushups\n2,YoYo\n", r"ucf101_classes\.csv:3: expected 2 fields 'id,name'"),
    # Ids out of order: the tools used to sort them; train.py needs them in order.
    ("1,Handstand Pushups\n0,Apply Eye Makeup\n2,YoYo\n", r"ucf101_classes\.csv:2: ids must be 0\.\.K-1 in order"),
])
def test_a_class_list_train_py_would_refuse_is_refused_by_the_tools_naming_file_and_line(tmp_path, ucf, rows,
                                                                                          error):
    sd, man, _ = ucf
    classes = write(tmp_path / "ucf101_classes.csv", "id,name\n" + rows)
    out = tmp_path / "lists"
    with pytest.raises(ValueError, match=error):
        build_lists.main(["ucf101", "--splits-dir", str(sd), "--manifest", str(man), "--classes", str(classes),
                          "--out-dir", str(out), "--splits", "1"])
    assert not out.exists() or not any(out.iterdir())
    from datasets.lists import load_class_list
    with pytest.raises(ValueError, match=error):  # the same message as train.py's
        load_class_list(str(classes))


def test_written_lists_and_class_lists_are_read_back_with_the_library_readers(tmp_path):
    import _common
    from datasets.lists import read_list_file as read_records

    path = tmp_path / "train.txt"
    assert _common.write_list_file(path, [_common.format_list_line("class a/v 1", 30, 0)]) == 1
    assert [(r.path, r.num_frames, r.label) for r in read_records(str(path))] == [("class a/v 1", 30, 0)]
    before = path.read_bytes()
    for bad, line in ((" lead", 2), ("line\nbreak", 2), ("", 2)):  # each would read back as another entry
        lines = [_common.format_list_line("ok", 5, 0), _common.format_list_line(bad, 7, 1)]
        with pytest.raises(InputFormatError, match=rf"{re.escape(str(path))}:{line}: the entry {re.escape(repr(bad))} "
                                                   rf"would be read back by train.py and test.py"):
            _common.write_list_file(path, lines)
        assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["train.txt"]
    classes = tmp_path / "classes.csv"
    _common.write_classes_csv(classes, ["Apply, Eye", "b"])
    assert _common.read_classes_csv(classes) == ["Apply, Eye", "b"]
    with pytest.raises(InputFormatError, match=rf"{re.escape(str(classes))}:3: class 1 ' b' would be read back .* as "
                                               rf"'b'"):
        _common.write_classes_csv(classes, ["a", " b"])
    assert _common.read_classes_csv(classes) == ["Apply, Eye", "b"]
