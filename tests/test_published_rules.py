"""The published T2L code's rules, pinned by facts written out from its formulas and files (FIDELITY.md, "The rules,
and where each lives"). No third-party code runs here: every expected value below is spelled out by hand.
The frame rule is pinned in tests/test_sampling.py and the Pillow bicubic view in tests/test_datasets.py."""
from __future__ import annotations

import pytest
import torch

from modules import TEMPLATES, class_texts, read_descriptions, tokenize_class_texts
from modules.text import name_key


# ----------------------------------------------------------------------------------------------- texts
def test_the_sixteen_templates_are_the_published_strings():
    assert TEMPLATES == (
        "a photo of action {}", "a picture of action {}", "Human action of {}", "{}, an action",
        "{} this is an action", "{}, a video of action", "Playing action of {}", "{}",
        "Playing a kind of action, {}", "Doing a kind of action, {}", "Look, the human is {}",
        "Can you recognize the action of {}?", "Video classification of {}", "A video of {}",
        "The man is {}", "The woman is {}")
    assert not any(t.endswith(".") for t in TEMPLATES)
    texts = class_texts(["brush_hair", "kick_ball"], mode="templates")
    assert len(texts) == 16 and texts[4] == ["brush hair this is an action", "kick ball this is an action"]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_a_published_description_csv_is_read_as_the_published_code_reads_it(tmp_path):
    # Published header and layout: descriptions that start with blank lines, one with a line break inside.
    f = _write(tmp_path / "HMDB_gpt.csv",
               'SNo,Class Name,GPT3 discription\n1,brush hair,"\n\nBrushing hair is done with a brush."\n'
               '2,kick ball,"1. Swing the\nleg.\n\n2. Hit."\n')
    d = read_descriptions(f)
    # The published reader removes line breaks (row[2].replace('\n', '')): "theleg" becomes one word.
    assert d == {"brush hair": "Brushing hair is done with a brush.", "kick ball": "1. Swing theleg.2. Hit."}
    # Our own files keep their words apart: the tokenizer turns a line break into a space.
    ours = _write(tmp_path / "ours.csv", 'SNo,Class Name,Description\n0,kick_ball,"1. Swing the\nleg.\n\n2. Hit."\n')
    assert read_descriptions(ours)["kick_ball"] == "1. Swing the\nleg.\n\n2. Hit."
    a = tokenize_class_texts([[d["kick ball"]]])
    b = tokenize_class_texts([[read_descriptions(ours)["kick_ball"]]])
    assert not torch.equal(a, b)


def test_class_names_meet_their_descriptions_across_spellings(tmp_path):
    f = _write(tmp_path / "d.csv", 'SNo,Class Name,GPT3 discription\n1,brush hair,"Brushing."\n2,Kick Ball,"Kicking."\n')
    texts = class_texts(["brush_hair", "kick_ball"], read_descriptions(f), source=str(f))
    assert texts == [["Brushing.", "Kicking."]]
    assert name_key("Brush_Hair") == name_key("brush  hair") == "brush hair"
    # Two spellings of one class in one file are a duplicate, named with both lines.
    dup = _write(tmp_path / "dup.csv", 'SNo,Class Name,Description\n0,brush_hair,"a"\n1,brush hair,"b"\n')
    with pytest.raises(ValueError, match=r"dup.csv:3: class 'brush hair' is described twice \(line 2: 'brush_hair'\)"):
        read_descriptions(dup)


def test_a_class_without_a_description_is_refused_unless_asked_for(tmp_path):
    f = _write(tmp_path / "d.csv", 'SNo,Class Name,Description\n0,brush_hair,"Brushing."\n')
    with pytest.raises(ValueError, match=r"d.csv: 1 of 2 classes have no description: kick_ball"):
        class_texts(["brush_hair", "kick_ball"], read_descriptions(f), source=str(f))
    assert class_texts(["brush_hair", "kick_ball"], read_descriptions(f), missing="template") == \
        [["Brushing.", TEMPLATES[0].format("kick ball")]]


# ----------------------------------------------------------------------------------------------- class orders
def _names(path):
    from datasets import load_class_list

    return load_class_list(str(path))


def test_the_published_class_orders_are_ours_permuted():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "lists"
    ours, pub = _names(root / "hmdb51_classes.csv"), _names(root / "published_order/hmdb51_classes.csv")
    assert sorted(ours) == sorted(pub) == ours  # ours is alphabetical
    swapped = [(i, a, b) for i, (a, b) in enumerate(zip(ours, pub)) if a != b]
    assert swapped == [(20, "kick", "kick_ball"), (21, "kick_ball", "kick"), (44, "sword", "sword_exercise"),
                       (45, "sword_exercise", "sword")]
    k600, k600_pub = _names(root / "kinetics_600_classes.csv"), _names(root / "published_order/kinetics_600_classes.csv")
    assert sorted(k600) == sorted(k600_pub) and k600 != k600_pub
    assert k600_pub[:2] == ["tying knot (not on a tie)", "swinging baseball bat"]
    exclusive = _names(root / "published_order/kinetics_600_exclusive_232_classes.csv")
    new220, k400 = set(_names(root / "kinetics_600_new_220_classes.csv")), set(_names(root / "kinetics_400_classes.csv"))
    assert len(exclusive) == 232 and new220 <= set(exclusive) <= set(k600) and not set(exclusive) & k400
    assert len(set(exclusive) - new220) == 12


# ----------------------------------------------------------------------------------------------- published assets
def _frames(folder, n, seed):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img_{i + 1:05d}.jpg")


HMDB_VIDEOS = [  # (name as the published split file writes it, published label id)
    ("Movie_kick_ball_f_cm_np1_fr_med_0.avi", 20), ("Match_kick_ball_f_nm_np1_le_goo_1.avi", 20),
    ("Film_kick_f_cm_np1_ri_bad_1.avi", 21), ("Fight_kick_u_cm_np1_fr_med_2.avi", 21),
    ("Dojo_sword_exercise_f_cm_np1_fr_med_0.avi", 44), ("Drill_sword_exercise_u_cm_np1_ba_goo_3.avi", 44),
    ("Duel_sword_u_cm_np2_le_med_5.avi", 45), ("Knight_sword_f_cm_np2_ri_med_2.avi", 45),
    ("Family_hug_u_cm_np2_fr_goo_0.avi", 18), ("Friends_hug_f_nm_np2_le_med_1.avi", 18),
]


@pytest.fixture
def published_hmdb(tmp_path):
    """A published-style HMDB split file (the authors' absolute paths, the published label ids), frames in the
    published layout (one folder per video, named with its extension) and a published-format descriptions CSV."""
    from pathlib import Path

    root = tmp_path / "hmdb_frames"
    lines = []
    for k, (name, label) in enumerate(HMDB_VIDEOS):
        _frames(root / name, 9 + k, seed=k)
        lines.append(f"/their/machine/data_for_action_clip/hmdb/{name} {9 + k} {label}")
    split = tmp_path / "test.txt"
    split.write_text("\n".join(lines) + "\n")
    names = _names(Path(__file__).resolve().parents[1] / "lists/published_order/hmdb51_classes.csv")
    desc = tmp_path / "HMDB_gpt_Class_discription_new.csv"
    rows = [f'{i + 1},{n.replace("_", " ")},"\n\nA person doing {n.replace("_", " ")}, seen from the side."'
            for i, n in enumerate(names)]
    desc.write_text("SNo,Class Name,GPT3 discription\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return {"split": split, "root": root, "descriptions": desc}


def _tiny_published_checkpoint(cfg_opts, path):
    """A published-layout checkpoint of a T2L on the configured tiny random CLIP (what the authors' files hold)."""
    from modules import build_t2l, factory, save_published
    from utils.config import load_config

    cfg = load_config("configs/demo/demo_test.yaml", cfg_opts)
    torch.manual_seed(3)
    model = build_t2l(factory.build_clip(cfg), num_frames=cfg.data.num_frames)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("clip.") and name != "temporal_embedding":
                p.copy_(0.05 * torch.randn_like(p))
    save_published(model, path, epoch=7)
    return path


TINY = ["network.random_clip.image_resolution=32", "network.random_clip.vision_patch_size=8",
        "network.random_clip.vision_width=64", "network.random_clip.vision_heads=1",
        "network.random_clip.vision_layers=2", "network.random_clip.transformer_layers=1",
        "network.random_clip.embed_dim=32", "data.input_size=32", "data.num_workers=0", "eval.batch_size=3"]


def test_a_published_hmdb_split_file_is_scored_unedited(published_hmdb, tmp_path, monkeypatch, caplog):
    import json
    import logging
    from pathlib import Path

    import test as test_script
    from datasets import ListFileError

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    weights = _tiny_published_checkpoint(TINY, tmp_path / "published.pth")
    p = published_hmdb

    def sets(classes):
        return (f'eval.sets=[{{name: hmdb51, lists: ["{p["split"]}"], root: "{p["root"]}", classes: "{classes}", '
                f'descriptions: "{p["descriptions"]}", published_batch_size: 4, '
                f'paths: {{map: {{"/their/machine/data_for_action_clip/hmdb/": ""}}}}}}]')

    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        res = test_script.main(["--config", "configs/demo/demo_test.yaml", "--weights", str(weights), "--opts",
                                *TINY, f"output_dir={out}", sets("lists/published_order/hmdb51_classes.csv")])
    entry = res["results"]["hmdb51"]
    assert entry["num_videos"] == 10 and entry["num_classes"] == 51 and entry["splits"][0]["unreadable_videos"] == 0
    # every class met its description: no template fallback, no unmatched description
    assert not [r for r in caplog.records if "description" in r.getMessage()], caplog.text
    pub = json.loads((out / "results.json").read_text())["results"]["hmdb51"]["splits"][0]["published_drop_last"]
    assert (pub["batch_size"], pub["left_out"], pub["num_videos"]) == (4, 2, 8)
    # The same file against the alphabetical class list puts kick/kick_ball and sword/sword_exercise on each
    # other's texts: refused, naming the labels.
    with pytest.raises(ListFileError, match=r"label 20 is 'kick' in lists/hmdb51_classes.csv, but 2 of its 2 checked "
                                            r"videos are named like 'kick_ball'.*label 44 is 'sword'"):
        test_script.main(["--config", "configs/demo/demo_test.yaml", "--weights", str(weights), "--opts",
                          *TINY, f"output_dir={tmp_path / 'out2'}", sets("lists/hmdb51_classes.csv")])


def test_path_rules_turn_the_authors_paths_into_ours(tmp_path):
    import os

    from datasets import ListFileError, PathRules, read_list_file

    lst = tmp_path / "test.txt"
    lst.write_text("/authors/data/hmdb/a_kick_ball_0.avi 53 20\n/elsewhere/other/UCF/v_Biking_g01_c01 70 10\n")
    root = str(tmp_path / "frames")
    prefix = PathRules.from_options({"/authors/data/hmdb/": "", "/authors/data/": "elsewhere/"})
    recs = read_list_file(str(lst), root=root, paths=prefix)
    # the longest prefix wins and becomes relative to the root; a path no prefix matches is kept
    assert [r.path for r in recs] == [os.path.join(root, "a_kick_ball_0.avi"), "/elsewhere/other/UCF/v_Biking_g01_c01"]
    last = read_list_file(str(lst), root=root, paths=PathRules.from_options(keep_last=1, drop_extension=True))
    assert [r.path for r in last] == [os.path.join(root, "a_kick_ball_0"), os.path.join(root, "v_Biking_g01_c01")]
    assert [(r.num_frames, r.label, r.line) for r in last] == [(53, 20, 1), (70, 10, 2)]
    # by name: extract_frames.py's manifest lists <class>/<video> folders
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "manifest.txt").write_text("kick_ball/a_kick_ball_0 53\nBiking/v_Biking_g01_c01 70\n")
    by_name = PathRules.from_options(drop_extension=True, by_name=True)
    assert [r.path for r in read_list_file(str(lst), root=root, paths=by_name)] == [
        os.path.join(root, "kick_ball/a_kick_ball_0"), os.path.join(root, "Biking/v_Biking_g01_c01")]
    (tmp_path / "frames" / "manifest.txt").write_text("kick_ball/a_kick_ball_0 53\nkick/a_kick_ball_0 53\n")
    with pytest.raises(ListFileError, match=r"test.txt:1: paths.by_name: 'a_kick_ball_0' is twice among the folders"):
        read_list_file(str(lst), root=root, paths=by_name)
    (tmp_path / "frames" / "manifest.txt").write_text("kick_ball/a_kick_ball_0 53\n")
    with pytest.raises(ListFileError, match=r"test.txt:2: paths.by_name: 'v_Biking_g01_c01' is not among"):
        read_list_file(str(lst), root=root, paths=by_name)
    with pytest.raises(ListFileError, match=r"manifest.txt does not exist"):
        read_list_file(str(lst), root=str(tmp_path), paths=by_name)


# ----------------------------------------------------------------------------------------------- config converter
PUBLISHED_TRAIN_CONFIG = """\
resume:
pretrain: '/their/machine/exp/model_best.pt'
seed: 1024
weight_save_dir: 'Exp'
use_motion_loss: True
training_name: 'my_b2n_run'
T_Adapter: False
prompt:
    use: True
    INITIATION: 'random'
    DEEP: True
    DROPOUT: 0.1
data:
    dataset: HMDB51_base_to_novel
    modality: RGB
    num_segments: 8
    seg_length: 1
    batch_size: 20
    workers: 16
    image_tmpl: 'img_{:05d}.jpg'
    use_llm: True
    train_list: 'dataset_splits/HMDB/base_to_novel/hmdb_base_train.txt'
    val_list: 'dataset_splits/HMDB/base_to_novel/hmdb_base_val.txt'
    gpt_discription: '/their/machine/GPT_discription/HMDB_gpt_Class_discription_new.csv'
    label_list: 'dataset_splits/HMDB/base_to_novel/hmdb_base_train_class_list.csv'
    novel_val_list: 'dataset_splits/HMDB/base_to_novel/hmdb_novel_val.txt'
    novel_gpt_discription: 'GPT_discription/HMDB_gpt_Class_discription_new.csv'
    novel_label_list: 'dataset_splits/HMDB/base_to_novel/hmdb_novel_val_class_list.csv'
    index_bias: 1
    input_size: 224
    randaug:
        N: 2
        M: 9
    random_shift: False
network:
    arch: ViT-B/16
    init: True
    tsm: False
    drop_out: 0.1
    emb_dropout: 0.0
    type: clip_hmdb
    sim_header: "Transf"
    joint: False
solver:
    type: cosine
    epochs: 50
    optim: adamw
    lr: 1.e-4
    lr_warmup_step: 5
    momentum: 0.9
    weight_decay: 0.2
    clip_gradient: 20
    ratio: 1
logging:
    print_freq: 10
    eval_freq: 1
"""


def test_a_published_config_converts_with_every_key_accounted_for(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from utils.config import load_config

    src = tmp_path / "hmdb_base_to_novel.yaml"
    src.write_text(PUBLISHED_TRAIN_CONFIG)
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "utils.config", "convert", str(src), "--published-root",
                          "third_party/T2L", "--root", "data/hmdb51_frames"], cwd=repo, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    ours = tmp_path / "ours.yaml"
    ours.write_text(run.stdout)
    cfg = load_config(ours)  # a complete, valid config of ours
    assert (cfg.seed, cfg.data.num_frames, cfg.data.batch_size, cfg.data.num_workers) == (1024, 8, 20, 16)
    assert (cfg.solver.epochs, cfg.solver.lr, cfg.solver.warmup_epochs, cfg.solver.weight_decay) == (50, 1e-4, 5.0, 0.2)
    assert (cfg.solver.no_decay_for_1d, cfg.solver.lr_update_every, cfg.solver.precision) == (False, 10, "fp16-pure")
    assert (cfg.network.t2l.drop_path_rate, cfg.network.t2l.attention_dropout_rate) == (0.1, 0.1)
    assert cfg.network.t2l.temporal_tokens == "deep" and cfg.network.init_from == "/their/machine/exp/model_best.pt"
    assert cfg.data.train_sampling == "test" and cfg.eval.rules == "published" and cfg.data.paths.keep_last == 1
    assert cfg.data.train_list == "third_party/T2L/dataset_splits/HMDB/base_to_novel/hmdb_base_train.txt"
    # an absolute path into a folder of the published repository moves under it
    assert cfg.data.descriptions == "third_party/T2L/GPT_discription/HMDB_gpt_Class_discription_new.csv"
    sets = {s.name: s for s in cfg.eval.sets}
    assert set(sets) == {"hmdb51_base_to_novel_val", "novel"}
    assert sets["hmdb51_base_to_novel_val"].group == "base" and sets["novel"].group == "novel"
    assert sets["hmdb51_base_to_novel_val"].select_best and not sets["novel"].select_best
    assert all(s.published_batch_size == 20 and s.root == "data/hmdb51_frames" for s in cfg.eval.sets)
    # what has no counterpart is named, with why, in the header and on stderr; nothing else is left out
    dropped = {line.split(": not converted: ")[1].split(":")[0] for line in run.stderr.splitlines()
               if ": not converted: " in line}
    assert dropped == {"weight_save_dir", "training_name", "data.modality", "data.randaug", "network.type",
                       "network.sim_header", "solver.momentum", "solver.clip_gradient"}
    assert "#   data.randaug: {'N': 2, 'M': 9} -- RandAugment is not implemented" in run.stdout
    assert "solver.clip_gradient: 20 -- never used by the published train.py" in run.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  val_list: ''x/test.txt'\n")
    run = subprocess.run([sys.executable, "-m", "utils.config", "convert", str(bad)], cwd=repo, capture_output=True,
                         text=True)
    assert run.returncode == 2 and f"error: {bad}" in run.stderr and not run.stdout


# ----------------------------------------------------------------------------------------------- training from them
def test_a_published_checkpoint_starts_training_and_is_refused_by_resume(published_hmdb, tmp_path, monkeypatch):
    from pathlib import Path

    import train as train_script
    from modules import CheckpointError, factory
    from modules.checkpoint import init_from_checkpoint, published_to_ours, read_checkpoint
    from utils.config import load_config

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    weights = _tiny_published_checkpoint(TINY, tmp_path / "published.pth")
    cfg = load_config("configs/demo/demo_train.yaml", TINY)
    model = factory.build_model(cfg)
    init_from_checkpoint(model, weights)
    _, t2l_sd = published_to_ours(read_checkpoint(weights)["model_state_dict"])
    for name, p in model.named_parameters():
        if not name.startswith("clip."):
            assert torch.equal(p.detach(), t2l_sd[name].float()), name
    # another frozen CLIP (another seed) is not the published model: refused, naming a tensor
    other = factory.build_model(load_config("configs/demo/demo_train.yaml", TINY + ["network.random_seed=5"]))
    with pytest.raises(CheckpointError, match=r"its frozen CLIP differs from network.pretrained's in \d+ tensor"):
        init_from_checkpoint(other, weights)
    # train.py: --resume refuses it, naming the option to use; network.init_from trains from it
    lst = tmp_path / "train.txt"
    root = published_hmdb["root"]
    lst.write_text("".join(f"{root / name} 0 {label}\n" for name, label in HMDB_VIDEOS))
    opts = TINY + [f"output_dir={tmp_path / 'run'}", f"data.train_list={lst}", "data.root=null",
                   "data.classes=lists/published_order/hmdb51_classes.csv",
                   f"data.descriptions={published_hmdb['descriptions']}", "data.batch_size=5", "solver.epochs=1",
                   "eval.sets=[]"]
    with pytest.raises(ValueError, match=r"published T2L checkpoint.*set network.init_from"):
        train_script.main(["--config", "configs/demo/demo_train.yaml", "--resume", str(weights), "--opts", *opts])
    summary = train_script.main(["--config", "configs/demo/demo_train.yaml", "--opts", *opts,
                                 f"network.init_from={weights}"])
    assert summary["steps"] == 2
    assert f"T2L tensors initialised from {weights} (network.init_from)" in (tmp_path / "run" / "log.txt").read_text()


# ----------------------------------------------------------------------------------------------- K-600, both ways
@pytest.mark.parametrize("config, classes_file, count, over", [
    ("configs/K-600/K-600_zero_shot_testing.yaml", "lists/kinetics_600_new_220_classes.csv", 3, "class subsets"),
    ("configs/published/k600_zero_shot.yaml", "lists/published_order/kinetics_600_exclusive_232_classes.csv", 1,
     "splits"),
])
def test_both_k600_protocols_run_from_their_configs(config, classes_file, count, over, tmp_path, monkeypatch):
    """The standard form (220 new classes, three subsets of 160) and the published one (232 classes at once): each
    config as shipped, with only where the data lies changed."""
    import json
    from pathlib import Path

    import yaml

    import test as test_script

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    names = _names(repo / classes_file)
    root = tmp_path / "k600_frames"
    lines = []
    for k, label in enumerate([0, 5, 17, 100, 150, 219, 7, 42]):
        rel = f"{names[label].replace(' ', '_')}/vid{k:03d}_000010_000020"
        _frames(root / rel, 10 + k, seed=k)
        lines.append(f"{rel} {10 + k} {label}")
    lst = tmp_path / "val.txt"
    lst.write_text("\n".join(lines) + "\n")
    cfg = yaml.safe_load((repo / config).read_text())
    cfg["extends"] = str((repo / config).parent / cfg["extends"])
    s = cfg["eval"]["sets"][0]
    assert s["classes"] == classes_file and len(names) == (232 if "published" in config else 220)
    s.update(lists=[str(lst)], root=str(root), paths={"keep_last": 0}, descriptions="lists/kinetics_600_descriptions.csv")
    mine = tmp_path / "k600.yaml"
    mine.write_text(yaml.safe_dump(cfg))
    weights = _tiny_published_checkpoint(TINY, tmp_path / "published.pth")
    res = test_script.main(["--config", str(mine), "--weights", str(weights), "--opts", *TINY,
                            f"output_dir={tmp_path / 'out'}"])
    entry = res["results"][s["name"]]
    assert entry["num_classes"] == len(names) and entry["num_videos"] == 8
    assert (entry["aggregate"]["count"], entry["aggregate"]["over"]) == (count, over)
    written = json.loads((tmp_path / "out" / "results.json").read_text())["results"][s["name"]]
    assert written["num_classes"] == len(names)
