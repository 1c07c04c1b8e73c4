"""The one model factory (modules.factory): what it loads, that it reads a file once, says one line, and that the one
frame-count check refuses a mismatch from every entry point with a message naming the file and the fix."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import TINY_CLIP, random_clip_opts, save_tiny_t2l  # noqa: E402
from modules import CheckpointError, build_t2l, factory, load_t2l, random_clip, save_published  # noqa: E402
from modules.model_folder import export_model_folder  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Our checkpoint, the same model in the published layout and as a model folder, and a plain CLIP state dict."""
    root = tmp_path_factory.mktemp("factory")
    ours = save_tiny_t2l(root / "tiny.pt")
    save_published(load_t2l(ours), root / "published.pth", half=False)
    export_model_folder(ours, root / "folder")
    torch.save(random_clip(TINY_CLIP, 0).state_dict(), root / "clip.pt")
    return {"ours": ours, "published": root / "published.pth", "folder": root / "folder", "clip": root / "clip.pt"}


def _cfg(num_frames: int = 8):
    from utils.config import load_config

    return load_config(str(REPO / "configs/demo/demo_test.yaml"),
                       [*random_clip_opts(TINY_CLIP), "network.random_seed=0", "data.input_size=32",
                        f"data.num_frames={num_frames}"])


def _count_torch_loads(monkeypatch) -> list:
    calls = []
    real = torch.load

    def counting(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("f"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    return calls


@pytest.mark.parametrize("name", ["ours", "published"])
def test_a_t2l_checkpoint_is_read_once_and_reported_in_one_line(files, name, monkeypatch, caplog):
    calls = _count_torch_loads(monkeypatch)
    with caplog.at_level(logging.INFO, logger="modules.factory"):
        loaded = factory.load_model(files[name])
    assert calls == [files[name]], "the checkpoint was read more than once (or not through torch.load)"
    assert loaded.kind == "t2l" and loaded.identity["format"] == name and loaded.num_frames == 8
    lines = [r.getMessage() for r in caplog.records if r.name == "modules.factory"]
    assert len(lines) == 1 and str(files[name]) in lines[0] and "8 frames" in lines[0], lines


def test_ours_published_and_folder_load_the_same_model_and_a_clip_file_the_baseline(files):
    x = torch.randn(2, 8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outs = {}
    for name in ("ours", "published", "folder"):
        loaded = factory.load_model(files[name])
        assert loaded.kind == "t2l" and loaded.identity["format"] == name
        with torch.no_grad():
            outs[name] = loaded.model.eval().encode_video(x)[0]
    torch.testing.assert_close(outs["published"], outs["ours"], atol=1e-6, rtol=0)
    assert torch.equal(outs["folder"], outs["ours"])
    assert factory.load_model(files["ours"]).identity["backbone"]["name_or_path"] == "random"
    base = factory.load_model(files["clip"])
    assert base.kind == "clip" and isinstance(base.model, factory.FrameAverageCLIP) and base.num_frames is None
    with torch.no_grad():
        video, frames = base.model.encode_video(x)
        ref = base.model.clip.encode_image(x.flatten(0, 1)).view(2, 8, -1).mean(1)
    assert torch.equal(video, ref) and frames.shape == (2, 8, TINY_CLIP["embed_dim"])
    assert factory.model_kind(files["clip"]) == "clip" and factory.model_kind(files["folder"]) == "t2l"


def test_test_py_takes_t2l_weights_only(files):
    with pytest.raises(CheckpointError, match=r"clip\.pt is neither a T2L checkpoint.*loaded with clip.load instead"):
        factory.load_eval_model(_cfg(), str(files["clip"]))
    assert isinstance(factory.load_eval_model(_cfg(), None), factory.FrameAverageCLIP)


def test_every_entry_point_refuses_another_frame_count_naming_the_file_and_the_fix(files, tmp_path, capsys):
    import predict
    from features import load_model
    from modules.checkpoint import init_from_checkpoint

    for name in ("ours", "published", "folder"):
        path = str(files[name])
        with pytest.raises(CheckpointError, match=rf"{path} was trained with 8 frames but data.num_frames is 4; "
                                                  rf"set --opts data.num_frames=8"):
            factory.load_eval_model(_cfg(4), path)  # test.py
        with pytest.raises(CheckpointError, match=rf"{path} was trained with 8 frames but num_frames is 16; leave "
                                                  rf"it unset or pass 8"):
            load_model(path, device="cpu", num_frames=16)  # features, extract_features.py, search.py
        model4 = build_t2l(random_clip(TINY_CLIP, 0), num_frames=4)
        with pytest.raises(CheckpointError, match=rf"{path} was trained with 8 frames but data.num_frames is 4"):
            init_from_checkpoint(model4, path)  # train.py's network.init_from
    video = tmp_path / "frames"
    video.mkdir()
    from PIL import Image

    for i in range(1, 9):
        Image.new("RGB", (40, 40), (10 * i, 0, 0)).save(video / f"img_{i:05d}.jpg")
    assert predict.main([str(video), "--model", str(files["ours"]), "--classes", "a,b", "--frames", "16"]) == 2
    assert "was trained with 8 frames but num_frames is 16" in capsys.readouterr().err
