"""The CLIP model: sizes of the released configs, and numbers equal to open_clip's and transformers' CLIP.

The equivalence tests build a random model in the other library, save it the way that library saves, read it
back through ``clip.load`` and compare features on random images and real token ids. Tiny sizes always run;
the ViT-B/16 ones are marked ``slow`` (they still run by default).
"""
from __future__ import annotations

import pytest
import torch

import clip
from clip.model import CLIP, CLIPConfig

TEXTS = ["a photo of a dog", "someone playing the violin on a stage", "", "jump " * 100]  # the last is truncated


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the error relative to the scale of the reference features."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its initial value (LayerNorms off 1/0, biases off 0, logit_scale too)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _features(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


# ------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name,open_clip_name", [("ViT-B/32", "ViT-B-32"), ("ViT-B/16", "ViT-B-16"),
                                                  ("ViT-L/14", "ViT-L-14"), ("ViT-L/14@336px", "ViT-L-14-336")])
def test_released_configs_match_open_clip(name, open_clip_name):
    """Each released name builds (on the meta device) with exactly open_clip's parameter names and shapes."""
    open_clip = pytest.importorskip("open_clip")
    with torch.device("meta"):
        ours = CLIP(clip.model_config(name))
        theirs = open_clip.CLIP(**open_clip.get_model_config(open_clip_name), quick_gelu=True)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert ours.visual.transformer.resblocks[0].attn.heads == theirs.visual.transformer.resblocks[0].attn.num_heads
    assert ours.transformer.resblocks[0].attn.heads == theirs.transformer.resblocks[0].attn.num_heads


def test_config_is_read_back_off_the_weights(tiny_clip_config, tiny_clip_state_dict):
    assert CLIPConfig.from_state_dict(tiny_clip_state_dict) == tiny_clip_config
    with torch.device("meta"):
        vit_l = CLIP(clip.model_config("ViT-L/14@336px"))
    assert CLIPConfig.from_state_dict(vit_l.state_dict()) == clip.model_config("ViT-L/14@336px")


# ------------------------------------------------------------------------------------- model behaviour


def test_text_features_ignore_padding_but_not_words(tiny_clip_state_dict):
    """Causal attention and EOT pooling: ids after EOT cannot matter; ids before it must."""
    model = clip.build_model(tiny_clip_state_dict)
    tokens = clip.tokenize(["a dog runs"])
    eot = int(tokens.argmax())
    noisy_padding = tokens.clone()
    noisy_padding[0, eot + 1:] = torch.randint(1, 40000, (77 - eot - 1,))
    other_word = tokens.clone()
    other_word[0, 2] = 2368  # "cat"
    base, padded, changed = (model.encode_text(t) for t in (tokens, noisy_padding, other_word))
    assert torch.allclose(base, padded, atol=1e-6)
    assert not torch.allclose(base, changed, atol=1e-3)


def test_wrong_image_size_is_refused(tiny_clip_state_dict):
    model = clip.build_model(tiny_clip_state_dict)
    with pytest.raises(ValueError, match="32x32"):
        model.encode_image(torch.zeros(1, 3, 64, 64))


def test_bf16_cast_runs_close_to_fp32(tiny_clip_state_dict):
    model = clip.build_model(tiny_clip_state_dict)
    images, tokens = torch.randn(2, 3, 32, 32), clip.tokenize(TEXTS)
    img32, txt32 = _features(model, images, tokens)
    img16, txt16 = _features(model.to(torch.bfloat16), images, tokens)
    assert img16.dtype == torch.bfloat16
    assert rel_diff(img16.float(), img32) < 0.05 and rel_diff(txt16.float(), txt32) < 0.05


def test_forward_gives_scaled_cosine_logits(tiny_clip_state_dict):
    model = clip.build_model(tiny_clip_state_dict)
    images, tokens = torch.randn(2, 3, 32, 32), clip.tokenize(TEXTS)
    with torch.no_grad():
        per_image, per_text = model(images, tokens)
        img, txt = _features(model, images, tokens)
    expected = model.logit_scale.exp() * torch.nn.functional.normalize(img, dim=-1) @ \
        torch.nn.functional.normalize(txt, dim=-1).t()
    assert per_image.shape == (2, 4) and torch.allclose(per_image, expected, atol=1e-5)
    assert torch.equal(per_text, per_image.t())


# ----------------------------------------------------------------------------------- open_clip equality


def _open_clip_equivalence(tmp_path, embed_dim, vision_cfg, text_cfg, batch, **load_kwargs):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    theirs = open_clip.CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu=True).eval()
    _perturb_(theirs, seed=1)
    path = tmp_path / "open_clip_state_dict.pt"
    torch.save(theirs.state_dict(), path)
    ours = clip.load(path, **load_kwargs)
    size = vision_cfg["image_size"]
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    tokens = clip.tokenize(TEXTS)
    (img, txt), (img_ref, txt_ref) = _features(ours, images, tokens), _features(theirs, images, tokens)
    assert torch.allclose(ours.logit_scale, theirs.logit_scale)
    return rel_diff(img, img_ref), rel_diff(txt, txt_ref), (ours, theirs, images, tokens, path)


def test_open_clip_equivalence_tiny(tmp_path):
    vision = dict(layers=2, width=128, patch_size=8, image_size=32)  # head_width 64 -> 2 heads, inferred
    text = dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2)
    img, txt, _ = _open_clip_equivalence(tmp_path, 64, vision, text, batch=2)
    print(f"open_clip tiny: max relative difference image {img:.2e}, text {txt:.2e}")
    assert img < 1e-5 and txt < 1e-5, (img, txt)


def test_open_clip_equivalence_tiny_explicit_heads(tmp_path):
    """Head counts are not in the weights: passing them must reproduce open_clip, guessing must not."""
    vision = dict(layers=2, width=64, patch_size=8, image_size=32, head_width=16)  # 4 heads
    text = dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)
    img, txt, (_, theirs, images, tokens, path) = _open_clip_equivalence(
        tmp_path, 32, vision, text, batch=2, vision_heads=4, text_heads=4)
    print(f"open_clip tiny, 4 heads: max relative difference image {img:.2e}, text {txt:.2e}")
    assert img < 1e-5 and txt < 1e-5, (img, txt)
    guessed = clip.load(path)  # width // 64 = 1 head
    img_1, txt_1 = _features(guessed, images, tokens)
    img_ref, txt_ref = _features(theirs, images, tokens)
    assert rel_diff(img_1, img_ref) > 1e-3 and rel_diff(txt_1, txt_ref) > 1e-3


@pytest.mark.slow
def test_open_clip_equivalence_vit_b16(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    cfg = open_clip.get_model_config("ViT-B-16")
    img, txt, (ours, *_) = _open_clip_equivalence(tmp_path, cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"],
                                                  batch=2)
    assert ours.config == clip.model_config("ViT-B/16")
    print(f"open_clip ViT-B/16: max relative difference image {img:.2e}, text {txt:.2e}")
    assert img < 1e-5 and txt < 1e-5, (img, txt)


# -------------------------------------------------------------------------------- transformers equality


def _hf_config(text_width, text_layers, text_heads, vision_width, vision_layers, vision_heads, image_size, patch,
               embed_dim):
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return transformers.CLIPConfig(
        text_config=dict(hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=text_layers,
                         num_attention_heads=text_heads, vocab_size=49408, max_position_embeddings=77,
                         eos_token_id=49407, bos_token_id=49406, **common),
        vision_config=dict(hidden_size=vision_width, intermediate_size=4 * vision_width,
                           num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                           image_size=image_size, patch_size=patch, **common),
        projection_dim=embed_dim)


def _hf_features(model, images, tokens):
    with torch.no_grad():
        img, txt = model.get_image_features(pixel_values=images), model.get_text_features(input_ids=tokens)
    # transformers 5 returns output objects whose pooler_output holds the projected features; 4.x tensors.
    return tuple(x if isinstance(x, torch.Tensor) else x.pooler_output for x in (img, txt))


def _hf_equivalence(tmp_path, config, batch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    theirs = transformers.CLIPModel(config).eval()
    _perturb_(theirs, seed=3)
    folder = tmp_path / "hf_clip"
    theirs.save_pretrained(folder)
    ours = clip.load(folder)  # head counts come from config.json
    size = config.vision_config.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(4))
    tokens = clip.tokenize(TEXTS)
    (img, txt), (img_ref, txt_ref) = _features(ours, images, tokens), _hf_features(theirs, images, tokens)
    assert torch.allclose(ours.logit_scale, theirs.logit_scale)
    return rel_diff(img, img_ref), rel_diff(txt, txt_ref), ours


def test_transformers_equivalence_tiny(tmp_path):
    # 4 heads of width 16: only right if the loader takes the head counts from config.json.
    config = _hf_config(64, 2, 4, 64, 2, 4, image_size=32, patch=8, embed_dim=32)
    img, txt, ours = _hf_equivalence(tmp_path, config, batch=2)
    assert ours.visual.transformer.resblocks[0].attn.heads == 4
    print(f"transformers tiny: max relative difference image {img:.2e}, text {txt:.2e}")
    assert img < 1e-5 and txt < 1e-5, (img, txt)


@pytest.mark.slow
def test_transformers_equivalence_vit_b16(tmp_path):
    config = _hf_config(512, 12, 8, 768, 12, 12, image_size=224, patch=16, embed_dim=512)
    img, txt, ours = _hf_equivalence(tmp_path, config, batch=2)
    assert ours.config == clip.model_config("ViT-B/16")
    print(f"transformers ViT-B/16: max relative difference image {img:.2e}, text {txt:.2e}")
    assert img < 1e-5 and txt < 1e-5, (img, txt)
