"""clip.load / clip.load_state_dict: every weight format, the download cache, and clear errors on bad input.

Nothing here touches the network: downloads go to a throw-away HTTP server on 127.0.0.1, and the offline case
points the release address at a closed local port.
"""
from __future__ import annotations

import http.server
import os
import pickle
import socket
import threading
import time
import zipfile

import pytest
import torch
from torch import nn

import clip
import clip.pretrained as pretrained
from clip import CLIPLoadError
from clip.torchscript import read_torchscript_state_dict

# torch.jit.script/save, used here only to make test archives, warn that they are deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


def _assert_same_weights(model, state_dict):
    ours = model.state_dict()
    assert set(ours) == set(state_dict)
    for key, value in state_dict.items():
        assert ours[key].dtype == torch.float32, key
        assert torch.equal(ours[key], value.float()), key


# --------------------------------------------------------------------------------- TorchScript archives


class _Node(nn.Module):
    """A scriptable module that only holds parameters and children, like the leaves of OpenAI's module tree."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _openai_module_tree(state_dict: dict) -> nn.Module:
    """A module tree whose state-dict keys are the given OpenAI keys, built from the kinds of modules OpenAI's
    archive holds: nn.MultiheadAttention for ``attn``, nn.Sequential for ``resblocks``, an ``attn_mask``
    tensor attribute in each text block, and ``input_resolution``-style tensor attributes on the root."""
    root = _Node()
    modules = {"": root}

    def module_at(path: str) -> nn.Module:
        if path not in modules:
            parent_path, _, name = path.rpartition(".")
            parent = module_at(parent_path)
            if isinstance(parent, nn.MultiheadAttention):  # its out_proj exists already
                modules[path] = getattr(parent, name)
                return modules[path]
            if name == "attn":
                weight = state_dict[f"{path}.in_proj_weight"]
                child = nn.MultiheadAttention(weight.shape[1], 1)
            elif name == "resblocks":
                child = nn.Sequential()
            else:
                child = _Node()
            parent.add_module(name, child)
            modules[path] = child
        return modules[path]

    for key, value in state_dict.items():
        path, _, name = key.rpartition(".")
        module = module_at(path)
        if isinstance(module, nn.MultiheadAttention) or path.endswith("attn.out_proj"):
            getattr(module, name).data = value.clone()  # an existing parameter of the torch module
        else:
            module.register_parameter(name, nn.Parameter(value.clone()))
    for block in root.transformer.resblocks:
        block.attn_mask = torch.full((77, 77), float("-inf")).triu(1)
    root.input_resolution = torch.tensor(32)
    root.context_length = torch.tensor(77)
    root.vocab_size = torch.tensor(49408)
    return root


def _save_torchscript(state_dict: dict, path) -> None:
    scripted = torch.jit.script(_openai_module_tree(state_dict))
    torch.jit.save(scripted, str(path))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torchscript_archive_loads_without_running_code(tmp_path, monkeypatch, tiny_clip_state_dict, dtype):
    sd = {k: v.to(dtype) for k, v in tiny_clip_state_dict.items()}
    path = tmp_path / "ViT-tiny.pt"
    _save_torchscript(sd, path)

    def no_jit(*args, **kwargs):
        raise AssertionError("torch.jit.load must not be called")
    monkeypatch.setattr(torch.jit, "load", no_jit)

    raw = read_torchscript_state_dict(path)
    assert raw["transformer.resblocks.0.attn_mask"].shape == (77, 77) and int(raw["input_resolution"]) == 32
    assert raw["visual.conv1.weight"].dtype == dtype
    model = clip.load(path)
    _assert_same_weights(model, sd)  # attn_mask and the scalar attributes are dropped, all weights kept
    assert model.source_identity == {"name_or_path": str(path), "sha256": clip.file_sha256(path)}
    with torch.no_grad():
        expected = clip.build_model(sd).encode_image(torch.ones(1, 3, 32, 32))
        assert torch.equal(model.encode_image(torch.ones(1, 3, 32, 32)), expected)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _torchscript_zip(path, data_pkl: bytes) -> None:
    """A zip laid out like a TorchScript archive, with the given data.pkl."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", data_pkl)
        zf.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        zf.writestr("evil/code/__torch__.py", "")
        zf.writestr("evil/version", "3\n")


def test_malicious_torchscript_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    _torchscript_zip(path, pickle.dumps({"visual": _Exploit(marker)}, protocol=2))
    with pytest.raises(CLIPLoadError, match=r"evil\.pt.*forbidden global"):
        clip.load(path)
    assert not marker.exists()


def test_malicious_plain_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_state_dict.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1), "x": _Exploit(marker)}, path)
    with pytest.raises(CLIPLoadError, match=r"refusing to unpickle .*evil_state_dict\.pt"):
        clip.load(path)
    assert not marker.exists()


def test_damaged_torchscript_archive(tmp_path, tiny_clip_state_dict):
    path = tmp_path / "ts.pt"
    _save_torchscript(tiny_clip_state_dict, path)
    # Drop one tensor storage: the archive still opens, the pickle refers to a missing entry.
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(damaged, "w") as dst:
        for item in src.infolist():
            if item.filename.split("/")[-2:] != ["data", "0"]:  # the first tensor storage
                dst.writestr(item, src.read(item))
    with pytest.raises(CLIPLoadError, match=r"damaged\.pt.*data/0"):
        clip.load(damaged)


# ------------------------------------------------------------------------------------ plain state dicts


def test_state_dict_formats_and_wrappers(tmp_path, tiny_clip_state_dict):
    from safetensors.torch import save_file
    sd = tiny_clip_state_dict
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}}
    compiled = {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}}
    half = {k: v.half() for k, v in sd.items()}
    torch.save(wrapped, tmp_path / "open_clip_epoch_3.pt")
    torch.save(compiled, tmp_path / "compiled.pth")
    torch.save(half, tmp_path / "half.bin")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "weights.safetensors")
    for name in ("open_clip_epoch_3.pt", "compiled.pth", "weights.safetensors"):
        model = clip.load(tmp_path / name)
        _assert_same_weights(model, sd)
        assert not model.training
    model = clip.load(tmp_path / "half.bin")
    _assert_same_weights(model, half)  # fp16 files give an fp32 model


def test_load_state_dict_returns_openai_layout(tiny_clip_file, tiny_clip_state_dict):
    sd = clip.load_state_dict(tiny_clip_file)
    assert set(sd) == set(tiny_clip_state_dict)
    assert all(torch.equal(sd[k], v) for k, v in tiny_clip_state_dict.items())


def test_model_goes_to_the_requested_device(tiny_clip_file):
    model = clip.load(str(tiny_clip_file), device="meta")
    assert model.visual.conv1.weight.device.type == "meta"


# --------------------------------------------------------------------------------------- Hugging Face


def _hf_tiny(tmp_path, heads=2):
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, hidden_size=64, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=heads)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, eos_token_id=49407, **common),
        vision_config=dict(image_size=32, patch_size=8, **common), projection_dim=32)
    torch.manual_seed(0)
    return transformers.CLIPModel(config).eval()


def test_hf_key_mapping_is_explicit(tmp_path):
    hf = _hf_tiny(tmp_path)
    sd = hf.state_dict()
    ours = clip.convert_hf_state_dict(sd)
    pre = "vision_model.encoder.layers.1.self_attn."
    in_proj = ours["visual.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(in_proj[:64], sd[pre + "q_proj.weight"])
    assert torch.equal(in_proj[64:128], sd[pre + "k_proj.weight"])
    assert torch.equal(in_proj[128:], sd[pre + "v_proj.weight"])
    assert torch.equal(ours["transformer.resblocks.0.attn.in_proj_bias"][64:128],
                       sd["text_model.encoder.layers.0.self_attn.k_proj.bias"])
    assert torch.equal(ours["visual.proj"], sd["visual_projection.weight"].t())
    assert torch.equal(ours["text_projection"], sd["text_projection.weight"].t())
    assert torch.equal(ours["visual.ln_pre.weight"], sd["vision_model.pre_layrnorm.weight"])
    assert torch.equal(ours["transformer.resblocks.1.ln_2.bias"], sd["text_model.encoder.layers.1.layer_norm2.bias"])
    assert torch.equal(ours["visual.transformer.resblocks.0.mlp.c_proj.weight"],
                       sd["vision_model.encoder.layers.0.mlp.fc2.weight"])
    assert torch.equal(ours["positional_embedding"], sd["text_model.embeddings.position_embedding.weight"])
    with torch.device("meta"):
        expected = clip.CLIP(clip.CLIPConfig.from_state_dict(ours)).state_dict()
    assert set(ours) == set(expected)  # every key maps, none left over
    with pytest.raises(CLIPLoadError, match="vision_model.head.weight"):
        clip.convert_hf_state_dict({**sd, "vision_model.head.weight": torch.zeros(1)})


def test_hf_file_sharded_folder_and_config_checks(tmp_path):
    hf = _hf_tiny(tmp_path, heads=4)
    folder = tmp_path / "sharded"
    hf.save_pretrained(folder, max_shard_size="5MB")
    assert (folder / "model.safetensors.index.json").exists()
    model = clip.load(folder)
    assert model.transformer.resblocks[0].attn.heads == 4  # from config.json
    single = tmp_path / "single"
    hf.save_pretrained(single)
    file_model = clip.load(single / "model.safetensors")  # a file: heads from the config.json beside it
    assert file_model.visual.transformer.resblocks[0].attn.heads == 4
    _assert_same_weights(file_model, model.state_dict())

    text = (single / "config.json").read_text().replace('"quick_gelu"', '"gelu"')
    (single / "config.json").write_text(text)
    with pytest.raises(CLIPLoadError, match=r"config\.json.*gelu"):
        clip.load(single)
    (single / "config.json").write_text("{\n  \"model_type\": \"clip\",\n  oops\n}")
    with pytest.raises(CLIPLoadError, match=r"config\.json, line 3"):
        clip.load(single)


# ------------------------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(CLIPLoadError, match=r"nowhere\.pt does not exist"):
        clip.load(tmp_path / "nowhere.pt")
    with pytest.raises(CLIPLoadError, match="known names"):
        clip.load("ViT-H/14")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_empty_and_truncated_files(tmp_path, tiny_clip_state_dict, suffix):
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(CLIPLoadError, match=rf"empty{suffix} is empty"):
        clip.load(empty)
    full = tmp_path / f"full{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(tiny_clip_state_dict, full)
    else:
        torch.save(tiny_clip_state_dict, full)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CLIPLoadError, match=rf"cut{suffix}.*truncated"):
        clip.load(cut)


def test_truncated_torchscript_archive(tmp_path, tiny_clip_state_dict):
    full = tmp_path / "ts.pt"
    _save_torchscript(tiny_clip_state_dict, full)
    cut = tmp_path / "ts_cut.pt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CLIPLoadError, match=r"ts_cut\.pt.*truncated"):
        clip.load(cut)


def test_other_architectures_are_refused(tmp_path, tiny_clip_state_dict):
    resnet = {"visual.conv1.weight": torch.zeros(32, 3, 3, 3), "visual.layer1.0.conv1.weight": torch.zeros(1),
              "visual.attnpool.positional_embedding": torch.zeros(50, 2048)}
    torch.save(resnet, tmp_path / "RN50.pt")
    with pytest.raises(CLIPLoadError, match=r"RN50\.pt holds a ResNet CLIP"):
        clip.load(tmp_path / "RN50.pt")
    torch.save({"fc.weight": torch.zeros(10, 5), "fc.bias": torch.zeros(10)}, tmp_path / "linear.pt")
    with pytest.raises(CLIPLoadError, match=r"linear\.pt does not hold a ViT CLIP.*fc\.weight"):
        clip.load(tmp_path / "linear.pt")
    torch.save({"epoch": 1, "args": "x"}, tmp_path / "no_tensors.pt")
    with pytest.raises(CLIPLoadError, match=r"no_tensors\.pt holds no tensors"):
        clip.load(tmp_path / "no_tensors.pt")
    layer_scale = dict(tiny_clip_state_dict, **{"transformer.resblocks.0.ls_1.gamma": torch.ones(64)})
    torch.save(layer_scale, tmp_path / "layer_scale.pt")
    with pytest.raises(CLIPLoadError, match=r"layer_scale\.pt.*unexpected transformer\.resblocks\.0\.ls_1\.gamma"):
        clip.load(tmp_path / "layer_scale.pt")
    partial = {k: v for k, v in tiny_clip_state_dict.items() if k != "visual.transformer.resblocks.1.ln_2.bias"}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CLIPLoadError, match=r"partial\.pt.*missing visual\.transformer\.resblocks\.1\.ln_2\.bias"):
        clip.load(tmp_path / "partial.pt")


def test_folders_without_weights_or_config(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(CLIPLoadError, match=r"hf has no weights: expected model\.safetensors or pytorch_model\.bin"):
        clip.load(hf)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(CLIPLoadError, match=r"bare is a folder but has no config\.json"):
        clip.load(bare)


def test_jit_true_is_refused(tiny_clip_file):
    with pytest.raises(ValueError, match="jit=True"):
        clip.load(tiny_clip_file, jit=True)


# ---------------------------------------------------------------------------------------- download cache


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _serve(folder):
    """A throw-away HTTP server for ``folder`` on 127.0.0.1; returns (server, port)."""
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def _fake_release(monkeypatch, url_base: str, sha256: str):
    spec = pretrained.PretrainedSpec(f"{url_base}/{sha256}/ViT-B-16.pt", clip.model_config("ViT-B/16"))
    monkeypatch.setitem(pretrained._MODELS, "ViT-B/16", spec)
    return spec


def test_offline_fails_fast_with_instructions(tmp_path, monkeypatch, no_proxy):
    with socket.socket() as s:  # a local port with nothing listening: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = _fake_release(monkeypatch, f"http://127.0.0.1:{port}/clip/models", "0" * 64)
    cache = tmp_path / "cache"
    start = time.monotonic()
    with pytest.raises(CLIPLoadError) as err:
        clip.load("ViT-B/16", download_root=cache)
    assert time.monotonic() - start < 10
    message = str(err.value)
    for needed in (str(cache), "ViT-B-16.pt", spec.url, str(cache / "ViT-B-16.pt"), "T2L_CLIP_CACHE"):
        assert needed in message
    assert not cache.exists() or not any(cache.iterdir())  # no partial file left behind


def test_hanging_name_lookup_is_bounded(tmp_path, monkeypatch, no_proxy):
    """A machine whose DNS never answers must still fail fast: the lookup has its own deadline."""
    release = threading.Event()

    def hanging_lookup(*args, **kwargs):
        release.wait(60)
        raise OSError("released")
    monkeypatch.setattr(pretrained.socket, "getaddrinfo", hanging_lookup)
    monkeypatch.setattr(pretrained, "CONNECT_TIMEOUT_S", 0.5)
    _fake_release(monkeypatch, "https://download.invalid/clip/models", "0" * 64)
    start = time.monotonic()
    try:
        with pytest.raises(CLIPLoadError, match="resolving download.invalid took more than"):
            clip.load("ViT-B/16", download_root=tmp_path / "cache")
        assert time.monotonic() - start < 5
    finally:
        release.set()


def test_cache_folder_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("T2L_CLIP_CACHE", str(tmp_path / "env_cache"))
    assert clip.cache_dir() == tmp_path / "env_cache"
    assert clip.cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("T2L_CLIP_CACHE")
    assert clip.cache_dir() == pretrained.Path("~/.cache/clip").expanduser()


def test_cached_file_is_used_without_network(tmp_path, monkeypatch, tiny_clip_file):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "ViT-B-16.pt").write_bytes(tiny_clip_file.read_bytes())
    sha = clip.file_sha256(tiny_clip_file)
    _fake_release(monkeypatch, "http://unreachable.invalid/clip/models", sha)

    def no_network(*args, **kwargs):
        raise AssertionError("the network must not be used when the cache holds the file")
    monkeypatch.setattr(pretrained.urllib.request, "urlopen", no_network)
    monkeypatch.setattr(pretrained.socket, "getaddrinfo", no_network)
    model = clip.load("ViT-B/16", download_root=cache)
    assert model.source_identity == {"name_or_path": "ViT-B/16", "sha256": sha}


def test_cached_file_with_wrong_checksum_is_refused(tmp_path, monkeypatch, tiny_clip_file):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "ViT-B-16.pt").write_bytes(tiny_clip_file.read_bytes())
    _fake_release(monkeypatch, "http://unreachable.invalid/clip/models", "ab" * 32)
    with pytest.raises(CLIPLoadError, match=r"ViT-B-16\.pt for ViT-B/16 have SHA-256 [0-9a-f]{64}, but the release"):
        clip.load("ViT-B/16", download_root=cache)
    assert (cache / "ViT-B-16.pt").read_bytes() == tiny_clip_file.read_bytes()  # never silently replaced


def test_download_is_verified_and_atomic(tmp_path, monkeypatch, no_proxy, tiny_clip_file):
    sha = clip.file_sha256(tiny_clip_file)
    served = tmp_path / "served"
    (served / "clip" / "models" / sha).mkdir(parents=True)
    (served / "clip" / "models" / sha / "ViT-B-16.pt").write_bytes(tiny_clip_file.read_bytes())
    server, port = _serve(served)
    try:
        _fake_release(monkeypatch, f"http://127.0.0.1:{port}/clip/models", sha)
        cache = tmp_path / "cache"
        model = clip.load("ViT-B/16", download_root=cache)
        assert sorted(p.name for p in cache.iterdir()) == ["ViT-B-16.pt"]  # no temporary file left
        assert clip.file_sha256(cache / "ViT-B-16.pt") == sha and model.source_identity["sha256"] == sha

        # The server now serves other bytes under the same address: the download is refused and discarded.
        (served / "clip" / "models" / sha / "ViT-B-16.pt").write_bytes(b"corrupted" * 100)
        other_cache = tmp_path / "other_cache"
        with pytest.raises(CLIPLoadError, match=r"has SHA-256 [0-9a-f]{64}, expected"):
            clip.download("ViT-B/16", other_cache)
        assert not other_cache.exists() or not any(other_cache.iterdir())
    finally:
        server.shutdown()
        server.server_close()


def test_available_models_and_release_addresses():
    assert clip.available_models() == ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
    for name in clip.available_models():
        spec = pretrained.get_spec(name)
        assert spec.url.startswith("https://openaipublic.azureedge.net/clip/models/")
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.filename == name.replace("/", "-").replace("@", "-") + ".pt"
