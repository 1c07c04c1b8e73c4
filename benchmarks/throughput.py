"""Throughput and peak memory of T2L against the frozen-CLIP floor and an X-CLIP peer, plus the data pipeline.

Everything is measured in ONE process, interleaved: every repetition runs each contender once, in round-robin
order (rotated by one place per repetition), after untimed warm-up calls. The table gives the median rate and
its spread (min-max and the interquartile range over the repetitions), so a reader sees how much the machine's
load moved the figures. Models have random weights of the published OpenAI sizes: nothing is downloaded.

Contenders (``--contenders``, default all):
  floor       frozen CLIP encoding every frame, frame embeddings averaged (modules.factory.FrameAverageCLIP): the floor
  t2l         T2L ``encode_video`` (temporal tokens + adapters)
  xclip       transformers' X-CLIP ``get_video_features`` with an XCLIPConfig of the same size (the peer)
  t2l-classify    zero-shot classification: T2L ``encode_video`` and cosine logits against ``--classes`` class
                  embeddings computed once (what test.py does per batch)
  xclip-classify  X-CLIP's zero-shot path (``XCLIPModel.forward`` with the text tower's output computed once):
                  video features, then its video-conditioned prompt generator on every (video, class) pair
  train       one T2L training step: forward (video + text) + T2L loss + backward + AdamW on the trainable tensors
  train-ckpt  the same with activation checkpointing
  loader      frames on disk -> batch on the device: a DataLoader over datasets.VideoDataset (train mode) on
              generated frame folders, one full pass per repetition; the workers decode and transform
  loader-device   the same with the transform on the device (data.transform_on: device): the workers only
              decode, ``VideoDataset.finish`` crops, resizes, jitters and normalises each batch where the model is
  test-e2e    test.py's own evaluation loop (engine.score_dataset) on generated frame folders: loading, the test
              view (``--test-rules``; the centre rules' bilinear view runs on a GPU, the published Pillow view in
              the workers), T2L and the class scores, videos/s, next to the model-only t2l rate
  train-e2e   train.py's own epoch (``train.train_one_epoch``, built by its ``build_data`` and ``build_solver``
              from configs/base.yaml) over the same frame folders, one epoch per call: loading, the augmentation
              (data.transform_on: auto, so on the device on a GPU), the step; videos/s, next to the model-only
              train rate
``--compile`` adds torch.compile'd floor, t2l and train contenders (compile time is reported separately).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` after a reset; on CPU, the resident-set high-water
mark (VmHWM in /proc/self/status, reset through /proc/self/clear_refs after returning freed heap memory to the
system with malloc_trim), falling back to ``resource.getrusage`` (which cannot be reset) elsewhere. "working" is
the peak above what was resident before the call (activations, workspaces, gradients); "peak" adds the bytes of
the weights the contender uses (and AdamW state for training). The loader's memory is in its worker processes
and is not reported.

Examples:
    python benchmarks/throughput.py --size ViT-B/32 --frames 8 --batch 4              # CPU, fp32
    python benchmarks/throughput.py --size ViT-B/16 --contenders train,train-ckpt,loader --train-batch 2
    python benchmarks/throughput.py --size ViT-B/16 --device cuda --precision bf16 --batch 32 --train-batch 32
    python benchmarks/throughput.py --size ViT-B/32 --contenders floor,t2l --compile --json out.json
    python benchmarks/throughput.py --size tiny --reps 2 --warmup 1                   # a few seconds
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

import engine  # noqa: E402
from benchmarks.data_loading import available_cpus, synthetic_frame  # noqa: E402
from datasets import VideoDataset  # noqa: E402
from modules import T2LLoss, build_t2l, factory, random_clip  # noqa: E402

logger = logging.getLogger("benchmarks.throughput")

# The OpenAI sizes (METHOD.md, "Shapes"); heads = width // 64 as OpenAI's loader infers them. "tiny" is the tests'
# model.
SIZES = {
    "tiny": dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
                 context_length=16, vocab_size=100, transformer_width=64, transformer_heads=1,
                 transformer_layers=2, vision_heads=2),
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                     context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                     transformer_layers=12, vision_heads=12),
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                     context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                     transformer_layers=12, vision_heads=12),
}
CONTENDERS = ("floor", "t2l", "xclip", "t2l-classify", "xclip-classify", "train", "train-ckpt", "loader",
              "loader-device", "test-e2e", "train-e2e")
COLUMNS = ("contender", "batch", "median", "unit", "min-max", "IQR", "per CPU-s", "peak MiB", "working MiB",
           "vs floor", "vs X-CLIP")


# ---------------------------------------------------------------------------------------------- memory
class MemoryMeter:
    """Peak memory of one call above what was resident before it (bytes), on CUDA or CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self._libc = None
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated (reset before each call)"
        elif self._can_reset_hwm():
            self.method = ("process RSS high-water mark (VmHWM, reset via /proc/self/clear_refs after "
                           "malloc_trim)")
            name = ctypes.util.find_library("c")
            try:
                self._libc = ctypes.CDLL(name) if name else None
                self._libc.malloc_trim  # noqa: B018 (glibc only)
            except (OSError, AttributeError):
                self._libc = None
        else:
            self.method = "resource.getrusage ru_maxrss (cannot be reset: a lower bound after the first peak)"

    @staticmethod
    def _can_reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return MemoryMeter._status("VmHWM") is not None
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> Optional[int]:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return None

    def start(self) -> None:
        """Forget earlier peaks; what is resident now is the baseline."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("process RSS"):
            if self._libc is not None:
                self._libc.malloc_trim(0)  # freed heap pages count as resident until returned
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = self._status("VmRSS")
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> int:
        """Peak bytes above the baseline since :meth:`start`."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self.method.startswith("process RSS"):
            return max(0, self._status("VmHWM") - self._base)
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of the given modules (shared tensors counted once)."""
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------- contenders
@dataclass
class Contender:
    """One thing to time: ``run()`` does one unit of work of ``items`` videos/clips."""

    name: str
    label: str
    kind: str                      # "infer", "train" (one step), "epoch" (train.py's epoch) or "load"
    run: Callable[[], None]
    items: int                     # videos (infer/epoch), the batch (train) or clips (load) per run()
    resident_bytes: int = 0        # weights (+ optimiser state) it uses, for the "peak" column
    rates: list = field(default_factory=list)
    cpu_rates: list = field(default_factory=list)  # items per second of this process's CPU time
    working: list = field(default_factory=list)
    first_call_s: float = 0.0      # the first warm-up call (includes compilation for compiled contenders)
    calls: Optional[int] = None    # run() calls per repetition; None: --iters (a loader pass is already many)
    workers: int = 0               # DataLoader worker processes (loader only)


def xclip_config(size: dict, frames: int):
    """An XCLIPConfig of the same widths, depths, heads, patch and resolution as the CLIP size."""
    from transformers import XCLIPConfig

    s = size
    return XCLIPConfig(
        projection_dim=s["embed_dim"],
        text_config=dict(vocab_size=s["vocab_size"], hidden_size=s["transformer_width"],
                         intermediate_size=4 * s["transformer_width"], num_hidden_layers=s["transformer_layers"],
                         num_attention_heads=s["transformer_heads"], max_position_embeddings=s["context_length"]),
        vision_config=dict(hidden_size=s["vision_width"], intermediate_size=4 * s["vision_width"],
                           num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
                           image_size=s["image_resolution"], patch_size=s["vision_patch_size"], num_frames=frames,
                           mit_hidden_size=s["embed_dim"], mit_intermediate_size=4 * s["embed_dim"],
                           mit_num_hidden_layers=1, mit_num_attention_heads=max(1, s["embed_dim"] // 64)),
    )


def t2l_zero_shot_logits(t2l, videos: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, K) logits of T2L against L2-normalised class embeddings ``text`` (K, E), as test.py scores."""
    video_emb, _ = t2l.encode_video(videos)
    return t2l.logit_scale.exp() * F.normalize(video_emb.float(), dim=-1) @ text.t()


def xclip_text_embeddings(xclip, tokens: torch.Tensor) -> torch.Tensor:
    """X-CLIP's projected class-text embeddings (K, E): the part of its forward that does not see the video."""
    eot = tokens.argmax(dim=-1, keepdim=True)  # CLIP's EOT has the largest id; attend up to and including it
    mask = (torch.arange(tokens.shape[1], device=tokens.device)[None] <= eot).long()
    return xclip.text_projection(xclip.text_model(input_ids=tokens, attention_mask=mask).pooler_output)


def xclip_zero_shot_logits(xclip, videos: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, K) logits of ``XCLIPModel.forward`` given the cached text embeddings (K, E).

    The steps of transformers' forward after its text tower: video features (vision model, projection, the
    multi-frame integration transformer), then the prompt generator that conditions every class embedding on
    the video's patch features, then cosine logits. tests/test_benchmark_smoke.py checks it equals the forward.
    """
    B, T = videos.shape[:2]
    vision = xclip.vision_model(pixel_values=videos.flatten(0, 1))
    video = xclip.mit(xclip.visual_projection(vision.pooler_output).view(B, T, -1)).pooler_output
    patches = xclip.prompts_visual_layernorm(vision.last_hidden_state[:, 1:, :]) @ xclip.prompts_visual_projection
    patches = patches.view(B, T, -1, video.shape[-1]).mean(dim=1)
    text = text.unsqueeze(0).expand(B, -1, -1)
    text = text + xclip.prompts_generator(text, patches)
    video, text = F.normalize(video, dim=-1), F.normalize(text, dim=-1)
    return torch.einsum("bd,bkd->bk", video, xclip.logit_scale.exp() * text)


def random_tokens(n: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """(n, length) ids with the EOT (the largest id) at varying positions and zeros after it, like real texts."""
    tokens = torch.randint(1, vocab - 1, (n, length), generator=generator)
    for i in range(n):
        eot = min(length - 1, 8 + 7 * i % max(1, length - 8))
        tokens[i, eot] = vocab - 1
        tokens[i, eot + 1:] = 0
    return tokens


MAX_DISTINCT_VIDEOS = 64


def write_frame_folders(root: str, videos: int, frames: int, width: int, height: int) -> str:
    """Frame folders of JPEGs (the generator of benchmarks/data_loading.py) and a list file of ``videos`` lines.

    At most MAX_DISTINCT_VIDEOS folders are written; a longer list names them again in turn (the decoding work
    per clip is the same, and writing thousands of folders would take longer than the measurement).
    """
    lines = []
    for v in tqdm(range(min(videos, MAX_DISTINCT_VIDEOS)), desc="writing frame folders", unit="video", leave=False):
        rng = np.random.default_rng(v)
        folder = os.path.join(root, f"video_{v:03d}")
        os.makedirs(folder, exist_ok=True)
        for k in range(frames):
            Image.fromarray(synthetic_frame(v, k, width, height, rng)).save(
                os.path.join(folder, f"img_{k + 1:05d}.jpg"), quality=90)
        lines.append(f"video_{v:03d} {frames} {v % 10}")
    lines = [lines[i % len(lines)] for i in range(videos)]
    path = os.path.join(root, "list.txt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def build_contenders(args, device: torch.device, data_root: str) -> list[Contender]:
    """Build the selected contenders on ``device``; they share one frozen CLIP."""
    size = SIZES[args.size]
    T, B, TB = args.frames, args.batch, args.train_batch
    R = size["image_resolution"]
    wanted = args.contenders
    gen = torch.Generator().manual_seed(0)
    videos = torch.randn(B, T, 3, R, R, generator=gen).to(device)
    train_videos = torch.randn(TB, T, 3, R, R, generator=gen).to(device)
    tokens = random_tokens(TB, size["context_length"], size["vocab_size"], gen).to(device)
    labels = (torch.arange(TB) % max(1, TB // 2)).to(device)  # some shared labels, as in real batches
    ac = lambda: engine.autocast(device, args.precision)  # noqa: E731

    clip_model = random_clip(size, seed=0).to(device)
    out: list[Contender] = []

    def inference(name, label, fn, weights):
        def run():
            with torch.inference_mode(), ac():
                fn(videos)
        out.append(Contender(name, label, "infer", run, B, weights))

    floor = factory.FrameAverageCLIP(clip_model).eval()
    t2l = build_t2l(clip_model, num_frames=T).to(device).eval()  # T2L's own tensors are made on the CPU
    t2l_video_bytes = module_bytes(clip_model.visual) + tensor_bytes(
        p for n, p in t2l.named_parameters() if not n.startswith(("clip.", "text_adapters.")))
    if "floor" in wanted:
        inference("floor", "CLIP per frame + mean (floor)", floor.encode_video, module_bytes(clip_model.visual))
    if "t2l" in wanted:
        inference("t2l", "T2L encode_video", t2l.encode_video, t2l_video_bytes)
    K = args.classes
    class_tokens = random_tokens(K, size["context_length"], size["vocab_size"], gen).to(device)
    if "t2l-classify" in wanted:
        with torch.inference_mode(), ac():
            t2l_text = F.normalize(t2l.encode_text(class_tokens).float(), dim=-1)
        inference("t2l-classify", f"T2L zero-shot logits, {K} classes (text embeddings cached)",
                  lambda v: t2l_zero_shot_logits(t2l, v, t2l_text), t2l_video_bytes + tensor_bytes([t2l_text]))
    if "xclip" in wanted or "xclip-classify" in wanted:
        try:
            from transformers import XCLIPModel
        except ImportError as e:
            logger.warning("X-CLIP peer skipped: transformers is not importable (%s)", e)
        else:
            xclip = XCLIPModel._from_config(xclip_config(size, T), attn_implementation="sdpa").to(device).eval()
            video_bytes = module_bytes(xclip.vision_model, xclip.visual_projection, xclip.mit)
            if "xclip" in wanted:
                inference("xclip", "X-CLIP get_video_features (transformers)", xclip.get_video_features,
                          video_bytes)
            if "xclip-classify" in wanted:
                with torch.inference_mode(), ac():
                    xclip_text = xclip_text_embeddings(xclip, class_tokens)
                inference("xclip-classify", f"X-CLIP zero-shot logits, {K} classes (text tower cached, prompt "
                          "generator per video)", lambda v: xclip_zero_shot_logits(xclip, v, xclip_text),
                          video_bytes + module_bytes(xclip.prompts_generator, xclip.prompts_visual_layernorm)
                          + tensor_bytes([xclip.prompts_visual_projection, xclip_text]))
    if args.compile:
        if "floor" in wanted:
            inference("floor-compiled", "floor, torch.compile", torch.compile(floor.encode_video),
                      module_bytes(clip_model.visual))
        if "t2l" in wanted:
            inference("t2l-compiled", "T2L encode_video, torch.compile", torch.compile(t2l.encode_video),
                      t2l_video_bytes)

    criterion = T2LLoss()
    train_kinds = [(n, ckpt, False) for n, ckpt in (("train", False), ("train-ckpt", True)) if n in wanted]
    if args.compile and "train" in wanted:
        train_kinds.append(("train-compiled", False, True))
    for name, checkpointing, compiled in train_kinds:
        model = build_t2l(clip_model, num_frames=T, activation_checkpointing=checkpointing).to(device).train()
        params = [p for _, p in model.trainable_parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.2)
        amp = engine.resolve_precision(device, args.precision)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        forward = torch.compile(model) if compiled else model

        def step(model=model, forward=forward, optimizer=optimizer, scaler=scaler):
            optimizer.zero_grad(set_to_none=True)
            with ac():
                video_emb, frame_emb, text_emb = forward(train_videos, tokens)
            loss, _ = criterion(video_emb, frame_emb, text_emb, labels, model.logit_scale)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        # Resident: both towers and T2L's tensors, plus AdamW's two moments per trainable value.
        resident = module_bytes(model) + 2 * tensor_bytes(params)
        label = "T2L train step" + (" + activation checkpointing" if checkpointing else "") + \
                (", torch.compile" if compiled else "")
        out.append(Contender(name, label, "train", step, TB, resident))

    w, h = (args.frame_width, args.frame_height)
    list_file = None
    if {"loader", "loader-device", "test-e2e", "train-e2e"} & set(wanted):
        list_file = write_frame_folders(data_root, args.loader_videos, args.source_frames, w, h)
    workers = args.workers
    for name in ("loader", "loader-device"):
        if name not in wanted:
            continue
        dataset = VideoDataset(list_file, root=data_root, num_frames=T, mode="train", input_size=R,
                               on_error="raise", deferred=name == "loader-device")
        loader = DataLoader(dataset, batch_size=TB, shuffle=True, num_workers=workers,
                            pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
                            prefetch_factor=4 if workers > 0 else None, collate_fn=dataset.collate,
                            generator=torch.Generator().manual_seed(0))

        def one_pass(dataset=dataset, loader=loader, epoch=[0]):
            epoch[0] += 1
            dataset.set_epoch(epoch[0])
            for batch in loader:
                dataset.finish(batch, device)
                batch["label"].to(device, non_blocking=True)
            synchronize(device)

        clips = (len(dataset) // TB) * TB
        where = "workers decode, the device transforms" if name == "loader-device" else "workers decode and transform"
        out.append(Contender(name, f"DataLoader over VideoDataset, {workers} workers, {where} "
                                   f"(frames {w}x{h} JPEG -> {T}x{R}px, train mode)", "load", one_pass, clips,
                             calls=1, workers=workers))
    if "test-e2e" in wanted:
        deferred = args.test_rules == "centre" and device.type == "cuda"  # engine.transform_on_device's "auto"
        test_set = VideoDataset(list_file, root=data_root, num_frames=T, mode="test", input_size=R,
                                on_error="raise", test_rules=args.test_rules, deferred=deferred)
        with torch.inference_mode(), ac():
            cached = F.normalize(t2l.encode_text(class_tokens).float(), dim=-1).unsqueeze(0)  # (1, K, E)

        def evaluate():
            with torch.inference_mode():
                engine.score_dataset(t2l, test_set, cached, device, B, workers, args.precision,
                                     rules=args.test_rules, desc="test-e2e")

        out.append(Contender("test-e2e", f"test.py's evaluation loop ({args.test_rules} rules, {workers} workers, "
                                         f"frames {w}x{h} JPEG, {K} classes)", "infer", evaluate, len(test_set),
                             t2l_video_bytes, calls=1, workers=workers))
    if "train-e2e" in wanted:
        out.append(train_epoch_contender(args, device, data_root, list_file, size))
    return out


def train_epoch_contender(args, device: torch.device, data_root: str, list_file: str, size: dict) -> Contender:
    """train.py's own epoch, built as train.py builds it (its phases) with a random CLIP of ``size``."""
    import train as train_script  # the entry point's module: its phases, not a copy of them
    from utils.config import load_config
    from utils.distributed import DistInfo
    from utils.preemption import CheckpointClock

    classes = os.path.join(data_root, "classes.csv")
    with open(classes, "w") as f:
        f.write("id,name\n" + "".join(f"{k},class {k}\n" for k in range(10)))  # write_frame_folders' labels
    out_dir = os.path.join(data_root, "train_e2e")
    size = dict(size, context_length=77, vocab_size=49408)  # train.py tokenises real class texts
    opts = [f"output_dir={out_dir}", "network.pretrained=random", f"network.random_clip={json.dumps(size)}",
            f"data.train_list={list_file}", f"data.root={data_root}", f"data.classes={classes}",
            "data.text_mode=templates", f"data.num_frames={args.frames}", f"data.input_size={size['image_resolution']}",
            f"data.batch_size={args.train_batch}", f"data.num_workers={args.workers}", "data.on_error=raise",
            f"solver.precision={args.precision}", "solver.epochs=100000", "checkpoint.every_minutes=0", "eval.sets=[]"]
    cfg = load_config(os.path.join(REPO, "configs", "base.yaml"), opts)
    run = train_script.Run(cfg, DistInfo(device=device), Path(out_dir))
    train_script.build_data(run)
    train_script.build_solver(run, train_script.parse_args(["--config", "configs/base.yaml", "--no-resume"]))
    progress, clock, epoch = train_script.Progress(), CheckpointClock(), [0]

    def one_epoch():
        train_script.train_one_epoch(run, progress, epoch[0], clock, None)
        epoch[0] += 1

    videos = len(run.loader) * args.train_batch
    where = "on the device" if run.dataset.deferred else "in the workers"
    resident = module_bytes(run.model) + 2 * tensor_bytes(p for _, p in run.model.trainable_parameters())
    return Contender("train-e2e", f"train.py's epoch ({args.workers} workers, transform {where}, frames "
                                  f"{args.frame_width}x{args.frame_height} JPEG, {cfg.solver.precision})", "epoch",
                     one_epoch, videos, resident, calls=1, workers=args.workers)


# ---------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(contenders: list[Contender], device: torch.device, reps: int, warmup: int, iters: int,
            meter: MemoryMeter) -> None:
    """Warm up every contender, then ``reps`` interleaved repetitions of ``iters`` calls each."""
    for c in tqdm(contenders, desc="warm-up", unit="contender", leave=False):
        for i in range(warmup):
            start = time.perf_counter()
            c.run()
            synchronize(device)
            if i == 0:
                c.first_call_s = time.perf_counter() - start
    bar = tqdm(total=reps * len(contenders), desc="measuring", unit="call", leave=False)
    for r in range(reps):
        # Round-robin, rotated by one place per repetition so no contender always runs after the same one.
        for c in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:
            meter.start()
            cpu_start, start = time.process_time(), time.perf_counter()
            calls = c.calls or iters
            for _ in range(calls):
                c.run()
            synchronize(device)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            c.working.append(meter.stop())
            per_call = 1 if c.kind == "train" else c.items
            c.rates.append(calls * per_call / elapsed)
            c.cpu_rates.append(calls * per_call / max(cpu, 1e-9))
            bar.update()
    bar.close()


def spread(values: list[float]) -> tuple[float, float, float, float, float]:
    """(median, min, max, q1, q3)."""
    med = statistics.median(values)
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return med, min(values), max(values), q1, q3


def fmt(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def result_rows(contenders: list[Contender], device: torch.device) -> list[dict]:
    """One dict per contender with the figures of the table (rates: videos/s, steps/s or clips/s).

    ``cpu_median`` is the rate per second of this process's CPU time (CPU device only; not for a loader with
    worker processes): with one torch thread it hardly moves with the load other processes put on the machine.
    """
    by_name = {c.name: c for c in contenders}
    floor = statistics.median(by_name["floor"].rates) if "floor" in by_name else None
    xclip = statistics.median(by_name["xclip"].rates) if "xclip" in by_name else None
    xclip_zs = statistics.median(by_name["xclip-classify"].rates) if "xclip-classify" in by_name else None
    rows = []
    for c in contenders:
        med, lo, hi, q1, q3 = spread(c.rates)
        classify = c.name.endswith("classify")  # compared with the other classifier, not the encoders
        in_process = device.type == "cpu" and not (c.kind in ("load", "epoch") and c.workers > 0)
        cpu_med = statistics.median(c.cpu_rates) if in_process else None
        unit = {"infer": "videos/s", "epoch": "videos/s", "train": "steps/s", "load": "clips/s"}[c.kind]
        working = statistics.median(c.working) if c.kind != "load" else None
        row = dict(contender=c.label, name=c.name, kind=c.kind, batch=c.items, median=med, unit=unit, min=lo,
                   max=hi, q1=q1, q3=q3, cpu_median=cpu_med, cpu_rates=list(c.cpu_rates), working_mib=None if working is None else working / 2 ** 20,
                   peak_mib=None if working is None else (working + c.resident_bytes) / 2 ** 20,
                   vs_floor=med / floor if c.kind == "infer" and floor and not classify else None,
                   vs_xclip=(med / xclip_zs if classify and xclip_zs else
                             med / xclip if c.kind == "infer" and xclip and not classify else None),
                   first_call_s=c.first_call_s, rates=list(c.rates))
        if c.kind == "train":
            row["videos_per_s"] = med * c.items
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "| --- | ---: | ---: | --- | " + " | ".join(["---:"] * 7) + " |"]
    for r in rows:
        ratio = lambda v: "" if v is None else f"{v:.2f}x"  # noqa: E731
        mib = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
        lines.append(f"| {r['contender']} | {r['batch']} | {fmt(r['median'])} | {r['unit']} | "
                     f"{fmt(r['min'])}-{fmt(r['max'])} | {fmt(r['q1'])}-{fmt(r['q3'])} | "
                     f"{'n/a' if r['cpu_median'] is None else fmt(r['cpu_median'])} | {mib(r['peak_mib'])} | "
                     f"{mib(r['working_mib'])} | {ratio(r['vs_floor'])} | {ratio(r['vs_xclip'])} |")
    return "\n".join(lines)


def summary_lines(rows: list[dict], train_batch: int) -> list[str]:
    by = {r["name"]: r for r in rows}
    out = []
    if "t2l" in by and by["t2l"]["vs_floor"] is not None:
        out.append(f"T2L / floor (videos/s): {by['t2l']['vs_floor']:.3f}")
    if "t2l" in by and by["t2l"]["vs_xclip"] is not None:
        out.append(f"T2L / X-CLIP (videos/s): {by['t2l']['vs_xclip']:.3f}")
    if "t2l-classify" in by and by["t2l-classify"]["vs_xclip"] is not None:
        out.append(f"T2L / X-CLIP zero-shot classification (videos/s): {by['t2l-classify']['vs_xclip']:.3f}")
    for other, label in (("floor", "floor"), ("xclip", "X-CLIP")):
        if "t2l" in by and other in by and by["t2l"]["cpu_median"] and by[other]["cpu_median"]:
            out.append(f"T2L / {label} per CPU-second: {by['t2l']['cpu_median'] / by[other]['cpu_median']:.3f}")
    for name in ("train", "train-ckpt", "train-compiled"):
        if name in by:
            r = by[name]
            out.append(f"{r['contender']}: {r['median']:.3g} steps/s = {r['videos_per_s']:.3g} videos/s "
                       f"(batch {train_batch}), peak {r['peak_mib']:.0f} MiB")
    if "loader" in by and "train" in by:
        supply, demand = by["loader"]["median"], by["train"]["videos_per_s"]
        bound = "compute" if supply >= demand else "loading"
        out.append(f"loading supplies {supply:.3g} clips/s, a training step consumes {demand:.3g} clips/s: "
                   f"{bound}-bound (loading at {supply / demand:.3g}x the need; on CPU the workers take cores from the "
                   f"model, which this interleaved measurement does not show)")
    if "train-e2e" in by and "train" in by:
        e2e, step = by["train-e2e"]["median"], by["train"]["videos_per_s"]
        out.append(f"train.py's epoch: {e2e:.3g} videos/s, {e2e / step:.3g}x the model-only train step's {step:.3g}")
    if "test-e2e" in by and "t2l" in by:
        e2e, model = by["test-e2e"]["median"], by["t2l"]["median"]
        out.append(f"test.py's loop: {e2e:.3g} videos/s, {e2e / model:.3g}x the model-only T2L rate {model:.3g}")
    for r in rows:
        if r["name"].endswith("compiled"):
            out.append(f"{r['contender']}: first call (compilation) {r['first_call_s']:.1f} s")
    return out


# ---------------------------------------------------------------------------------------------- main
def environment(device: torch.device, threads: int, meter: MemoryMeter) -> dict:
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    env = dict(torch=torch.__version__, transformers=tf_version, python=platform.python_version(),
               cpus=available_cpus(), torch_threads=threads, processor=platform.processor() or platform.machine(),
               memory_method=meter.method)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="ViT-B/32", help="CLIP size (default ViT-B/32)")
    parser.add_argument("--frames", type=int, default=8, help="T, frames per video (default 8)")
    parser.add_argument("--batch", type=int, default=4, help="videos per inference call (default 4)")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="videos per training step and loader batch (default: --batch)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="autocast dtype (weights stay fp32, as in training); default fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--test-rules", default="published", choices=("published", "centre"),
                        help="test view of the test-e2e contender (eval.rules; default published)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help=f"comma-separated subset of {','.join(CONTENDERS)} (default all)")
    parser.add_argument("--classes", type=int, default=400,
                        help="classes for the zero-shot classification contenders (default 400, Kinetics-400)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd floor, t2l and train")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per contender (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per contender first (default 2)")
    parser.add_argument("--iters", type=int, default=1, help="calls per timed repetition (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers for the loader contender (default: the CPUs available)")
    parser.add_argument("--loader-videos", type=int, default=None,
                        help="videos in the loader's list, one pass per repetition (default: train batch x "
                             "max(4, 2 x workers), so that every worker loads at least two batches a pass)")
    parser.add_argument("--source-frames", type=int, default=64, help="frames per generated video (default 64)")
    parser.add_argument("--frame-width", type=int, default=None, help="generated frame width (default 320, tiny 64)")
    parser.add_argument("--frame-height", type=int, default=None,
                        help="generated frame height (default 240, tiny 48)")
    parser.add_argument("--data-dir", default=None, help="where to write the frames (default: a temp folder)")
    parser.add_argument("--json", default=None, help="also write the figures, every repetition included, here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = sorted(set(args.contenders) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose from {','.join(CONTENDERS)}")
    if args.train_batch is None:
        args.train_batch = args.batch
    if min(args.batch, args.train_batch, args.frames, args.reps, args.iters) < 1 or args.warmup < 1:
        parser.error("--batch, --train-batch, --frames, --reps, --iters and --warmup must be at least 1")
    tiny = args.size == "tiny"
    args.frame_width = args.frame_width or (64 if tiny else 320)
    args.frame_height = args.frame_height or (48 if tiny else 240)
    if args.workers is None:
        args.workers = available_cpus()
    args.loader_videos = args.loader_videos or max(4, 2 * args.workers) * args.train_batch
    if args.loader_videos < args.train_batch:
        parser.error(f"--loader-videos ({args.loader_videos}) must hold at least one batch ({args.train_batch})")
    return args


def main(argv=None) -> dict:
    """Run the benchmark; print the markdown table and a summary; return the figures as a dict."""
    modules_logger = logging.getLogger("modules")
    level = modules_logger.level
    try:
        return run_benchmark(argv)
    finally:
        modules_logger.setLevel(level)  # called in-process (the tests): the quieted logger comes back as it was


def run_benchmark(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("modules").setLevel(logging.WARNING)  # one parameter report per T2L built is noise here
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    meter = MemoryMeter(device)
    env = environment(device, torch.get_num_threads(), meter)
    load_before = os.getloadavg()
    data_root = args.data_dir or tempfile.mkdtemp(prefix="t2l_throughput_")
    os.makedirs(data_root, exist_ok=True)
    try:
        contenders = build_contenders(args, device, data_root)
        # Everything built so far lives until the end: keep it out of the per-call gc.collect (seconds with
        # transformers' object graph loaded).
        gc.collect()
        gc.freeze()
        measure(contenders, device, args.reps, args.warmup, args.iters, meter)
    finally:
        gc.unfreeze()
        if args.data_dir is None:
            shutil.rmtree(data_root, ignore_errors=True)
    load_after = os.getloadavg()
    rows = result_rows(contenders, device)
    command = "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"{args.size}, {args.frames} frames, inference batch {args.batch}, train batch {args.train_batch}, "
              f"{args.precision}, device {device}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}; "
              f"{args.reps} interleaved repetitions x {args.iters} call(s) after {args.warmup} warm-up call(s); "
              f"torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}; "
              f"{env['cpus']} CPUs ({env['processor']}), {env['torch_threads']} torch threads; load average "
              f"(1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; peak memory: {meter.method}")
    print(f"\n`{command.strip()}`\n\n{header}\n")
    print(markdown_table(rows))
    print()
    for line in summary_lines(rows, args.train_batch):
        print(f"- {line}")
    result = dict(command=command.strip(), args={k: v for k, v in vars(args).items()}, environment=env,
                  load_average=dict(before=load_before, after=load_after), rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    from utils.preemption import end_worker_processes

    try:
        main()
    finally:
        end_worker_processes()  # train-e2e's workers ignore SIGTERM: an error must not leave the exit waiting
