"""The inference core every script shares: precision, class texts -> embeddings, videos -> embeddings -> class
probabilities, and the evaluation of configured datasets (test.py, training's evaluation).

Layers: ``modules.factory`` builds or loads the model; this module runs it; ``features`` is the public Python API
on top of both (predict.py, extract_features.py, search.py, timeline.py go through it).

Scoring (METHOD.md): text embeddings of every class text are computed once per evaluation; each video view
(clips x crops) gets class probabilities softmax(100 * cos) per text view (template), and the probabilities are
averaged over text views and video views.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from datasets import TEST_RULES, PathRules, VideoDataset, load_class_list
from modules import class_texts, read_descriptions, tokenize_class_texts
from utils import distributed
from utils.config import Config, EvalSet
from utils.metrics import accuracy_metrics
from utils.protocols import class_subsets, mean_std, restrict_to_classes

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- compilation
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def compile_model(model: nn.Module, mode: str = "default", backend: str = "inductor") -> nn.Module:
    """``torch.compile`` the model's two encoders in place (``network.compile``; ``--compile`` of the scripts).

    ``encode_video`` and ``encode_text`` are what every script calls (and what ``forward`` calls in training), so the
    model object, its parameters and its checkpoints stay as they are. "reduce-overhead" adds CUDA graphs, which pay
    off where the shapes are fixed (evaluation batches). The first call of each encoder, where the compilation
    happens, is logged with its time; a new input shape (the last, smaller batch) compiles once more.
    """
    if mode not in COMPILE_MODES or mode == "off":
        raise ValueError(f"compile mode must be one of {COMPILE_MODES[1:]}, got {mode!r}")
    for name in ("encode_video", "encode_text"):
        compiled = torch.compile(getattr(model, name), mode=None if mode == "default" else mode, backend=backend)
        setattr(model, name, _log_first_call(compiled, name, mode))
    return model


def _log_first_call(fn, name: str, mode: str):
    state = {"first": True}

    def call(*args, **kwargs):
        if not state["first"]:
            return fn(*args, **kwargs)
        state["first"] = False
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        logger.info("torch.compile (%s): %s compiled and ran its first batch in %.1f s", mode, name,
                    time.perf_counter() - start)
        return out

    return call


# ---------------------------------------------------------------------------------------------- precision
def autocast(device: torch.device, precision: str):
    """One autocast context for the whole project: bf16/fp16 on GPU, nothing (fp32) on CPU.

    "fp16-pure" (the published code's way: the weights themselves are fp16, see
    ``modules.convert_to_fp16_like_published``) needs no autocast either.
    """
    dtype = resolve_precision(device, precision)
    if dtype == torch.float32 or precision == "fp16-pure":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_precision(device: torch.device, precision: str) -> torch.dtype:
    """The compute dtype of ``precision`` on ``device``: "auto" and "fp16-pure" compute in fp32 on a CPU (the
    published code falls back to fp32 there too); an explicit "bf16" or "fp16" autocasts on a CPU as well."""
    if precision == "fp32" or (precision in ("auto", "fp16-pure") and device.type != "cuda"):
        return torch.float32
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp16-pure": torch.float16}[precision]


def uses_fp16_weights(device: torch.device, precision: str) -> bool:
    """Whether the model's weights are cast to fp16 (``fp16-pure`` on a GPU, as the published code runs)."""
    return precision == "fp16-pure" and device.type == "cuda"


# ---------------------------------------------------------------------------------------------- texts
@dataclass
class ClassTexts:
    """The texts of a class set: ``texts[v][k]`` is view v (a template, or the one description) of class k."""

    names: list
    texts: list
    mode: str        # "descriptions" | "templates"
    source: str

    @classmethod
    def build(cls, names: list, descriptions: Optional[dict], mode: str, source: str,
              missing: str = "error") -> "ClassTexts":
        """The one assembly of class texts (``modules.class_texts``): each class's description, or the templates."""
        texts = class_texts(names, descriptions, mode=mode, source=source, missing=missing)
        return cls(names=list(names), texts=texts, mode=mode, source=source)

    def tokens(self) -> torch.Tensor:
        """Token ids (V, K, L): the one tokenisation of class texts (a text too long is truncated, with a warning)."""
        return tokenize_class_texts(self.texts, names=self.names, source=self.source)


def load_class_texts(classes_csv: str, descriptions_csv: Optional[str], text_mode: str,
                     missing: str = "error") -> ClassTexts:
    """The class texts of a config's class list and its descriptions (``data.text_mode``) or the templates.

    ``missing``: what a class without a description gets: "error" or "template" (``data.missing_descriptions``).
    """
    names = load_class_list(classes_csv)
    descriptions = None
    if text_mode == "descriptions":
        if descriptions_csv:
            descriptions = read_descriptions(descriptions_csv)
        else:
            logger.warning("no descriptions file for %s: using the prompt templates instead", classes_csv)
            text_mode = "templates"
    return ClassTexts.build(names, descriptions, text_mode, str(descriptions_csv or classes_csv), missing)


def class_tokens(classes_csv: str, descriptions_csv: Optional[str], text_mode: str,
                 missing: str = "error") -> tuple[list, torch.Tensor]:
    """(class names, token ids (V, K, L)) of :func:`load_class_texts` (training's text batch, evaluation)."""
    texts = load_class_texts(classes_csv, descriptions_csv, text_mode, missing)
    return texts.names, texts.tokens()


TEXT_BATCH = 256  # texts per forward pass of the text tower: bounds the activations, whatever the number of classes


@torch.no_grad()
def encode_tokens(model: nn.Module, tokens: torch.Tensor, device: torch.device, precision: str = "auto",
                  batch_size: int = TEXT_BATCH) -> torch.Tensor:
    """Token ids (N, L) -> L2-normalised text embeddings (N, E), float32 on the CPU, ``batch_size`` texts at a time.

    Every script's text embeddings come from here (test.py, training's evaluation, predict.py, features); training
    runs the text tower in its loss instead, with gradients. The output is allocated once and filled batch by batch:
    keeping each batch's small result alive between the big freed activations of the next ones fragments the heap so
    badly that 80,000 texts took 5.5 GB with a tiny CLIP.
    """
    out = None
    with autocast(device, precision):
        for i in range(0, tokens.shape[0], batch_size):
            emb = model.encode_text(tokens[i:i + batch_size].to(device)).float()
            if out is None:
                out = torch.empty(tokens.shape[0], emb.shape[-1])
            out[i:i + emb.shape[0]] = F.normalize(emb, dim=-1).cpu()
    if out is None:
        raise ValueError("no texts to encode")
    return out


def encode_class_texts(model: nn.Module, tokens: torch.Tensor, device: torch.device, precision: str = "auto",
                       batch_size: int = TEXT_BATCH) -> torch.Tensor:
    """Token ids (V, K, L) -> L2-normalised text embeddings (V, K, E) on ``device``, in batches."""
    V, K, L = tokens.shape
    return encode_tokens(model, tokens.view(V * K, L), device, precision, batch_size).view(V, K, -1).to(device)


# ---------------------------------------------------------------------------------------------- videos
def encode_views(model: nn.Module, clips: torch.Tensor, device: torch.device,
                 precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed clips (B, V, T, 3, S, S) -> (video embeddings (B*V, E), frame embeddings (B*V, T, E)), view-minor.

    Neither is normalised; on ``device`` in the compute dtype. Every script runs the model on test views here
    (test.py, training's evaluation, predict.py, features, timelines).
    """
    x = clips.to(device, non_blocking=True).flatten(0, 1)  # (B, V, T, 3, S, S) -> (B*V, T, 3, S, S)
    with autocast(device, precision):
        return model.encode_video(x)


# ---------------------------------------------------------------------------------------------- scoring
class ShardSampler(Sampler):
    """Evaluation sampler: rank r takes indices r, r + W, ...; no padding, so no video is counted twice."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# The published test code multiplies the cosines by a hard-coded 100 (equal to exp(logit_scale) of the OpenAI weights
# up to float rounding); the "centre" rules use the model's own scale.
PUBLISHED_LOGIT_SCALE = 100.0


def scoring_scale(model: nn.Module, rules: str) -> float:
    """The temperature of the softmax over classes under the test rules: 100 (published) or exp(logit_scale)."""
    return PUBLISHED_LOGIT_SCALE if rules == "published" else float(model.logit_scale.detach().exp())


def video_scores(video_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Normalised video embeddings (B, E) and text embeddings (V, K, E) -> probabilities (B, K), view-averaged."""
    logits = logit_scale * torch.einsum("be,vke->bvk", F.normalize(video_emb.float(), dim=-1), text_emb)
    return logits.softmax(dim=-1).mean(dim=1)


def class_probabilities(view_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float,
                        num_views: int) -> torch.Tensor:
    """Video embeddings of every view (B*V, E), view-minor, and text embeddings (V_text, K, E) -> class
    probabilities (B, K): :func:`video_scores` per view, then averaged over the V video views (test.py's rule)."""
    probs = video_scores(view_emb, text_emb, logit_scale)  # (B*V, K)
    return probs.view(-1, num_views, probs.shape[-1]).mean(dim=1)  # (B*V, K) -> (B, V, K) -> (B, K)


@torch.no_grad()
def score_dataset(model: nn.Module, dataset: VideoDataset, text_emb: torch.Tensor, device: torch.device,
                  batch_size: int, num_workers: int, precision: str = "auto", dist_info=None,
                  desc: str = "eval", rules: str = "published", return_indices: bool = False):
    """(probabilities (N, K), labels (N,), number of unreadable videos) over the whole dataset.

    With ``return_indices`` the dataset index of every row comes fourth (rows are in list order).

    Multi-view samples (V, T, 3, S, S) are scored view by view and averaged. A video that could not be read is
    left out (its replacement is deduplicated by index) and counted, so no video is ever scored twice.
    """
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world),
                        num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=False,
                        collate_fn=dataset.collate)
    scale = scoring_scale(model, rules)
    scores, labels, indices = [], [], []
    failed = 0
    for batch in tqdm(loader, desc=desc, disable=rank != 0, leave=False, dynamic_ncols=True):
        video = dataset.finish(batch, device)  # (B, V, T, 3, S, S); the transform runs here when deferred
        view_emb, _ = encode_views(model, video, device, precision)  # (B*V, E)
        probs = class_probabilities(view_emb, text_emb, scale, video.shape[1])
        scores.append(probs.cpu())
        labels.append(batch["label"])
        indices.append(batch["index"])
        failed += int(batch["failed"].sum())
    scores, labels, indices = torch.cat(scores), torch.cat(labels), torch.cat(indices)
    if world > 1:
        gathered = distributed.all_gather_objects((scores, labels, indices, failed))
        scores = torch.cat([g[0] for g in gathered])
        labels = torch.cat([g[1] for g in gathered])
        indices = torch.cat([g[2] for g in gathered])
        failed = sum(g[3] for g in gathered)
    order = torch.argsort(indices, stable=True)
    scores, labels, indices = scores[order], labels[order], indices[order]
    keep = torch.ones_like(indices, dtype=torch.bool)
    keep[1:] = indices[1:] != indices[:-1]  # a failed video's replacement appears twice: keep it once
    if failed:
        logger.warning("%s: %d video(s) could not be read and are left out of the scores (see warnings above)",
                       desc, failed)
    if return_indices:
        return scores[keep], labels[keep], failed, indices[keep]
    return scores[keep], labels[keep], failed


def published_drop_last_figures(scores: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, num_listed: int,
                                batch_size: int) -> dict:
    """The figures of the videos the published test loader scores: it keeps the list order and drops the last
    incomplete batch (``drop_last=True``), i.e. every video from index floor(N / B) * B on."""
    scored = (num_listed // batch_size) * batch_size
    keep = indices < scored
    if not bool(keep.any()):  # fewer videos than one batch: the published loader scores none
        return {"batch_size": batch_size, "left_out": num_listed, "num_videos": 0, "top1": None, "top5": None,
                "mean_class_acc": None}
    return {"batch_size": batch_size, "left_out": num_listed - scored, **accuracy_metrics(scores[keep], labels[keep])}


def path_rules(paths) -> PathRules:
    """A config ``paths`` section (utils.config.PathsSection) -> ``datasets.PathRules``."""
    return PathRules.from_options(paths.map, paths.keep_last, paths.drop_extension, paths.by_name)


def transform_on_device(cfg: Config, device: torch.device, mode: str) -> bool:
    """Whether the clip transform runs on the device (``data.transform_on``): "auto" puts it there on a GPU. The
    published test view resizes with Pillow, which runs on the CPU only, so testing under it stays in the loader."""
    if mode == "test" and TEST_RULES[cfg.eval.rules]["resize"] == "pil_bicubic":
        return False
    return cfg.data.transform_on == "device" or (cfg.data.transform_on == "auto" and device.type == "cuda")


def make_eval_dataset(cfg: Config, s: EvalSet, list_file: str, names: list, classes_csv: str,
                      device: Optional[torch.device] = None) -> VideoDataset:
    return VideoDataset(list_file, root=s.root, num_frames=cfg.data.num_frames, mode="test",
                        input_size=cfg.data.input_size, image_tmpl=s.image_tmpl or cfg.data.image_tmpl,
                        index_start=s.index_start if s.index_start is not None else cfg.data.index_start,
                        num_clips=cfg.eval.num_clips, num_crops=cfg.eval.num_crops, on_error=cfg.data.on_error,
                        seed=cfg.seed, test_rules=cfg.eval.rules, class_names=names, classes_source=classes_csv,
                        check_labels=cfg.data.check_labels, paths=path_rules(s.paths),
                        allow_outside_root=cfg.data.allow_outside_root,
                        deferred=transform_on_device(cfg, device or torch.device("cpu"), "test"))


def evaluate_set(model: nn.Module, cfg: Config, s: EvalSet, device: torch.device, dist_info=None,
                 keep_scores: bool = False) -> dict:
    """Evaluate one configured set: every split, the K-600 class subsets if configured, mean and std.

    Returns ``{"name", "group", "splits": [metrics...], "subsets": [...]?, "aggregate": {metric: {mean, std}}}``;
    with ``keep_scores`` the scores, labels and class names of each split ride along (for per-class files).
    """
    classes_csv = s.classes or cfg.data.classes
    names, tokens = class_tokens(classes_csv, s.descriptions, s.text_mode or cfg.data.text_mode,
                                 cfg.data.missing_descriptions)
    text_emb = encode_class_texts(model, tokens, device, cfg.solver.precision)
    result: dict = {"name": s.name, "group": s.group, "num_classes": len(names), "splits": []}
    entries = []  # what the aggregate is over: the splits, or the class subsets of every split
    for list_file in s.lists:
        dataset = make_eval_dataset(cfg, s, list_file, names, classes_csv, device)
        scores, labels, failed, indices = score_dataset(model, dataset, text_emb, device, cfg.eval.batch_size,
                                                        cfg.data.num_workers, cfg.solver.precision, dist_info,
                                                        desc=f"{s.name} {Path(list_file).name}", rules=cfg.eval.rules,
                                                        return_indices=True)
        split = {"split": Path(list_file).name, **accuracy_metrics(scores, labels), "unreadable_videos": failed}
        if s.published_batch_size:
            pub = published_drop_last_figures(scores, labels, indices, len(dataset), s.published_batch_size)
            split["published_drop_last"] = pub
            logger.info("%s %s: the published test loader (batch %d, drop_last) would leave out the last %d of %d "
                        "videos: top-1 %s over the %d it scores, %.2f over all (what we report)", s.name,
                        split["split"], pub["batch_size"], pub["left_out"], len(dataset),
                        "-" if pub["top1"] is None else f"{pub['top1']:.2f}", pub["num_videos"], split["top1"])
        if keep_scores:
            split["_scores"], split["_labels"], split["_names"] = scores, labels, names
        result["splits"].append(split)
        if not s.class_subsets:
            entries.append(split)
            continue
        sub = s.class_subsets
        seed = int(sub.get("seed", 0))
        subsets = class_subsets(len(names), int(sub["size"]), int(sub.get("num_subsets", 3)), seed)
        for i, ids in enumerate(subsets):
            sc, lb = restrict_to_classes(scores, labels, ids)
            entry = {"split": split["split"], "subset": i, "seed": seed, **accuracy_metrics(sc, lb)}
            result.setdefault("subsets", []).append(entry)
            entries.append(entry)
    result["aggregate"] = {m: mean_std([e[m] for e in entries]) for m in ("top1", "top5", "mean_class_acc")}
    result["aggregate"]["over"] = "class subsets" if s.class_subsets else "splits"
    result["aggregate"]["count"] = len(entries)
    return result


def strip_private(result: dict) -> dict:
    """A result without the tensors that ``keep_scores`` attached (for JSON)."""
    out = dict(result)
    out["splits"] = [{k: v for k, v in sp.items() if not k.startswith("_")} for sp in result["splits"]]
    return out
