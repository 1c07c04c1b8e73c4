"""GPU paths: SDPA kernels, bf16/fp16 autocast, and train.py/test.py on CUDA. Skipped where torch sees no GPU.

CI has no GPU, so these run only where one is present (`python -m pytest tests/test_cuda.py`). They check what
the CPU suite cannot: that our attention calls are accepted by the fused SDPA kernels (flash, memory-efficient)
and agree with the reference math kernel, that mixed precision stays close to fp32 at the published size, and
that a training run under autocast writes checkpoints test.py and a CPU machine can read.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.throughput import SIZES
from modules import T2LLoss, build_t2l, random_clip

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[1]
VIT_B16 = SIZES["ViT-B/16"]  # the OpenAI ViT-B/16 sizes, as the benchmark builds them


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=-1)


@pytest.fixture(scope="module")
def b16():
    """ViT-B/16 with random weights on the GPU, T2L's tensors moved off their initial values."""
    model = build_t2l(random_clip(VIT_B16, seed=0), num_frames=8).cuda().eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(0.02 * torch.randn(p.shape, device="cuda", generator=gen))
    videos = torch.randn(2, 8, 3, 224, 224, device="cuda", generator=gen)
    tokens = torch.randint(1, 49406, (4, 77), device="cuda", generator=gen)
    for i, eot in enumerate((5, 12, 30, 76)):
        tokens[i, eot], tokens[i, eot + 1:] = 49407, 0
    return model, videos, tokens


@pytest.mark.parametrize("backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
def test_fused_sdpa_kernels_accept_our_attention_and_match_the_math_kernel(b16, backend):
    """Vision (N+1 tokens with the temporal summary) and causal text attention run on the fused kernel alone."""
    model, videos, tokens = b16
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel([SDPBackend.MATH]):
            ref_video, _ = model.encode_video(videos)
            ref_text = model.encode_text(tokens)
        with sdpa_kernel([backend]):  # raises if our call pattern (mask, layout, dtype) is not supported
            video, _ = model.encode_video(videos)
            text = model.encode_text(tokens)
    assert cosine(video, ref_video).min() > 0.999
    assert cosine(text, ref_text).min() > 0.999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_stays_close_to_fp32_at_vit_b16(b16, dtype):
    model, videos, tokens = b16
    with torch.inference_mode():
        ref_video, ref_frames = model.encode_video(videos)
        ref_text = model.encode_text(tokens)
        with torch.autocast("cuda", dtype=dtype):
            video, frames = model.encode_video(videos)
            text = model.encode_text(tokens)
    assert cosine(video, ref_video).min() > 0.99
    assert cosine(frames.flatten(0, 1), ref_frames.flatten(0, 1)).min() > 0.99
    assert cosine(text, ref_text).min() > 0.99


def test_identity_t2l_equals_frozen_clip_per_frame_on_gpu():
    clip_model = random_clip(VIT_B16, seed=1).cuda().eval()
    model = build_t2l(clip_model, num_frames=4, temporal_tokens="none").cuda().eval()
    videos = torch.randn(2, 4, 3, 224, 224, device="cuda")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            _, frames = model.encode_video(videos)
            ref = clip_model.encode_image(videos.flatten(0, 1)).view(2, 4, -1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.testing.assert_close(frames, ref, rtol=1e-4, atol=1e-4)


def test_bf16_training_step_matches_fp32_gradients_and_leaves_clip_untouched(b16):
    model, videos, tokens = b16  # eval mode: no dropout, so both runs compute the same function
    criterion = T2LLoss()
    labels = torch.tensor([0, 1], device="cuda")
    frozen = {n: p.detach().clone() for n, p in model.clip.named_parameters()}
    grads = {}
    for name, ctx in (("fp32", torch.autocast("cuda", enabled=False)),
                      ("bf16", torch.autocast("cuda", dtype=torch.bfloat16))):
        model.zero_grad(set_to_none=True)
        with ctx:
            video_emb, frame_emb, text_emb = model(videos, tokens[:2])
        loss, _ = criterion(video_emb, frame_emb, text_emb, labels, model.logit_scale)
        assert torch.isfinite(loss)
        loss.backward()
        grads[name] = torch.cat([p.grad.flatten() for _, p in model.trainable_parameters()])
    trained = {n: p.detach().clone() for n, p in model.trainable_parameters()}
    torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-3).step()
    assert all(not torch.equal(p, trained[n]) for n, p in model.trainable_parameters())
    with torch.no_grad():  # put the fixture's T2L tensors back for the tests after this one
        for n, p in model.trainable_parameters():
            p.copy_(trained[n])
    assert all(p.grad is None for p in model.clip.parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in model.clip.named_parameters())
    assert cosine(grads["bf16"][None], grads["fp32"][None]).item() > 0.95


def write_frames(root: Path, classes: int = 4, per_class: int = 4, frames: int = 8, size: int = 32) -> None:
    """Frame folders (a bright square moving one way per class) and the list, class and description files."""
    rng = np.random.default_rng(0)
    moves = [(1, 0), (-1, 0), (0, 1), (0, -1)]
    lines = []
    for c in range(classes):
        for i in range(per_class):
            name = f"c{c}_{i}"
            (root / "frames" / name).mkdir(parents=True)
            x, y = rng.integers(8, size - 16, 2)
            for k in range(frames):
                img = np.full((size, size, 3), 20, np.uint8)
                px, py = x + 2 * k * moves[c][0], y + 2 * k * moves[c][1]
                img[max(0, py):py + 8, max(0, px):px + 8] = 230
                Image.fromarray(img).save(root / "frames" / name / f"img_{k + 1:05d}.jpg")
            lines.append(f"{name} {frames} {c}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    names = ["moving right", "moving left", "moving down", "moving up"][:classes]
    (root / "classes.csv").write_text("id,name\n" + "".join(f"{i},{n}\n" for i, n in enumerate(names)))
    (root / "descriptions.csv").write_text("SNo,Class Name,Description\n" + "".join(
        f"{i + 1},{n},A bright square is {n}.\n" for i, n in enumerate(names)))


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp16-pure"])
def test_train_and_test_scripts_run_on_the_gpu(tmp_path, precision, monkeypatch):
    import test as test_script
    import train as train_script

    monkeypatch.chdir(ROOT)
    data = tmp_path / "data"
    write_frames(data)
    sets = (f'eval.sets=[{{name: val, lists: ["{data}/train.txt"], root: "{data}/frames", '
            f'classes: "{data}/classes.csv", descriptions: "{data}/descriptions.csv"}}]')
    opts = ["device=cuda", f"solver.precision={precision}", "network.random_clip.image_resolution=32",
            "network.random_clip.vision_patch_size=8", "data.input_size=32", "data.batch_size=4",
            "data.num_workers=2", "eval.batch_size=8", "solver.epochs=2", "solver.warmup_epochs=1", "eval.every=1",
            f"data.train_list={data}/train.txt", f"data.root={data}/frames", f"data.classes={data}/classes.csv",
            f"data.descriptions={data}/descriptions.csv", sets]
    summary = train_script.main(["--config", "configs/demo/demo_train.yaml", "--no-resume", "--opts",
                                 f"output_dir={tmp_path / 'train'}", *opts])
    assert summary["steps"] == 2 * 4
    ckpt = torch.load(tmp_path / "train" / "last.pt", weights_only=True)  # no map_location: saved as it loads
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())  # readable on a machine with no GPU
    test_script.main(["--config", "configs/demo/demo_test.yaml", "--weights", str(tmp_path / "train" / "last.pt"),
                      "--opts", f"output_dir={tmp_path / 'test'}", *opts])
    entry = json.loads((tmp_path / "test" / "results.json").read_text())["results"]["val"]
    assert entry["num_videos"] == 16 and 0 <= entry["top1"] <= 100


def test_the_transform_on_the_gpu_gives_the_cpu_pipelines_embeddings(b16, tmp_path):
    """data.transform_on: device on a GPU: the workers only decode, the augmentation and the test view run on the GPU
    (in float, not rounded to grey levels). Embeddings stay within bf16 tolerance of the CPU pipeline's."""
    from datasets import VideoDataset

    model = b16[0]
    rng = np.random.default_rng(0)
    lines = []
    for v in range(4):
        folder = tmp_path / f"v{v}"
        folder.mkdir()
        base = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        for k in range(12):
            Image.fromarray(np.roll(base, k, axis=1)).resize((320, 240)).save(folder / f"img_{k + 1:05d}.jpg")
        lines.append(f"{folder} 12 {v}")
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(lines) + "\n")
    dev = torch.device("cuda")
    for mode, rules in (("train", "published"), ("test", "centre")):
        cpu = VideoDataset(str(lst), num_frames=8, mode=mode, input_size=224, seed=3, test_rules=rules)
        gpu = VideoDataset(str(lst), num_frames=8, mode=mode, input_size=224, seed=3, test_rules=rules, deferred=True)
        a = cpu.finish(cpu.collate([cpu[i] for i in range(4)]) if cpu.collate else
                       torch.utils.data.default_collate([cpu[i] for i in range(4)]), dev)
        b = gpu.finish(gpu.collate([gpu[i] for i in range(4)]), dev)
        assert (a - b).abs().max() < 2.5 / 255 / 0.26  # within a few grey levels, in normalised units
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            ea = model.encode_video(a.flatten(0, 1) if a.dim() == 6 else a)[0]
            eb = model.encode_video(b.flatten(0, 1) if b.dim() == 6 else b)[0]
        assert cosine(ea, eb).min() > 0.999, mode
