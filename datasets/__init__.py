"""Video data for T2L: list files, frame sampling, frame/video readers, clip transforms, datasets.

Typical use::

    from datasets import VideoDataset
    ds = VideoDataset("lists/k400_train.txt", root="data/k400", num_frames=8, mode="train")
    sample = ds[0]  # {"video": (8, 3, 224, 224) float, "label": int, "index": int, "failed": int}
"""

from .lists import ListFileError, PathRules, VideoRecord, load_class_list, read_list_file
from .readers import SampleLoadError, load_frames, set_video_backend, video_backend
from .sampling import sample_indices
from .transforms import CLIP_MEAN, CLIP_STD, TestTransform, TrainTransform, build_transform
from .video_dataset import TEST_RULES, VideoDataset, failure_summary_line, load_video_clip

__all__ = [
    "ListFileError", "PathRules", "VideoRecord", "load_class_list", "read_list_file",
    "SampleLoadError", "load_frames", "set_video_backend", "video_backend",
    "sample_indices",
    "CLIP_MEAN", "CLIP_STD", "TestTransform", "TrainTransform", "build_transform",
    "TEST_RULES", "VideoDataset", "failure_summary_line", "load_video_clip",
]
