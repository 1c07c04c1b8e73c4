"""Video data for T2L: list files, frame sampling, frame/video readers, clip transforms, datasets.

Typical use::

    from datasets import VideoDataset
    ds = VideoDataset("lists/k400_train.txt", root="data/k400", num_frames=8, mode="train")
    sample = ds[0]  # {"video": (8, 3, 224, 224) float, "label": int, "index": int, "failed": int}
"""

from importlib import import_module

# List files and manifests need no torch, and the data tools (Dataset_creation_scripts/) import only them and the
# readers: everything that needs torch is imported on first use, so `extract_frames.py --help` (and each of its
# runs) does not pay for importing torch.
from .lists import ListFileError, PathRules, VideoRecord, load_class_list, read_list_file

_LAZY = {
    "SampleLoadError": "readers", "load_frames": "readers", "set_video_backend": "readers",
    "video_backend": "readers",
    "sample_indices": "sampling",
    "CLIP_MEAN": "transforms", "CLIP_STD": "transforms", "TestTransform": "transforms",
    "TrainTransform": "transforms", "build_transform": "transforms",
    "TEST_RULES": "video_dataset", "VideoDataset": "video_dataset", "failure_summary_line": "video_dataset",
    "load_video_clip": "video_dataset",
}
_SUBMODULES = {"lists", "readers", "sampling", "transforms", "video_dataset"}

__all__ = ["ListFileError", "PathRules", "VideoRecord", "load_class_list", "read_list_file", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
