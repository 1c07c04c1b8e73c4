"""T2L model, losses and checkpoints (issue 3): tiny random CLIPs, properties that catch real bugs."""
import math

import pytest
import torch

from clip.model import CLIP, CLIPConfig
from modules import (CheckpointError, T2LLoss, alignment_loss, build_t2l, load_t2l, make_checkpoint,
                     ours_to_published, random_clip, tfd_loss)
from modules.checkpoint import load_t2l_tensors
from utils.checkpoint import atomic_save

TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
            context_length=16, vocab_size=100, transformer_width=64, transformer_heads=1, transformer_layers=2,
            vision_heads=2)  # heads = width // 64, as OpenAI's loader infers them
VIT_B_16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                transformer_layers=12, vision_heads=12)


def tiny_clip(seed=0):
    clip_model = random_clip(TINY, seed)
    torch.manual_seed(seed)
    with torch.no_grad():  # make LayerNorm and biases non-trivial so that mix-ups show
        for name, p in clip_model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.02 * torch.randn_like(p))
    return clip_model


def randomise_t2l(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("clip."):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def text_tokens(n, length=16, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab - 1, (n, length), generator=g)
    for i in range(n):  # EOT (the largest id) at a varying position, zeros after it
        eot = 3 + i % (length - 3)
        tokens[i, eot] = vocab - 1
        tokens[i, eot + 1:] = 0
    return tokens


def videos(b=2, t=8, size=32, seed=0):
    return torch.randn(b, t, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_vit_b16_has_exactly_the_published_trainable_parameter_count():
    with torch.device("meta"):
        model = build_t2l(CLIP(CLIPConfig(**VIT_B_16)), num_frames=8)
    report = model.parameter_report()
    assert report["temporal_tokens"] == 73_728
    assert report["vision_adapters"] == 3_550_464
    assert report["text_adapters"] == 1_580_544
    assert report["other"] == 0
    assert report["trainable"] == 5_204_736


def test_shallow_and_no_token_variants_count():
    with torch.device("meta"):
        shallow = build_t2l(CLIP(CLIPConfig(**VIT_B_16)), num_frames=8, temporal_tokens="shallow")
        none = build_t2l(CLIP(CLIPConfig(**VIT_B_16)), num_frames=8, temporal_tokens="none", text_adapters=False)
    assert shallow.parameter_report()["temporal_tokens"] == 8 * 768
    assert none.parameter_report()["trainable"] == 3_550_464


def test_identity_initialisation_equals_plain_clip():
    clip_model = tiny_clip()
    model = build_t2l(clip_model, num_frames=8, temporal_tokens="none").eval()
    x = videos()
    tokens = text_tokens(5)
    with torch.no_grad():
        video_emb, frame_emb = model.encode_video(x)
        ref = clip_model.encode_image(x.flatten(0, 1)).view(2, 8, -1)
        assert (frame_emb - ref).abs().max() < 1e-6
        assert (video_emb - ref.mean(1)).abs().max() < 1e-6
        assert (model.encode_text(tokens) - clip_model.encode_text(tokens)).abs().max() < 1e-6


def test_temporal_tokens_change_the_output_and_trained_adapters_too():
    clip_model = tiny_clip()
    model = build_t2l(clip_model, num_frames=8).eval()
    x = videos()
    with torch.no_grad():
        _, frame_emb = model.encode_video(x)
        ref = clip_model.encode_image(x.flatten(0, 1)).view(2, 8, -1)
    assert (frame_emb - ref).abs().max() > 1e-4


def test_batch_independence_and_frame_order_sensitivity():
    model = randomise_t2l(build_t2l(tiny_clip(), num_frames=8)).eval()
    x = videos(3)
    other = x.clone()
    other[1:] = videos(2, seed=5)  # change every other video in the batch
    with torch.no_grad():
        a, fa = model.encode_video(x)
        b, fb = model.encode_video(other)
        alone, _ = model.encode_video(x[:1])
        rev, _ = model.encode_video(x.flip(1))
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(fa[0], fb[0], atol=1e-5)
    assert torch.allclose(a[0], alone[0], atol=1e-5)
    assert (rev[0] - a[0]).abs().max() > 1e-4  # temporal tokens see the order of the frames


def test_a_frame_sees_the_other_frames_of_its_own_video_only():
    model = randomise_t2l(build_t2l(tiny_clip(), num_frames=8)).eval()
    x = videos(2)
    y = x.clone()
    y[0, 5] = torch.randn(3, 32, 32)  # change one frame of video 0
    with torch.no_grad():
        _, fx = model.encode_video(x)
        _, fy = model.encode_video(y)
    assert (fx[0, 0] - fy[0, 0]).abs().max() > 1e-5  # frame 0 depends on frame 5 through the temporal tokens
    assert torch.allclose(fx[1], fy[1], atol=1e-6)  # the other video does not


def test_only_trainable_parameters_get_gradients():
    model = randomise_t2l(build_t2l(tiny_clip(), num_frames=8)).train()
    video_emb, frame_emb = model.encode_video(videos())
    text_emb = model.encode_text(text_tokens(2))
    loss, _ = T2LLoss()(video_emb, frame_emb, text_emb, torch.tensor([0, 1]), model.logit_scale)
    loss.backward()
    trainable = dict(model.trainable_parameters())
    assert set(trainable) == {n for n, _ in model.named_parameters() if not n.startswith("clip.")} - {
        "temporal_embedding"}
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    off = dict(prompt_dropout=0.0, drop_path_rate=0.0, attention_dropout_rate=0.0)
    a = randomise_t2l(build_t2l(tiny_clip(), num_frames=8, **off)).train()
    b = randomise_t2l(build_t2l(tiny_clip(), num_frames=8, activation_checkpointing=True, **off)).train()
    x = videos()
    grads = []
    for m in (a, b):
        v, f = m.encode_video(x)
        (v.square().sum() + m.encode_text(text_tokens(2)).square().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in m.trainable_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_padded_sequence_layout_gives_the_appending_path_exactly():
    """The published model keeps the summary's slot in the sequence (written in place per block); the N real
    tokens must get exactly what appending the summary and dropping it after attention gives."""
    torch.manual_seed(0)
    model = randomise_t2l(build_t2l(tiny_clip(), num_frames=8)).eval()
    x_in = videos()
    with torch.no_grad():
        _, frames = model.encode_video(x_in)
        visual = model.clip.visual
        B, T = x_in.shape[:2]
        x = visual.embed(x_in.flatten(0, 1))
        N, D = x.shape[1:]
        x = visual.ln_pre((x.view(B, T, N, D) + model.temporal_embedding[:, :, None]).view(B * T, N, D))
        for i in range(len(visual.transformer.resblocks)):
            x = model._vision_block(i, x, B, padded=False)
        reference = visual.head(x).view(B, T, -1)
    assert torch.equal(frames, reference)


def test_tfd_loss_by_hand():
    f = torch.tensor([[[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]]])  # (B=1, T=3, E=2)
    # central differences with replicated ends: t0: f1-f0, t1: f2-f0, t2: f2-f1; |.|/2 then mean
    diffs = torch.tensor([[2.0, 0.0], [4.0, 3.0], [2.0, 3.0]]) / 2
    c = diffs.mean()
    v = torch.tensor([[0.0, 2.0, 4.0], [1.0, 1.0, 4.0]]).var(dim=1, unbiased=True).mean()
    assert math.isclose(tfd_loss(f).item(), (1 / (1 + c + v)).item(), rel_tol=1e-6)
    assert math.isclose(c.item(), 14 / 12, rel_tol=1e-6)
    assert math.isclose(v.item(), (4.0 + 3.0) / 2, rel_tol=1e-6)


def test_alignment_loss_by_hand_with_tied_labels():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    labels = torch.tensor([3, 7, 3])  # videos 0 and 2 share a label: positives of each other
    scale = math.log(100.0)
    vn = v / v.norm(dim=1, keepdim=True)
    wn = w / w.norm(dim=1, keepdim=True)
    logits = 100.0 * vn @ wn.t()
    g = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    q = torch.softmax(10 * g, dim=1)

    def kl(q, logits):
        p = torch.log_softmax(logits, dim=1)
        return (q * (q.log() - p)).sum(1).mean()

    expected = (kl(q, logits) + kl(q, logits.t())) / 2
    got = alignment_loss(v, w, labels, torch.tensor(scale))
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-5)
    # a target that treated the tie as a negative would give a different value
    q_wrong = torch.softmax(10 * torch.eye(3), dim=1)
    assert abs(((kl(q_wrong, logits) + kl(q_wrong, logits.t())) / 2).item() - got.item()) > 1e-3


def test_wrong_number_of_frames_and_resolution_are_clear_errors():
    model = build_t2l(tiny_clip(), num_frames=8)
    with pytest.raises(ValueError, match=r"16 frames.*built for 8.*temporal_tokens \(2, 8, 128\)"):
        model.encode_video(videos(t=16))
    with pytest.raises(ValueError, match=r"48x48.*positional embedding \(17, 128\)"):
        model.encode_video(videos(size=48))


def published_checkpoint(model, path, prefix="module."):
    sd = {prefix + k: v.half() for k, v in ours_to_published(model).items()}
    atomic_save({"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": {}}, path)


def test_published_checkpoint_round_trip(tmp_path):
    model = randomise_t2l(build_t2l(tiny_clip(), num_frames=8)).eval()
    # the published files are fp16: compare against a model whose weights went through fp16 too
    for p in model.parameters():
        p.data = p.data.half().float()
    path = tmp_path / "published.pth"
    published_checkpoint(model, path)
    loaded = load_t2l(path).eval()
    x, tokens = videos(), text_tokens(3)
    with torch.no_grad():
        assert torch.equal(model.encode_video(x)[1], loaded.encode_video(x)[1])
        assert torch.equal(model.encode_text(tokens), loaded.encode_text(tokens))
    # ours -> file -> published layout -> file gives the same model again
    ours = tmp_path / "ours.pt"
    atomic_save(make_checkpoint(loaded, backbone={"name_or_path": "unused"}), ours)
    again = load_t2l(ours, clip_model=loaded.clip).eval()
    published_checkpoint(again, tmp_path / "again.pth", prefix="")
    final = load_t2l(tmp_path / "again.pth").eval()
    with torch.no_grad():
        assert torch.equal(final.encode_video(x)[0], model.encode_video(x)[0])


def test_published_checkpoint_key_set_is_exactly_the_published_layout():
    model = build_t2l(tiny_clip(), num_frames=8)
    keys = set(ours_to_published(model))
    assert "visual.transformer.T_prompt_embeddings" in keys and "visual.temporal_embedding" in keys
    assert "visual.transformer.resblocks.1.Adapter.D_fc2.bias" in keys
    assert "transformer.resblocks.0.Adapter.D_fc1.weight" in keys
    assert keys - set(model.clip.state_dict()) == {
        "visual.transformer.T_prompt_embeddings", "visual.temporal_embedding",
        *(f"{t}transformer.resblocks.{i}.Adapter.D_fc{j}.{w}" for t in ("visual.", "") for i in range(2)
          for j in (1, 2) for w in ("weight", "bias"))}


def test_checkpoint_with_other_frame_count_is_a_clear_error(tmp_path):
    model16 = build_t2l(tiny_clip(), num_frames=16)
    model8 = build_t2l(tiny_clip(), num_frames=8)
    with pytest.raises(CheckpointError, match=r"temporal_tokens: checkpoint shape \(2, 16, 128\) != model shape "
                                              r"\(2, 8, 128\).*16 frames"):
        load_t2l_tensors(model8, model16.trainable_state_dict(), source="x.pt")
    sd = model8.trainable_state_dict()
    sd.pop("vision_adapters.0.up.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing tensors: vision_adapters.0.up.bias.*unexpected tensors: "
                                              r"extra.weight"):
        load_t2l_tensors(model8, sd, source="x.pt")


def test_not_a_t2l_checkpoint_is_refused(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="neither a T2L checkpoint"):
        load_t2l(path)


def test_converter_command_writes_the_published_layout(tmp_path):
    from modules.checkpoint import main as checkpoint_main

    model = randomise_t2l(build_t2l(random_clip(TINY, 0), num_frames=8)).eval()
    ours = tmp_path / "ours.pt"
    atomic_save(make_checkpoint(model, epoch=4), ours)  # backbone: the seeded random CLIP, rebuilt on load
    assert checkpoint_main(["convert", str(ours), str(tmp_path / "pub.pth"), "--fp32"]) == 0
    pub = torch.load(tmp_path / "pub.pth", weights_only=True)
    assert pub["epoch"] == 4 and "visual.transformer.T_prompt_embeddings" in pub["model_state_dict"]
    again = load_t2l(tmp_path / "pub.pth").eval()
    x = videos()
    with torch.no_grad():
        assert torch.equal(again.encode_video(x)[0], model.encode_video(x)[0])


def test_random_clip_positional_std_rescales_the_positional_embedding_only():
    from modules.backbone import build_backbone

    plain = random_clip(TINY, 3)
    wide = random_clip({**TINY, "vision_positional_std": 0.5}, 3)
    a, b = plain.state_dict(), wide.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if k == "visual.positional_embedding":
            # the same draw at std 0.5 instead of OpenAI's width ** -0.5
            torch.testing.assert_close(b[k], a[k] * 0.5 * TINY["vision_width"] ** 0.5)
            assert 0.4 < b[k].std().item() < 0.6
        else:
            assert torch.equal(a[k], b[k]), k
    # A checkpoint names the option with the backbone, so test.py and predict.py rebuild the same frozen CLIP.
    model = build_t2l(wide, num_frames=8)
    rebuilt = build_backbone(make_checkpoint(model)["backbone"])
    assert torch.equal(rebuilt.visual.positional_embedding, wide.visual.positional_embedding)
    for bad in (0, -1.0, "big"):
        with pytest.raises(ValueError, match="vision_positional_std must be a positive number"):
            random_clip({**TINY, "vision_positional_std": bad}, 3)


def test_a_checkpoint_refuses_a_different_random_backbone(tmp_path):
    # Evaluating with a config whose random CLIP differs from the training one would silently give other numbers.
    path = tmp_path / "t2l.pt"
    atomic_save(make_checkpoint(build_t2l(random_clip(TINY, 0), num_frames=8)), path)
    assert load_t2l(path, clip_model=random_clip(TINY, 0)).num_frames == 8
    for other, differing in ((random_clip(TINY, 1), "seed"),
                             (random_clip({**TINY, "vision_positional_std": 0.9}, 0), "vision_positional_std"),
                             (random_clip({**TINY, "embed_dim": 48}, 0), "embed_dim")):
        with pytest.raises(CheckpointError, match=rf"t2l.pt was trained on a random CLIP .*differing: {differing}"):
            load_t2l(path, clip_model=other)


def test_a_checkpoint_refuses_a_clip_file_with_another_sha256(tmp_path, tiny_clip_file):
    # The same check whether test.py builds the backbone from the checkpoint or is handed one.
    import clip

    backbone = clip.load(str(tiny_clip_file))
    path = tmp_path / "t2l.pt"
    atomic_save(make_checkpoint(build_t2l(backbone, num_frames=8),
                                backbone={"name_or_path": str(tiny_clip_file), "sha256": "0" * 64}), path)
    for given in (None, backbone):
        with pytest.raises(CheckpointError, match=r"t2l.pt was trained on CLIP .*tiny_clip.pt with SHA-256 0{64}, "
                                                  r"but the CLIP .*tiny_clip.pt has SHA-256 [0-9a-f]{64}"):
            load_t2l(path, clip_model=given)
    atomic_save(make_checkpoint(build_t2l(backbone, num_frames=8)), path)  # the true identity loads both ways
    for given in (None, backbone):
        assert load_t2l(path, clip_model=given).num_frames == 8


def test_attention_dropout_rises_over_the_blocks_of_both_towers_as_published(monkeypatch):
    """The published blocks use nn.MultiheadAttention(dropout=linspace(0, 0.1, L)[i]) in both towers, the temporal
    summaries' attention included; in eval mode no attention drops anything."""
    import torch.nn.functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention

    def record(q, k, v, *args, dropout_p=0.0, **kw):
        seen.append((q.shape[-2], round(float(dropout_p), 6)))  # (sequence length, rate)
        return sdpa(q, k, v, *args, dropout_p=dropout_p, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    model = randomise_t2l(build_t2l(tiny_clip(), num_frames=8, attention_dropout_rate=0.1)).train()
    model.encode_video(videos())
    n = (32 // 8) ** 2 + 1
    # per vision block: the T=8 summaries first, then the N+1 tokens of every frame; rates 0 and 0.1 (2 blocks)
    assert seen == [(8, 0.0), (n + 1, 0.0), (8, 0.1), (n + 1, 0.1)], seen
    seen.clear()
    model.encode_text(text_tokens(2))
    assert seen == [(16, 0.0), (16, 0.1)], seen
    seen.clear()
    model.eval().encode_video(videos())
    assert {rate for _, rate in seen} == {0.0}
    # 12 blocks: linspace(0, 0.1, 12), the published rates
    assert [round(r, 6) for r in build_t2l(random_clip({**TINY, "vision_layers": 12}), num_frames=8)
            .vision_attn_drop_rates] == [round(0.1 * i / 11, 6) for i in range(12)]


def test_drop_path_by_positions_drops_the_same_tokens_of_every_sample():
    from modules.layers import drop_path

    x = torch.ones(64, 50, 4)
    torch.manual_seed(0)
    pos = drop_path(x, 0.5, training=True, mode="positions")
    kept = pos[:, :, 0] != 0  # (samples, positions)
    assert (kept == kept[:1]).all(), "a position is dropped for all samples at once"
    assert 5 < int(kept[0].sum()) < 45 and torch.equal(pos[kept], torch.full_like(pos[kept], 2.0))
    smp = drop_path(x, 0.5, training=True, mode="samples")
    kept = smp[:, :, 0] != 0
    assert (kept == kept[:, :1]).all(), "a sample is dropped with all its positions"
    assert 5 < int(kept[:, 0].sum()) < 59
    assert torch.equal(drop_path(x, 0.5, training=False, mode="positions"), x)
    with pytest.raises(ValueError, match="positions"):
        drop_path(x, 0.5, training=True, mode="tokens")


def test_fp16_like_published_casts_the_published_set_of_tensors():
    from modules import convert_to_fp16_like_published

    model = convert_to_fp16_like_published(build_t2l(tiny_clip(), num_frames=8))
    half = {n for n, p in model.named_parameters() if p.dtype == torch.float16}
    full = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    # linear/conv weights and biases (adapters too), the fused attention projection, the two output projections
    for n in ("clip.visual.conv1.weight", "clip.visual.proj", "clip.text_projection",
              "clip.visual.transformer.resblocks.0.attn.in_proj_weight", "clip.transformer.resblocks.1.attn.in_proj_bias",
              "clip.visual.transformer.resblocks.1.mlp.c_fc.bias", "vision_adapters.0.down.weight", "text_adapters.1.up.bias"):
        assert n in half, n
    # what the published convert_weights leaves alone
    for n in ("temporal_tokens", "temporal_embedding", "clip.logit_scale", "clip.visual.class_embedding",
              "clip.visual.positional_embedding", "clip.positional_embedding", "clip.token_embedding.weight",
              "clip.visual.ln_pre.weight", "clip.transformer.resblocks.0.ln_1.bias", "clip.ln_final.weight"):
        assert n in full, n
    assert half | full == {n for n, _ in model.named_parameters()}


def test_fp16_master_step_is_the_published_cast_step_and_round():
    """The published step: every parameter to fp32 (grads too), AdamW, the fp16 ones rounded back. Ours steps fixed
    fp32 copies instead; three steps must give bit-identical weights and optimiser state."""
    from utils.precision import Fp16MasterStep

    g = torch.Generator().manual_seed(0)
    init16 = torch.randn(6, 5, generator=g).half()
    init32 = torch.randn(4, generator=g)
    grads = [(torch.randn(6, 5, generator=g).half(), torch.randn(4, generator=g)) for _ in range(3)]

    # the published procedure
    a16, a32 = torch.nn.Parameter(init16.clone()), torch.nn.Parameter(init32.clone())
    opt_a = torch.optim.AdamW([a16, a32], lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.2)
    for g16, g32 in grads:
        a16.grad, a32.grad = g16.clone(), g32.clone()
        a16.data, a16.grad.data = a16.data.float(), a16.grad.data.float()
        opt_a.step()
        a16.data = a16.data.half()
    # ours
    b16, b32 = torch.nn.Parameter(init16.clone()), torch.nn.Parameter(init32.clone())
    master = Fp16MasterStep([("w", b16), ("t", b32)])
    opt_b = torch.optim.AdamW(master.swap([{"params": [b16, b32]}]), lr=1e-2, betas=(0.9, 0.98), eps=1e-8,
                              weight_decay=0.2)
    for g16, g32 in grads:
        b16.grad, b32.grad = g16.clone(), g32.clone()
        master.before_step()
        opt_b.step()
        master.after_step()
    assert b16.dtype == torch.float16 and torch.equal(a16.data, b16.data) and torch.equal(a32.data, b32.data)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) and torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])
