"""The published T2L code's rules, pinned by facts written out from its formulas and files (METHOD.md, "Published
code: the exact rules"). No third-party code runs here: every expected value below is spelled out by hand.
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
