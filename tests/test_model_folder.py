"""Tests of the shareable model folder (``python -m modules.checkpoint export``, modules/model_folder.py).

A folder must give outputs identical to the checkpoint it came from, through every loader (features.load_model,
test.py's factory.load_eval_model), without any pickle being read; a pickle in its place is refused; the original
``python -m modules.checkpoint SRC DST`` converter still works.
"""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from features import load_model
from conftest import TINY_CLIP as TINY, save_tiny_t2l
from modules import factory, load_t2l, save_published
from modules.checkpoint import CheckpointError, main as checkpoint_main
from modules.model_folder import export_model_folder, is_model_folder, load_model_folder
from utils.checkpoint import atomic_save

REPO = Path(__file__).resolve().parents[1]
# the demo's random-CLIP option, so that the record of the backbone's initialisation travels too
BACKBONE = {"name_or_path": "random", "seed": 3, "config": {**TINY, "vision_positional_std": 0.5}}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny T2L checkpoint of ours (random CLIP with the demo's positional option), with training records."""
    return save_tiny_t2l(tmp_path_factory.mktemp("ckpt") / "last.pt", perturb_seed=11,
                         clip_config=BACKBONE["config"], clip_seed=3, epoch=4,
                         best={"demo_val": {"top1": 61.5, "epoch": 5}},
                         config={"data": {"train_list": "demo_data/train.txt"}})


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(5)
    clips = torch.randn(2, 1, 8, 3, 32, 32, generator=gen)
    return clips, ["a shape moving left", "a shape growing bigger", "juggling"]


def outputs(encoder, inputs):
    clips, texts = inputs
    video, frames = encoder.encode_clips(clips, return_frames=True)
    return video, frames, encoder.encode_texts(texts)


@pytest.mark.parametrize("full", [False, True])
def test_folder_gives_outputs_identical_to_its_checkpoint(ckpt, inputs, tmp_path, full):
    out = tmp_path / "model"
    args = ["export", str(ckpt), str(out)] + (["--full"] if full else [])
    assert checkpoint_main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "t2l-model" and config["weights"] == ("full" if full else "t2l")
    assert config["num_frames"] == 8 and config["backbone"]["seed"] == 3
    assert config["backbone"]["config"]["vision_positional_std"] == 0.5 and config["embed_dim"] == 32
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    reference = load_t2l(ckpt)
    t2l_keys = set(reference.trainable_state_dict())
    clip_keys = {"clip." + k for k in reference.clip.state_dict()}
    assert keys == (t2l_keys | clip_keys if full else t2l_keys)
    card = (out / "README.md").read_text()
    assert "RANDOMLY INITIALISED" in card and "61.50%" in card and config["weights_sha256"] in card
    ref, got = load_model(ckpt, device="cpu"), load_model(out, device="cpu")
    assert got.kind == "t2l" and got.identity["format"] == "folder"
    assert got.identity["sha256"] == config["weights_sha256"]
    for a, b in zip(outputs(ref, inputs), outputs(got, inputs)):
        assert torch.equal(a, b)
    # every tensor of the model, the frozen CLIP included, is the checkpoint's
    folder_model = load_model_folder(out)
    for (ka, a), (kb, b) in zip(reference.state_dict().items(), folder_model.state_dict().items()):
        assert ka == kb and torch.equal(a, b), ka


def test_full_folder_needs_no_backbone_and_no_pickle_is_read(ckpt, inputs, tmp_path, monkeypatch):
    out = tmp_path / "full"
    export_model_folder(ckpt, out, full=True)
    ref = load_model(ckpt, device="cpu")

    def refuse(*a, **k):
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr("modules.backbone.random_clip", refuse)  # the full folder carries its CLIP
    got = load_model(out, device="cpu")
    for a, b in zip(outputs(ref, inputs), outputs(got, inputs)):
        assert torch.equal(a, b)


def test_a_pickle_in_its_place_is_refused(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "model"
    export_model_folder(ckpt, out)
    weights = out / "model.safetensors"
    good = weights.read_bytes()
    # a torch.save pickle renamed to model.safetensors: refused before anything unpickles it
    torch.save(load_t2l(ckpt).trainable_state_dict(), weights)
    called = []
    monkeypatch.setattr(pickle, "Unpickler", lambda *a, **k: called.append(1))
    with pytest.raises(CheckpointError, match="is a pickle.*not safetensors.*refused"):
        load_model(out, device="cpu")
    assert not called
    # only a .pt beside the config: not read either
    weights.unlink()
    atomic_save({"x": torch.zeros(1)}, out / "model.pt")
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors; model\.pt is not read: pickles are never"):
        load_model_folder(out)
    # weights changed after the export: the recorded SHA-256 says so
    (out / "model.pt").unlink()
    weights.write_bytes(good[:-4] + bytes(4 * [7]))
    with pytest.raises(CheckpointError, match="changed or damaged after the export"):
        load_model_folder(out)


def test_test_py_loads_a_folder_and_scores_as_the_checkpoint(ckpt, tmp_path, inputs):
    from conftest import random_clip_opts
    from utils.config import load_config

    out = tmp_path / "model"
    export_model_folder(ckpt, out)
    cfg = load_config(str(REPO / "configs/demo/demo_test.yaml"),
                      [*random_clip_opts(TINY), "network.random_clip.vision_positional_std=0.5",
                       "network.random_seed=3", "data.input_size=32"])
    a = factory.load_eval_model(cfg, str(ckpt))
    b = factory.load_eval_model(cfg, str(out))
    clips = inputs[0][:, 0]
    with torch.no_grad():
        assert torch.equal(a.encode_video(clips)[0], b.encode_video(clips)[0])
    # test.py's input check takes a folder as --weights (and still names a missing one)
    from utils.config import ConfigError, check_paths

    check_paths(load_config(str(REPO / "configs/demo/demo_test.yaml"), ["eval.sets=[]",
                                                                       f"test.weights={json.dumps([str(out)])}"]), False)
    with pytest.raises(ConfigError, match="test.weights.0.: .*nowhere does not exist"):
        check_paths(load_config(str(REPO / "configs/demo/demo_test.yaml"),
                                ["eval.sets=[]", f"test.weights={json.dumps([str(tmp_path / 'nowhere')])}"]), False)
    # train.py's network.init_from takes a folder's T2L tensors too
    from modules.checkpoint import init_from_checkpoint

    fresh = factory.build_model(cfg)
    init_from_checkpoint(fresh, out)
    for (ka, x), (kb, y) in zip(fresh.trainable_state_dict().items(), a.trainable_state_dict().items()):
        assert ka == kb and torch.equal(x, y), ka
    # a folder trained on another random CLIP than the config's is refused, as a checkpoint is
    cfg_other = load_config(str(REPO / "configs/demo/demo_test.yaml"),
                            [*random_clip_opts(TINY), "network.random_seed=4", "data.input_size=32"])
    with pytest.raises(CheckpointError, match="seed 3"):
        factory.load_eval_model(cfg_other, str(out))


def test_published_checkpoint_exports_with_full_only_and_converter_still_works(ckpt, tmp_path, inputs):
    published = tmp_path / "published.pth"
    save_published(load_t2l(ckpt), published, half=False)
    with pytest.raises(CheckpointError, match="export with --full"):
        export_model_folder(published, tmp_path / "t2l_only")
    export_model_folder(published, tmp_path / "full", full=True)
    ref, got = load_model(published, device="cpu"), load_model(tmp_path / "full", device="cpu")
    for a, b in zip(outputs(ref, inputs), outputs(got, inputs)):
        assert torch.equal(a, b)
    # the original command line (no subcommand) and "convert", from a file and from a folder
    rc = subprocess.run([sys.executable, "-m", "modules.checkpoint", str(ckpt), str(tmp_path / "a.pth"), "--fp32"],
                        cwd=REPO, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    assert checkpoint_main(["convert", str(tmp_path / "full"), str(tmp_path / "b.pth"), "--fp32"]) == 0
    for name in ("a.pth", "b.pth"):
        model = load_t2l(tmp_path / name)
        for (ka, a), (kb, b) in zip(load_t2l(ckpt).trainable_state_dict().items(),
                                    model.trainable_state_dict().items()):
            assert ka == kb and torch.equal(a, b)


def test_export_refuses_to_overwrite_and_names_bad_folders(ckpt, tmp_path, capsys):
    out = tmp_path / "model"
    export_model_folder(ckpt, out)
    assert checkpoint_main(["export", str(ckpt), str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert checkpoint_main(["export", str(ckpt), str(out), "--overwrite", "--full"]) == 0
    assert json.loads((out / "config.json").read_text())["weights"] == "full"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a T2L model folder: refusing"):
        export_model_folder(ckpt, other, overwrite=True)
    assert (other / "todo.txt").read_text() == "mine"
    # a Hugging Face CLIP folder (config.json without our format) is not taken for a model folder
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "clip"}))
    assert not is_model_folder(hf) and is_model_folder(out)
