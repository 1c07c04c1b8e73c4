"""Video and text embeddings from T2L or a frozen CLIP: the public Python API.

    from features import load_model
    m = load_model("demo_output/train/last.pt")            # a T2L checkpoint (ours or published) or a CLIP
    v = m.encode_videos(["a.mp4", "frames/b"])              # (2, E) float32, L2-normalised
    t = m.encode_texts(["a person jumping"])                # (1, E) float32, L2-normalised
    best = (v @ t.T).argmax(dim=1)                          # cosine similarity -> nearest text

Layers: the model is loaded by ``modules.factory`` (the one model factory) and run by ``engine`` (the videos ->
embeddings -> class probabilities that test.py uses); this module adds the files' preprocessing, the views and the
readers of class and prompt files, for predict.py, extract_features.py, search.py and timeline.py.

What is loaded (``load_model``): an OpenAI CLIP name (``ViT-B/16``) or a CLIP weight file/folder gives the
frame-averaged CLIP (the zero-shot baseline of test.py); a checkpoint of this project, a published T2L
checkpoint or a model folder (``python -m modules.checkpoint export``) gives T2L. Our checkpoints record the frozen
backbone they were trained on (a CLIP name or file with its SHA-256, or the seeded random CLIP of the demo), which
is rebuilt from that record.

Preprocessing is test.py's, through ``datasets.load_video_clip``: one frame per TSN segment, resize of the short
side to S*256/224, centre crop S (three crops of side S with ``num_crops=3``), CLIP normalisation, under the same
test rules as test.py (``test_rules``: "published", the default, or "centre"; see ``datasets.TEST_RULES``). So the
features are those the classifier sees.

Views: with ``num_clips`` x ``num_crops`` views per video, each view is encoded, its video embedding
L2-normalised, the normalised embeddings averaged over the views and the mean normalised again. (test.py
instead averages class probabilities over views; with one view the two agree exactly, with several the
nearest class can differ in rare near-ties.) Per-frame embeddings are returned per view: (N, V, T, E), each
frame's embedding L2-normalised.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import engine
from datasets import TEST_RULES, load_class_list, load_video_clip
from datasets.lists import VIDEO_EXTENSIONS  # the one list of video file extensions (data tools, PathRules)
from engine import ClassTexts
from modules import TEMPLATES, factory, read_descriptions, tokenize_class_texts
from modules.factory import model_kind
from utils.distributed import pick_device

logger = logging.getLogger(__name__)

__all__ = ["VideoTextEncoder", "load_model", "model_kind", "ClassTexts", "TextItem", "read_class_texts",
           "read_text_items", "csv_kind", "find_videos", "pool_views", "identity_for_hash", "TEMPLATES",
           "VIDEO_EXTENSIONS", "DEFAULT_FRAMES"]

PathLike = Union[str, os.PathLike]
DEFAULT_FRAMES = 8  # frames per clip for a frozen CLIP, which has no trained frame count


# ---------------------------------------------------------------------------------------------- views
def pool_views(view_emb: torch.Tensor, num_views: int) -> torch.Tensor:
    """Video embeddings of every view (B*V, E), view-minor -> one L2-normalised embedding per video (B, E).

    Each view is normalised first so that no view weighs more for having a larger norm, then the mean is
    normalised again.
    """
    E = view_emb.shape[-1]
    views = F.normalize(view_emb.float(), dim=-1).view(-1, num_views, E)  # (B*V, E) -> (B, V, E)
    return F.normalize(views.mean(dim=1), dim=-1)


# ---------------------------------------------------------------------------------------------- model
class VideoTextEncoder:
    """A loaded model plus the preprocessing it expects; encodes videos and texts into L2-normalised embeddings.

    Build it with :func:`load_model` (or directly around a model that has ``encode_video(videos (B, T, 3, S, S))
    -> (video_emb, frame_emb)``, ``encode_text(tokens)`` and ``logit_scale``).

    Attributes: ``model``, ``kind`` ("t2l" or "clip"), ``identity`` (what was loaded, with its SHA-256),
    ``device``, ``precision``, ``num_frames`` (T), ``input_size`` (S), ``num_clips``, ``num_crops``,
    ``image_tmpl``, ``index_start`` (frame-file naming of frame folders), ``test_rules`` (test.py's
    ``eval.rules``: frames, resize and the logit scale of the scores).
    """

    def __init__(self, model: nn.Module, kind: str, identity: dict, device: Union[str, torch.device] = "cpu",
                 precision: str = "auto", num_frames: int = DEFAULT_FRAMES, input_size: Optional[int] = None,
                 num_clips: int = 1, num_crops: int = 1, image_tmpl: str = "img_{:05d}.jpg", index_start: int = 1,
                 test_rules: str = "published"):
        if num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 (centre crop) or 3 (three crops), got {num_crops}")
        if num_clips < 1 or num_frames < 1:
            raise ValueError(f"num_clips and num_frames must be >= 1, got {num_clips} and {num_frames}")
        if precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
        if test_rules not in TEST_RULES:
            raise ValueError(f"test rules must be one of {', '.join(TEST_RULES)}, got {test_rules!r}")
        self.test_rules = test_rules
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():  # inference only: no autograd bookkeeping
            p.requires_grad_(False)
        self.kind = kind
        self.identity = dict(identity)
        self.precision = precision
        self.num_frames = int(num_frames)
        resolution = _input_resolution(model)
        self.input_size = int(input_size or resolution)
        if resolution and self.input_size != resolution:
            raise ValueError(f"input size {self.input_size} does not fit this model, whose positional embedding "
                             f"is for {resolution}x{resolution} images; leave the input size unset")
        self.num_clips = int(num_clips)
        self.num_crops = int(num_crops)
        self.image_tmpl = image_tmpl
        self.index_start = int(index_start)

    # ------------------------------------------------------------------ facts
    @property
    def num_views(self) -> int:
        """Views per video: clips x crops."""
        return self.num_clips * self.num_crops

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype on this device: fp32 on CPU, bf16/fp16 on GPU with ``precision="auto"``."""
        return engine.resolve_precision(self.device, self.precision)

    @property
    def logit_scale(self) -> float:
        """The temperature of test.py's softmax over classes: 100 under the published rules, else exp(logit_scale)."""
        return engine.scoring_scale(self.model, self.test_rules)

    @property
    def embed_dim(self) -> int:
        """E, the size of the joint embedding."""
        return int(self.model.clip.visual.output_dim if hasattr(self.model, "clip") else
                   self.model.visual.output_dim)

    def settings(self) -> dict:
        """Everything that changes the embeddings: model identity, frames, size, views, frame naming, dtype."""
        return {"model": identity_for_hash(self.identity), "num_frames": self.num_frames,
                "input_size": self.input_size, "num_clips": self.num_clips, "num_crops": self.num_crops,
                "image_tmpl": self.image_tmpl, "index_start": self.index_start,
                "dtype": str(self.dtype).replace("torch.", ""), "test_rules": self.test_rules}

    def config_hash(self, extra: Optional[dict] = None) -> str:
        """A short SHA-256 of :meth:`settings` (plus ``extra``): equal hashes give comparable features."""
        blob = json.dumps({**self.settings(), **(extra or {})}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """One line naming the model for logs and manifests: ``kind:file-or-name:sha256-prefix``."""
        sha = self.identity.get("sha256") or ""
        return f"{self.kind}:{Path(str(self.identity.get('source', '?'))).name}:{sha[:12]}"

    # ------------------------------------------------------------------ videos
    def load_views(self, path: PathLike) -> torch.Tensor:
        """One video file or frames folder -> its test views (V, T, 3, S, S), exactly test.py's preprocessing.

        Raises ``datasets.SampleLoadError`` naming the file when the video cannot be read.
        """
        return load_video_clip(os.fspath(path), num_frames=self.num_frames, input_size=self.input_size,
                               num_clips=self.num_clips, num_crops=self.num_crops, image_tmpl=self.image_tmpl,
                               index_start=self.index_start, test_rules=self.test_rules)

    @torch.no_grad()
    def encode_views(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed clips (B, V, T, 3, S, S) -> (view video embeddings (B*V, E), frame embeddings (B*V, T, E)).

        Neither is normalised; float32 on the CPU. The model runs in ``engine.encode_views``, as in test.py.
        """
        if clips.ndim != 6:
            raise ValueError(f"expected clips of shape (B, V, T, 3, S, S), got {tuple(clips.shape)}")
        video_emb, frame_emb = engine.encode_views(self.model, clips, self.device, self.precision)
        return video_emb.float().cpu(), frame_emb.float().cpu()

    def encode_clips(self, clips: torch.Tensor, return_frames: bool = False):
        """Preprocessed clips (B, V, T, 3, S, S) or (B, T, 3, S, S) -> L2-normalised video embeddings (B, E).

        With ``return_frames`` also the per-frame embeddings (B, V, T, E), each L2-normalised.
        """
        if clips.ndim == 5:
            clips = clips.unsqueeze(1)  # (B, T, 3, S, S) -> (B, 1, T, 3, S, S): one view
        B, V = clips.shape[:2]
        view_emb, frame_emb = self.encode_views(clips)
        video = pool_views(view_emb, V)
        if not return_frames:
            return video
        frames = F.normalize(frame_emb, dim=-1).view(B, V, frame_emb.shape[1], -1)  # (B*V, T, E) -> (B, V, T, E)
        return video, frames

    def encode_videos(self, videos: Union[Sequence[PathLike], torch.Tensor], batch_size: int = 8,
                      return_frames: bool = False, progress: bool = False):
        """Video files or frames folders (or already preprocessed clips) -> L2-normalised embeddings (N, E).

        ``videos``: a list of paths, each read with :meth:`load_views`; or a tensor as :meth:`encode_clips`
        takes. With ``return_frames`` also the per-frame embeddings (N, V, T, E). An unreadable video raises
        ``datasets.SampleLoadError`` naming it (use extract_features.py to skip and list failures instead).
        """
        if isinstance(videos, torch.Tensor):
            return self.encode_clips(videos, return_frames)
        if isinstance(videos, (str, os.PathLike)):
            videos = [videos]
        videos = list(videos)
        if not videos:
            raise ValueError("encode_videos needs at least one video path")
        out, frames = [], []
        for i in tqdm(range(0, len(videos), batch_size), desc="videos", unit="batch", disable=not progress,
                      leave=False, dynamic_ncols=True):
            clips = torch.stack([self.load_views(p) for p in videos[i:i + batch_size]])  # (b, V, T, 3, S, S)
            result = self.encode_clips(clips, return_frames=True)
            out.append(result[0])
            frames.append(result[1])
        if return_frames:
            return torch.cat(out), torch.cat(frames)
        return torch.cat(out)

    # ------------------------------------------------------------------ texts
    def encode_texts(self, texts: Union[str, Sequence[str]], batch_size: int = engine.TEXT_BATCH,
                     source: Optional[str] = None) -> torch.Tensor:
        """Strings -> L2-normalised text embeddings (N, E), ``batch_size`` at a time; texts longer than 77 tokens
        are truncated, with a warning (once per ``source``, the file they came from) naming them."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("encode_texts needs at least one text")
        tokens = tokenize_class_texts([texts], source=source)[0]  # (1, N, L) -> (N, L)
        return engine.encode_tokens(self.model, tokens, self.device, self.precision, batch_size)

    def encode_class_texts(self, class_text: ClassTexts, batch_size: int = engine.TEXT_BATCH) -> torch.Tensor:
        """The texts of a class set -> (V, K, E) on the CPU, exactly as test.py encodes them (``engine``)."""
        return engine.encode_class_texts(self.model, class_text.tokens(), self.device, self.precision,
                                         batch_size).cpu()

    def class_probabilities(self, view_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """View embeddings (B*V, E) from :meth:`encode_views` and class text embeddings (V_text, K, E) -> class
        probabilities (B, K), scored exactly as test.py scores (``engine.class_probabilities``)."""
        return engine.class_probabilities(view_emb, text_emb, self.logit_scale, self.num_views)

    # Singular aliases, for those who think of one call per batch.
    encode_video = encode_videos
    encode_text = encode_texts


def _input_resolution(model: nn.Module) -> Optional[int]:
    visual = model.clip.visual if hasattr(model, "clip") else getattr(model, "visual", None)
    return getattr(visual, "input_resolution", None)


def identity_for_hash(identity: dict) -> dict:
    """A model's identity (``VideoTextEncoder.identity``) without where the file lies: what makes two sets of
    features comparable (a moved or copied checkpoint gives the same features; search.py checks exports by it)."""
    return {k: v for k, v in identity.items() if k != "source"}


# ---------------------------------------------------------------------------------------------- loading
def load_model(name_or_path: PathLike, device: Union[str, torch.device] = "auto", precision: str = "auto",
               num_frames: Optional[int] = None, input_size: Optional[int] = None, num_clips: int = 1,
               num_crops: int = 1, image_tmpl: str = "img_{:05d}.jpg", index_start: int = 1,
               trust: bool = False, test_rules: str = "published", compile: str = "off") -> VideoTextEncoder:
    """Load a model for feature extraction.

    Args:
        name_or_path: a CLIP name (``clip.available_models()``) or CLIP weights (any format ``clip.load``
            reads) -> frame-averaged CLIP; a checkpoint of ours, a published T2L checkpoint or a model folder
            (``python -m modules.checkpoint export``, read without any pickle) -> T2L.
        device: "auto" (the GPU when there is one), "cpu", "cuda", "cuda:N".
        precision: "auto" (bf16, or fp16 on older GPUs; fp32 on CPU), "fp32", "bf16", "fp16".
        num_frames: T; a T2L model fixes it (a different value is an error), a CLIP takes 8 by default.
        input_size: S; defaults to the model's input resolution (the only size its positional embedding fits).
        num_clips, num_crops: test views per video (crops 1 = centre, 3 = three crops); views are averaged.
        image_tmpl, index_start: frame-file naming of frame folders (``img_00001.jpg`` ...).
        trust: allow checkpoints that need full unpickling (they can run code): only files you trust.
        compile: "off", or a ``torch.compile`` mode for the encoders ("default", "reduce-overhead",
            "max-autotune"; ``engine.compile_model``), the compile time logged at the first batch.
        test_rules: "published" (the published test code's frames, Pillow bicubic resize, logit scale 100) or
            "centre" (segment centres, torch bilinear resize, exp(logit_scale)): test.py's ``eval.rules``.

    Raises FileNotFoundError, ``modules.CheckpointError``, ``clip.CLIPLoadError`` or ValueError naming the file.
    """
    device = pick_device(str(device)) if str(device) == "auto" else torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available on this machine")
    loaded = factory.load_model(name_or_path, trust=trust, num_frames=num_frames,
                                frames_fix="leave it unset or pass {trained}")
    model, kind, identity = loaded.model, loaded.kind, loaded.identity
    frames = loaded.num_frames or int(num_frames or DEFAULT_FRAMES)
    encoder = VideoTextEncoder(model, kind, identity, device=device, precision=precision, num_frames=frames,
                               input_size=input_size, num_clips=num_clips, num_crops=num_crops,
                               image_tmpl=image_tmpl, index_start=index_start, test_rules=test_rules)
    if compile != "off":
        engine.compile_model(encoder.model, compile)
    logger.info("model %s: %s, %d frames x %d view(s) at %dpx, %s on %s", os.fspath(name_or_path),
                "T2L" if kind == "t2l" else "frame-averaged CLIP", encoder.num_frames, encoder.num_views,
                encoder.input_size, str(encoder.dtype).replace("torch.", ""), encoder.device)
    return encoder


# ---------------------------------------------------------------------------------------------- texts
@dataclass(frozen=True)
class TextItem:
    """One text to embed and where it came from (for manifests)."""

    text: str
    class_id: Optional[int] = None
    class_name: Optional[str] = None
    view: Optional[int] = None     # template index (templates mode) or 0 (descriptions)
    line: Optional[int] = None     # 1-based line in a prompts file


def _csv_header(path: Path) -> list:
    with path.open(newline="", encoding="utf-8-sig") as f:
        for row in csv.reader(f):
            if row and any(c.strip() for c in row):
                return [c.strip() for c in row]
    return []


def csv_kind(path: PathLike) -> Optional[str]:
    """"classes" for a class list (``id,name``), "descriptions" for ``SNo,Class Name,...``, else None."""
    header = _csv_header(Path(path))
    if [h.lower() for h in header] == ["id", "name"]:
        return "classes"
    if len(header) >= 3 and header[1] == "Class Name":
        return "descriptions"
    return None


def _looks_like_path(spec: str) -> bool:
    return spec.lower().endswith((".csv", ".txt")) or os.sep in spec or (os.altsep or os.sep) in spec


def read_class_texts(spec: PathLike, descriptions: Optional[PathLike] = None, templates: bool = False) -> ClassTexts:
    """The classes and their texts, as test.py builds them.

    ``spec``: a class list CSV (``id,name``), a descriptions CSV (``SNo,Class Name,Description``: classes in
    file order, the descriptions as texts), or a comma-separated list of class names. ``descriptions``: a
    descriptions CSV for a class list. Without descriptions, or with ``templates``, every class gets the 16
    prompt templates (test.py averages the class probabilities over them).

    Raises FileNotFoundError or ValueError (naming the file and line) for a missing or malformed file and for an
    empty class list.
    """
    spec_s = os.fspath(spec)
    path = Path(spec_s).expanduser()
    desc: Optional[dict] = None
    if path.is_file():
        kind = csv_kind(path)
        if kind == "classes":
            names = load_class_list(str(path))
        elif kind == "descriptions":
            desc = read_descriptions(path)
            names = list(desc)
            if not names:
                raise ValueError(f"{path}: the descriptions file has no classes")
        else:
            raise ValueError(f"{path}:1: expected a class list CSV (header 'id,name') or a descriptions CSV "
                             f"(header 'SNo,Class Name,Description'), got the header {_csv_header(path)}")
        source = str(path)
    elif _looks_like_path(spec_s):
        raise FileNotFoundError(f"class file not found: {spec_s}")
    else:
        names = [n.strip() for n in spec_s.split(",")]
        if not any(names):
            raise ValueError(f"empty class list {spec_s!r}: give a class list CSV, a descriptions CSV or "
                             f"comma-separated class names")
        if not all(names):
            raise ValueError(f"empty class name in {spec_s!r} (two commas in a row, or a trailing comma?)")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"class {dup!r} is named twice in {spec_s!r}")
        source = "command line"
    if descriptions is not None:
        desc = read_descriptions(descriptions)
        source = os.fspath(descriptions)
    mode = "templates" if templates or not desc else "descriptions"
    return ClassTexts.build(names, desc, mode, source)


def read_text_items(path: PathLike, descriptions: Optional[PathLike] = None,
                    templates: bool = False) -> tuple[list, str]:
    """The texts of a file -> (list of :class:`TextItem`, kind).

    A class list or descriptions CSV gives the class texts of :func:`read_class_texts`, view-major (row
    ``v * K + k`` is view v of class k, so the embeddings reshape to (V, K, E)); kind "classes". Any other file
    is a prompts file, one text per non-empty line; kind "prompts".
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"texts file not found: {path}")
    if path.suffix.lower() == ".csv" or csv_kind(path):
        ct = read_class_texts(path, descriptions=descriptions, templates=templates)
        items = [TextItem(text=t, class_id=k, class_name=ct.names[k], view=v)
                 for v, view in enumerate(ct.texts) for k, t in enumerate(view)]
        return items, "classes"
    if descriptions is not None or templates:
        raise ValueError(f"{path} is a prompts file (one text per line); --descriptions and --templates apply to "
                         f"class list CSVs only")
    items = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            text = line.strip()
            if text:
                items.append(TextItem(text=text, line=line_no))
    if not items:
        raise ValueError(f"{path}: no texts (expected one prompt per line)")
    return items, "prompts"


# ---------------------------------------------------------------------------------------------- inputs
def _is_link_cycle(path: str, top: str) -> bool:
    """True when ``path`` resolves to one of the folders above it (up to ``top``): walking it would never end."""
    real = os.path.realpath(path)
    parent = os.path.dirname(path)
    while len(parent) >= len(top) and parent != path:
        if os.path.realpath(parent) == real:
            return True
        path, parent = parent, os.path.dirname(parent)
    return False


def add_view_arguments(parser, device: str = "auto") -> None:
    """The command-line options of the programs built on this module (predict.py, extract_features.py): how a video
    is read and viewed as test.py views it, and where and how the model runs. Their values go to
    :func:`load_model` and :class:`VideoTextEncoder`."""
    p = parser
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default: the T2L model's, or 8)")
    p.add_argument("--input-size", type=int, default=None, help="frame side in pixels (default: the model's)")
    p.add_argument("--clips", type=int, default=1, help="temporal clips per video, averaged (default 1)")
    p.add_argument("--crops", type=int, default=1, choices=(1, 3), help="spatial crops per clip, averaged (default 1)")
    p.add_argument("--image-tmpl", default="img_{:05d}.jpg", help="frame file names (default img_{:05d}.jpg)")
    p.add_argument("--index-start", type=int, default=1, help="number of the first frame file (default 1)")
    p.add_argument("--rules", default="published", choices=("published", "centre"),
                   help="test-time rules, as test.py's eval.rules: published (the published test code's frames, "
                        "Pillow bicubic resize, logit scale 100; default) or centre (segment centres, torch bilinear "
                        "resize, the model's logit scale)")
    p.add_argument("--device", default=device, help=f"auto (GPU if any), cpu, cuda or cuda:N (default {device})")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: fp32 on CPU, bf16 (fp16 on older GPUs) on a GPU (default auto)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need full unpickling (can run code): only files you trust")


def find_videos(folder: PathLike, image_tmpl: str = "img_{:05d}.jpg", index_start: int = 1,
                extensions: Iterable[str] = VIDEO_EXTENSIONS) -> list:
    """Every video file and frames folder under ``folder`` (recursively), sorted.

    A folder that holds the first frame file (``image_tmpl.format(index_start)``) is a frames folder (not
    searched further); a file with a video extension is a video. Other files are ignored and counted in the
    log.
    """
    folder = os.path.normpath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"input folder not found: {folder}")
    first = image_tmpl.format(index_start)
    exts = tuple(e.lower() for e in extensions)
    found, ignored = [], 0
    # Symbolic links are followed (data often lives on another disk), except a link back to a folder above it.
    for root, dirs, files in os.walk(folder, followlinks=True):
        if _is_link_cycle(root, folder):
            dirs[:] = []
            continue
        dirs.sort()
        if first in files:
            found.append(root)
            dirs[:] = []  # a frames folder is one video: do not look inside it for more
            continue
        for name in sorted(files):
            if name.lower().endswith(exts):
                found.append(os.path.join(root, name))
            else:
                ignored += 1
    if ignored:
        logger.info("%s: %d file(s) are neither videos (%s) nor frames (%s) and were ignored", folder, ignored,
                    " ".join(exts[:5]) + " ...", first)
    return sorted(found)

