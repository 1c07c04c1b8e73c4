"""``VideoDataset``: list file -> sampled, decoded, augmented clips; and ``load_video_clip``.

Randomness: the generator for sample ``i`` is derived from ``(seed, epoch, i)`` only, never from
global state, so every DataLoader worker draws different clips, the result does not depend on the
number of workers, and a resumed run that calls ``set_epoch`` sees the same clips as the original.

Failures (``on_error``):
- ``"raise"``: the :class:`~datasets.readers.SampleLoadError` propagates; its message names the file.
- ``"skip"``: the sample is replaced by the next index (``i+1``, ``i+2``, ... modulo the length:
  deterministic), the failure is logged as a warning naming the file, and the returned sample says
  how many replacements it needed in ``failed``. Worker processes cannot share counters with the
  trainer, but every sample travels back through the DataLoader, so the trainer gets an exact count
  for the epoch with any ``num_workers`` (and any number of ranks, after an all-reduce) by summing
  ``batch["failed"]``; :func:`failure_summary_line` formats it. In a single process
  (``num_workers=0``) :meth:`VideoDataset.failure_summary` also lists the files.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .lists import PathRules, VideoRecord, check_labels_match_names, read_list_file
from .readers import FrameFolder, SampleLoadError, open_source
from .sampling import sample_indices
from .transforms import build_transform

logger = logging.getLogger(__name__)

__all__ = ["VideoDataset", "load_video_clip", "failure_summary_line", "TEST_RULES", "collate_deferred", "frame_count",
           "sample_test_views"]

# The test-time rules (config ``eval.rules``): which frames (datasets.sampling) and which resize (datasets.transforms).
# "published": exactly the published T2L test code; "centre": segment centres and torch's bilinear resize.
TEST_RULES = {"published": {"frames": "published", "resize": "pil_bicubic"},
              "centre": {"frames": "centre", "resize": "bilinear"}}


def _rules(rules: str) -> dict:
    if rules not in TEST_RULES:
        raise ValueError(f"test rules must be one of {tuple(TEST_RULES)}, got {rules!r}")
    return TEST_RULES[rules]


# After this many failed samples in a row the data is presumably wrong as a whole (bad root,
# wrong template): stop instead of silently cycling through the list.
MAX_CONSECUTIVE_FAILURES = 50


def _check_template(image_tmpl: str) -> None:
    try:
        a, b = image_tmpl.format(1), image_tmpl.format(2)
    except (IndexError, KeyError, ValueError) as e:
        raise ValueError(f"image_tmpl must be a str.format template with one field such as "
                         f"'img_{{:05d}}.jpg', got {image_tmpl!r} ({e})") from None
    if a == b:
        raise ValueError(f"image_tmpl {image_tmpl!r} does not depend on the frame index")


def frame_count(source, listed: int) -> int:
    """Frames to sample from in an opened source (``datasets.readers.open_source``): the list's count (``listed``; 0:
    count them), checked against the folder or container. Raises ``SampleLoadError`` naming the file when there are
    none. The dataset, ``load_video_clip``, extract_features.py and the list builders count frames here."""
    if isinstance(source, FrameFolder):
        n = source.checked_count(listed)  # a gap in the folder is an error, also when the list gives a count
    else:
        # The container's count is known after opening (decord); the list may be off by a frame.
        n = source.num_frames if listed <= 0 else min(listed, source.num_frames)
    if n <= 0:
        if isinstance(source, FrameFolder):
            first = source.image_tmpl.format(source.index_start)
            raise SampleLoadError(source.path, f"no frame files in the folder (expected {first}, ... "
                                  "from image_tmpl and index_start)")
        raise SampleLoadError(source.path, "video has no frames (0 frames found)")
    return n


def _test_frames(source, n: int, num_frames: int, num_clips: int, frame_rule: str) -> torch.Tensor:
    """The decoded frames of every test clip of one video, uint8 ``(C*T, 3, H, W)``, clip-major."""
    idx = sample_indices(n, num_frames, "test", num_clips=num_clips, rule=frame_rule)  # (C, T)
    return source.read(idx.reshape(-1))  # (C*T, 3, H, W), decoded once for all clips


def sample_test_views(source, n: int, num_frames: int, num_clips: int, transform, frame_rule: str) -> torch.Tensor:
    """All test views of one video: ``(num_clips * num_crops, T, 3, S, S)``, clip-major.

    ``source`` reads 0-based frames (``read(indices)``), ``n`` of them (:func:`frame_count`); ``transform`` is the
    test transform (``build_transform("test", ...)``) and ``frame_rule`` the test rules' frames (``TEST_RULES``).
    The one test-view step of the dataset, ``load_video_clip``, extract_features.py and the timeline windows.
    """
    return _views(transform(_test_frames(source, n, num_frames, num_clips, frame_rule)), num_frames, num_clips)


def _views(x: torch.Tensor, num_frames: int, num_clips: int) -> torch.Tensor:
    """The test transform's output, (C*T, 3, S, S) or (K, C*T, 3, S, S), as views (C*K, T, 3, S, S)."""
    if x.dim() == 4:
        x = x.unsqueeze(0)
    K = x.shape[0]
    # (K, C*T, 3, S, S) -> (C, K, T, 3, S, S) -> (C*K, T, 3, S, S)
    x = x.view(K, num_clips, num_frames, *x.shape[-3:]).transpose(0, 1)
    return x.reshape(num_clips * K, num_frames, *x.shape[-3:])


class VideoDataset(Dataset):
    """Clips and labels from a list file, for training or testing.

    Args:
        list_file: ``<path> <num_frames> <label>`` per line (see :func:`datasets.read_list_file`).
        root: folder that relative paths in the list are taken from.
        num_frames: T, frames per clip.
        mode: ``"train"`` (random segment frames, augmentation) or ``"test"`` (segment middles,
            resize + centre/three crops, ``num_clips`` x ``num_crops`` views).
        input_size: S, the output side.
        image_tmpl, index_start: frame-file naming for frame folders.
        flip: horizontal flip in training (False for Something-Something).
        num_clips, num_crops: test views per video.
        test_rules: ``"published"`` (the published test code's frames and Pillow bicubic resize) or
            ``"centre"`` (segment centres, torch bilinear resize); see ``TEST_RULES``.
        on_error: ``"skip"`` or ``"raise"`` (see the module docstring).
        num_classes: when given, labels outside ``[0, num_classes)`` are an error at construction.
        class_names: when given (with ``classes_source``, the class file's name for messages), a list whose
            labels point at classes other than the ones its videos are named after is an error at construction
            (``datasets.lists.label_name_mismatches``); ``check_labels=False`` turns that check off.
        paths: :class:`~datasets.lists.PathRules` for the list's paths (published split files).
        deferred: the loader only decodes: ``ds[i]["video"]`` is the uint8 frames, with the augmentation's random
            choices in ``ds[i]["params"]`` (training), and :meth:`finish` applies the transform to a batch on the
            device; batch with :meth:`collate` (the frames of a batch may differ in size). :meth:`finish` on the
            CPU gives exactly what the loader would have. Not for the published test view (Pillow, CPU only).
        train_sampling: ``"segments"``: one random frame per segment (TSN); ``"test"``: the test-time frames of
            ``test_rules`` every epoch (what the published base-to-novel and few-shot configs train with, their
            ``random_shift: False``); the augmentation stays random either way.
        seed: base seed; the clip of sample ``i`` in epoch ``e`` depends on ``(seed, e, i)`` only.
        allow_outside_root: accept list paths that lead outside ``root`` (see :func:`datasets.read_list_file`).

    ``ds[i]`` is a dict: ``video`` float32 ``(T, 3, S, S)`` in training, ``(V, T, 3, S, S)`` with
    ``V = num_clips * num_crops`` (clip-major) in testing; ``label`` int (-1 when unknown); ``index``
    the index of the sample actually returned; ``failed`` how many samples this call had to replace.
    """

    def __init__(self, list_file: str, root: Optional[str] = None, num_frames: int = 8,
                 mode: str = "train", input_size: int = 224, image_tmpl: str = "img_{:05d}.jpg",
                 index_start: int = 1, flip: bool = True, num_clips: int = 1, num_crops: int = 1,
                 on_error: str = "skip", num_classes: Optional[int] = None, seed: int = 0,
                 test_rules: str = "published", class_names: Optional[List[str]] = None,
                 classes_source: str = "the class list", check_labels: bool = True,
                 paths: Optional[PathRules] = None, train_sampling: str = "segments",
                 allow_outside_root: bool = False, deferred: bool = False):
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {num_clips}")
        if train_sampling not in ("segments", "test"):
            raise ValueError(f"train_sampling must be 'segments' or 'test', got {train_sampling!r}")
        self.train_sampling = train_sampling
        if mode == "train" and (num_clips != 1 or num_crops != 1):
            raise ValueError("num_clips and num_crops are test-time options; training takes one view")
        _check_template(image_tmpl)
        self.list_file = os.fspath(list_file)
        if class_names is not None:
            num_classes = len(class_names) if num_classes is None else num_classes
        self.records: List[VideoRecord] = read_list_file(list_file, root=root, num_classes=num_classes, paths=paths,
                                                         allow_outside_root=allow_outside_root)
        if class_names is not None and check_labels:
            check_labels_match_names(self.records, class_names, self.list_file, classes_source)
        self.num_frames = int(num_frames)
        self.mode = mode
        self.input_size = int(input_size)
        self.image_tmpl = image_tmpl
        self.index_start = int(index_start)
        self.num_clips = int(num_clips)
        self.num_crops = int(num_crops)
        self.on_error = on_error
        self.num_classes = num_classes
        self.seed = int(seed)
        # The epoch lives in shared memory so that persistent DataLoader workers (which hold their
        # own copies of the dataset) see set_epoch() too.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.test_rules = _rules(test_rules)
        if deferred and mode == "test" and self.test_rules["resize"] == "pil_bicubic":
            raise ValueError("the published test view resizes every frame with Pillow, on the CPU: it cannot be "
                             "moved to the device (use eval.rules: centre, or transform in the loader)")
        self.deferred = bool(deferred)
        if mode == "test":
            self.transform = build_transform("test", self.input_size, num_crops=self.num_crops,
                                             resize=self.test_rules["resize"])
        else:
            self.transform = build_transform("train", self.input_size, flip=flip)
        # Failures seen by *this process* (index, path, reason): complete only with num_workers=0.
        self._failures: List[tuple] = []

    def __len__(self) -> int:
        return len(self.records)

    @property
    def epoch(self) -> int:
        """The epoch set by :meth:`set_epoch` (0 until then)."""
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Make training clips depend on ``epoch`` (call before each epoch, also when resuming).

        Call it before ``iter(loader)`` starts the epoch: workers, persistent ones included, read
        the epoch from shared memory when they load a sample, and they start prefetching as soon as
        the iterator is created.
        """
        self._epoch.fill_(int(epoch))

    def _generators(self, index: int):
        """(numpy Generator, torch Generator) for sample ``index`` in the current epoch."""
        ss = np.random.SeedSequence([self.seed, self.epoch, index])
        np_rng = np.random.default_rng(ss)
        torch_gen = torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1)))
        return np_rng, torch_gen

    def load(self, index: int) -> torch.Tensor:
        """The video tensor of sample ``index`` without any failure handling (raises SampleLoadError)."""
        rec = self.records[index]
        source = open_source(rec.path, self.image_tmpl, self.index_start)
        n = frame_count(source, rec.num_frames)
        if self.mode == "test":
            frames = _test_frames(source, n, self.num_frames, self.num_clips, self.test_rules["frames"])
            return frames if self.deferred else _views(self.transform(frames), self.num_frames, self.num_clips)
        np_rng, torch_gen = self._generators(index)
        if self.train_sampling == "test":
            idx = sample_indices(n, self.num_frames, "test", rule=self.test_rules["frames"])[0]
        else:
            idx = sample_indices(n, self.num_frames, "train", rng=np_rng)
        frames = source.read(idx)
        if self.deferred:  # the same draws, in the same order, as the transform makes when it runs here
            return frames, self.transform.sample(frames.shape[-2], frames.shape[-1], torch_gen)
        return self.transform(frames, torch_gen)

    def __getitem__(self, index: int) -> Dict[str, object]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} videos")
        failed = 0
        current = index
        while True:
            try:
                video = self.load(current)
                break
            except SampleLoadError as e:
                if self.on_error == "raise":
                    raise
                failed += 1
                self._failures.append((current, e.path, e.reason))
                logger.warning("skipping %s (list %s line %d): %s", e.path, self.list_file,
                               self.records[current].line, e.reason)
                if failed >= min(len(self), MAX_CONSECUTIVE_FAILURES):
                    raise RuntimeError(
                        f"{failed} samples in a row failed to load from {self.list_file} "
                        f"(starting at index {index}); the last: {e}. Check the list's root and "
                        f"image_tmpl/index_start") from e
                current = (current + 1) % len(self)
        label = self.records[current].label
        sample = {"video": video, "label": -1 if label is None else label, "index": current, "failed": failed}
        if self.deferred:  # uint8 frames, and in training the augmentation's choices (load returns both)
            sample["video"], sample["params"] = video if self.mode == "train" else (video, None)
        return sample

    @property
    def collate(self):
        """The DataLoader ``collate_fn`` for this dataset: None (the default stacking) unless deferred."""
        return collate_deferred if self.deferred else None

    def finish(self, batch: dict, device: torch.device) -> torch.Tensor:
        """The batch's videos on ``device``, float32: (B, T, 3, S, S) in training, (B, V, T, 3, S, S) in testing.

        Without ``deferred`` this only moves the loader's output. With it, every clip's uint8 frames go to the
        device and the transform runs there (per clip: the clips of a batch may differ in size and augmentation).
        """
        if not self.deferred:
            return batch["video"].to(device, non_blocking=True)
        out = []
        for frames, params in zip(batch["video"], batch["params"]):
            x = frames.to(device, non_blocking=True)
            if self.mode == "train":
                out.append(self.transform.apply(x, params))
            else:
                out.append(_views(self.transform(x), self.num_frames, self.num_clips))
        return torch.stack(out)

    def failure_summary(self) -> Dict[str, object]:
        """Failures seen by this process: ``{"count": int, "files": {path: reason}}``.

        Only complete when the samples were loaded in this process (``num_workers=0``); with
        workers, sum ``batch["failed"]`` in the training loop instead (see the module docstring).
        """
        files = {path: reason for _, path, reason in self._failures}
        return {"count": len(self._failures), "files": files}

    def reset_failures(self) -> None:
        """Forget the failures recorded so far (e.g. at the start of an epoch)."""
        self._failures.clear()


def collate_deferred(items: List[dict]) -> dict:
    """Batch the samples of a deferred dataset: frames and augmentation choices as lists, the rest stacked."""
    return {"video": [it["video"] for it in items], "params": [it["params"] for it in items],
            "label": torch.tensor([it["label"] for it in items]), "index": torch.tensor([it["index"] for it in items]),
            "failed": torch.tensor([it["failed"] for it in items])}


def failure_summary_line(num_failed: int, num_samples: int, name: str = "") -> str:
    """One log line for the end of an epoch from the summed ``batch["failed"]`` counts."""
    where = f" in {name}" if name else ""
    if num_failed == 0:
        return f"all {num_samples} samples{where} loaded"
    return (f"{num_failed} unreadable samples{where} were replaced by their neighbours this epoch "
            f"({num_samples} samples returned); see the warnings above for the files")


def load_video_clip(path: str, num_frames: int = 8, input_size: int = 224, num_clips: int = 1,
                    num_crops: int = 1, image_tmpl: str = "img_{:05d}.jpg",
                    index_start: int = 1, listed_frames: int = 0, test_rules: str = "published") -> torch.Tensor:
    """Exactly the dataset's test pipeline for one frames folder or video file.

    ``listed_frames`` is a list file's frame count (0: count the frames, as the dataset does); ``test_rules`` as
    for :class:`VideoDataset`.

    Returns:
        float32 ``(num_clips * num_crops, T, 3, S, S)``, clip-major, CLIP-normalised.

    Raises:
        SampleLoadError: naming the unreadable file.
    """
    _check_template(image_tmpl)
    source = open_source(os.fspath(path), image_tmpl, index_start)
    n = frame_count(source, int(listed_frames))
    rules = _rules(test_rules)
    transform = build_transform("test", input_size, num_crops=num_crops, resize=rules["resize"])
    return sample_test_views(source, n, num_frames, num_clips, transform, rules["frames"])
