"""Clip transforms: the T2L training augmentation and the test views, on whole clips at once.

Input is a uint8 clip ``(T, 3, H, W)`` (RGB, as the readers return it); output is float32,
normalised with the CLIP mean and std. Every random choice (crop, flip, jitter factors, greyscale)
is drawn once per clip from the ``torch.Generator`` passed in, so all T frames get the same
augmentation and a given generator state gives the same result in any process.

Training (METHOD.md, "Training recipe"): multi-scale crop (scales 1, .875, .75, .66 of the short side, aspect ratios
from neighbouring scales, 13 fixed positions) resized to S x S; horizontal flip p=0.5 (turn off for
Something-Something); colour jitter p=0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1,
in random order); greyscale p=0.2.

Testing: resize the short side to ``int(S * 256 / 224)`` and take the centre S x S crop. With three
crops the short side is resized to S and the crops sit at the start, middle and end of the long side,
so that together they cover the whole frame (the multi-view convention of X-CLIP / ViFi-CLIP). The
resize is one of two (``resize``):

- ``"pil_bicubic"`` (the default): Pillow's bicubic resize of every frame, exactly what the published
  T2L test code does (torchvision's ``Resize`` on PIL images); a frame whose short side already has the
  target size is not resized.
- ``"bilinear"``: torch's antialiased bilinear resize of the whole uint8 clip at once (faster, and it
  runs on any device); it differs from Pillow's bicubic by about 1 grey level on average.

Speed: crops are slices; the resize runs on uint8 channels-last data (torch's vectorised antialias
path); jitter runs in float on the already-small S x S clip, with a vectorised HSV hue shift
(torchvision's ``adjust_hue`` costs ~3x as much).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image

from clip import IMAGE_MEAN as CLIP_MEAN  # the one definition: the normalisation the CLIP weights were trained with
from clip import IMAGE_STD as CLIP_STD

__all__ = ["CLIP_MEAN", "CLIP_STD", "TrainTransform", "TestTransform", "build_transform",
           "adjust_hue", "normalize", "TEST_RESIZES"]

MULTI_SCALES = (1.0, 0.875, 0.75, 0.66)

# The 13 crop positions of TSN's multi-scale crop, in quarters of the free space (x, y).
_FIXED_POSITIONS = ((0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0),
                    (1, 1), (3, 1), (1, 3), (3, 3))


def _resize(clip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear antialiased resize of a uint8 ``(T, 3, h, w)`` clip to ``(T, 3, height, width)``.

    On the CPU the clip stays uint8 (torch's vectorised uint8 antialias kernel, which rounds to whole grey levels).
    On another device (the batch half of the pipeline on a GPU) it is resized in float32 and not rounded: within half
    a grey level of the CPU result.
    """
    if clip.shape[-2:] == (height, width):
        return clip
    if clip.device.type != "cpu":
        return nnf.interpolate(clip.float(), size=(height, width), mode="bilinear", antialias=True,
                               align_corners=False)
    # torch has a fast vectorised uint8 antialias kernel for channels-last 3-channel images.
    clip = clip.contiguous(memory_format=torch.channels_last)
    return nnf.interpolate(clip, size=(height, width), mode="bilinear", antialias=True,
                           align_corners=False)


TEST_RESIZES = ("pil_bicubic", "bilinear")


def _resize_pil_bicubic(clip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pillow bicubic resize of every frame of a uint8 ``(T, 3, h, w)`` clip (the published test view)."""
    if clip.shape[-2:] == (height, width):
        return clip  # torchvision's Resize returns such a frame untouched
    frames = clip.permute(0, 2, 3, 1).numpy()  # (T, h, w, 3); a view of the reader's channels-last memory
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(f)).resize((width, height), Image.BICUBIC))
                    for f in frames])
    return torch.from_numpy(out).permute(0, 3, 1, 2)  # (T, height, width, 3) -> (T, 3, height, width)


def _to_float(clip: torch.Tensor) -> torch.Tensor:
    """uint8 levels (or the float32 levels of a resize off the CPU, see _resize) -> float32 in [0, 1], contiguous
    (T, 3, H, W)."""
    return clip.contiguous().to(torch.float32).div_(255.0)


def normalize(clip: torch.Tensor, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """(x - mean) / std per channel on a float ``(..., 3, H, W)`` tensor in [0, 1] (in place)."""
    m = torch.tensor(mean, dtype=clip.dtype, device=clip.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=clip.dtype, device=clip.device).view(3, 1, 1)
    return clip.sub_(m).div_(s)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of a float ``(..., 3, H, W)`` tensor -> ``(..., 1, H, W)`` (torchvision weights)."""
    r, g, b = x.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


_CHANNEL_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)  # R, G, B in the HSV -> RGB formula


def adjust_hue(x: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """Shift the HSV hue of a float ``(..., 3, H, W)`` tensor in [0, 1] by ``hue_factor`` turns.

    Same result as ``torchvision.transforms.v2.functional.adjust_hue`` (to float rounding) at a
    third of its cost: value and chroma are kept, only the hue angle moves, and each channel is
    rebuilt as ``v - c * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6h) mod 6`` (n = 5, 3, 1).
    Only plain arithmetic is used (no ``where``/``remainder``, which are slow on CPU).
    """
    if hue_factor == 0:
        return x
    r, g, b = x.unbind(-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    # Which channel holds the maximum; r wins ties, then g (the order torchvision uses).
    is_r = (maxc == r).to(x.dtype)
    is_g = (maxc == g).to(x.dtype).mul_(1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    c2 = 2.0 * chroma
    # hue * chroma in sextants: (g-b), 2c + (b-r) or 4c + (r-g) depending on the max channel
    hc = is_r * (g - b) + is_g * (b - r + c2) + is_b * (r - g + 2.0 * c2)
    # + 6 keeps h positive for the floor-based modulo below (h >= -1 before the shift, |shift| <= 3)
    h = hc.div_(chroma.clamp(min=1e-12)).add_(6.0 + 6.0 * hue_factor)
    k = h.unsqueeze(-3) + _CHANNEL_OFFSETS.to(x.device, x.dtype)  # (..., 1, H, W) + (3, 1, 1) -> (..., 3, H, W)
    k -= 6.0 * torch.floor(k * (1.0 / 6.0))
    t = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc.unsqueeze(-3) - chroma.unsqueeze(-3) * t


def _jitter(x: torch.Tensor, order: List[int], b: float, c: float, s: float, h: float) -> torch.Tensor:
    """Colour jitter with given factors, in the given order, clamping to [0, 1] after each step."""
    for op in order:
        if op == 0:
            x = x.mul(b).clamp_(0.0, 1.0)
        elif op == 1:
            # Contrast blends with the mean grey level of each frame (as torchvision / PIL do).
            mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
            x = x.mul(c).add_(mean * (1.0 - c)).clamp_(0.0, 1.0)
        elif op == 2:
            x = x.mul(s).add_(_gray(x) * (1.0 - s)).clamp_(0.0, 1.0)
        else:
            x = adjust_hue(x, h).clamp_(0.0, 1.0)
    return x


def _uniform(g: Optional[torch.Generator], lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


class TrainTransform:
    """Training augmentation for one clip (see the module docstring).

    Needs: uint8 ``(T, 3, H, W)``. Gives: float32 ``(T, 3, S, S)``, CLIP-normalised.
    """

    def __init__(self, input_size: int = 224, flip: bool = True,
                 scales: Sequence[float] = MULTI_SCALES, max_distort: int = 1,
                 jitter_p: float = 0.8, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1, grayscale_p: float = 0.2,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5] (a fraction of the hue circle), got {hue}")
        if not scales or any(not 0 < s <= 1 for s in scales):
            raise ValueError(f"crop scales must be fractions in (0, 1], got {scales}")
        self.size = int(input_size)
        self.flip = flip
        self.scales = tuple(scales)
        self.max_distort = max_distort
        self.jitter_p, self.grayscale_p = jitter_p, grayscale_p
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.mean, self.std = mean, std

    def sample_crop(self, height: int, width: int,
                    g: Optional[torch.Generator] = None) -> Tuple[int, int, int, int]:
        """Multi-scale crop box ``(top, left, crop_h, crop_w)`` for a ``height x width`` frame."""
        base = min(height, width)
        sizes = [int(base * s) for s in self.scales]
        # A size within 3 px of the output is snapped to it (saves a resize that would only blur).
        sizes = [self.size if abs(x - self.size) < 3 and self.size <= base else x for x in sizes]
        pairs = [(h, w) for i, h in enumerate(sizes) for j, w in enumerate(sizes)
                 if abs(i - j) <= self.max_distort]
        crop_h, crop_w = pairs[int(torch.randint(len(pairs), (), generator=g))]
        crop_h, crop_w = max(1, min(crop_h, height)), max(1, min(crop_w, width))
        step_x, step_y = (width - crop_w) // 4, (height - crop_h) // 4
        qx, qy = _FIXED_POSITIONS[int(torch.randint(len(_FIXED_POSITIONS), (), generator=g))]
        return qy * step_y, qx * step_x, crop_h, crop_w

    def sample(self, height: int, width: int, generator: Optional[torch.Generator] = None) -> dict:
        """Every random choice for one clip of ``height x width`` frames, drawn from ``generator``.

        The result (plain Python numbers) is what :meth:`apply` needs; splitting the two lets a DataLoader worker
        draw the choices next to the decoding and the device apply them to a whole batch.
        """
        g = generator
        top, left, ch, cw = self.sample_crop(height, width, g)
        # Draw every random number in a fixed order whether or not it is used, so that the
        # augmentation of a clip does not depend on which branches earlier draws took.
        do_flip = bool(torch.rand((), generator=g) < 0.5)
        do_jitter = bool(torch.rand((), generator=g) < self.jitter_p)
        order = torch.randperm(4, generator=g).tolist()
        b = _uniform(g, max(0.0, 1 - self.brightness), 1 + self.brightness)
        c = _uniform(g, max(0.0, 1 - self.contrast), 1 + self.contrast)
        s = _uniform(g, max(0.0, 1 - self.saturation), 1 + self.saturation)
        h = _uniform(g, -self.hue, self.hue)
        do_gray = bool(torch.rand((), generator=g) < self.grayscale_p)
        return {"box": (top, left, ch, cw), "flip": self.flip and do_flip, "jitter": do_jitter, "order": order,
                "factors": (b, c, s, h), "gray": do_gray}

    def apply(self, clip: torch.Tensor, params: dict) -> torch.Tensor:
        """The augmentation :meth:`sample` chose, on ``clip`` (uint8 ``(T, 3, H, W)``) on any device."""
        _check_clip(clip)
        top, left, ch, cw = params["box"]
        x = _resize(clip[..., top:top + ch, left:left + cw], self.size, self.size)
        if params["flip"]:
            x = x.flip(-1)
        x = _to_float(x)
        if params["jitter"]:
            x = _jitter(x, params["order"], *params["factors"])
        if params["gray"]:
            x = _gray(x).expand_as(x).contiguous()
        return normalize(x, self.mean, self.std)

    def __call__(self, clip: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Augment ``clip`` (uint8 ``(T, 3, H, W)``) with randomness from ``generator``."""
        _check_clip(clip)
        return self.apply(clip, self.sample(clip.shape[-2], clip.shape[-1], generator))


class TestTransform:
    """Deterministic test view(s) of one clip (see the module docstring).

    Needs: uint8 ``(T, 3, H, W)`` (T may be several clips' frames stacked: the transform is per frame).
    Gives: float32 ``(T, 3, S, S)`` for one crop, ``(3, T, 3, S, S)`` for three crops.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, input_size: int = 224, num_crops: int = 1, resize: str = "pil_bicubic",
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        if num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
        if resize not in TEST_RESIZES:
            raise ValueError(f"test resize must be one of {TEST_RESIZES}, got {resize!r}")
        self.size = int(input_size)
        self.num_crops = num_crops
        self.resize = resize
        self.scale_size = int(self.size * 256 / 224) if num_crops == 1 else self.size
        self.mean, self.std = mean, std

    def __call__(self, clip: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Resize and crop ``clip`` (uint8 ``(T, 3, H, W)``); ``generator`` is unused."""
        _check_clip(clip)
        h, w = clip.shape[-2:]
        short = self.scale_size
        # Short side -> scale_size, keeping the aspect ratio (long side truncated, as torchvision).
        nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        x = (_resize_pil_bicubic if self.resize == "pil_bicubic" else _resize)(clip, nh, nw)
        S = self.size
        if self.num_crops == 1:
            top, left = int(round((nh - S) / 2.0)), int(round((nw - S) / 2.0))
            return normalize(_to_float(x[..., top:top + S, left:left + S]), self.mean, self.std)
        if nw >= nh:
            boxes = [((nh - S) // 2, left) for left in (0, (nw - S) // 2, nw - S)]
        else:
            boxes = [(top, (nw - S) // 2) for top in (0, (nh - S) // 2, nh - S)]
        crops = [x[..., t:t + S, l:l + S] for t, l in boxes]
        return normalize(_to_float(torch.stack(crops)), self.mean, self.std)  # (3, T, 3, S, S)


def _check_clip(clip: torch.Tensor) -> None:
    if not isinstance(clip, torch.Tensor) or clip.dim() != 4 or clip.shape[1] != 3 or clip.dtype != torch.uint8:
        desc = f"{tuple(clip.shape)} {clip.dtype}" if isinstance(clip, torch.Tensor) else type(clip).__name__
        raise ValueError(f"expected a uint8 clip of shape (T, 3, H, W), got {desc}")


def build_transform(mode: str, input_size: int = 224, flip: bool = True,
                    num_crops: int = 1, **options) -> Callable[..., torch.Tensor]:
    """The clip transform for ``mode`` ("train" or "test").

    Args:
        mode: ``"train"``: :class:`TrainTransform` (``flip=False`` for Something-Something);
            ``"test"``: :class:`TestTransform` with ``num_crops`` 1 or 3.
        input_size: S, the output side.
        options: passed to the transform class (e.g. ``scales``, ``jitter_p``, ``mean``, ``std``; ``resize``
            for testing).

    Returns:
        ``transform(clip_uint8_T3HW, generator=None)`` -> float32 ``(T, 3, S, S)``, or
        ``(num_crops, T, 3, S, S)`` when testing with 3 crops.
    """
    if mode == "train":
        if num_crops != 1:
            raise ValueError("num_crops is a test-time option; training takes one crop")
        return TrainTransform(input_size, flip=flip, **options)
    if mode == "test":
        return TestTransform(input_size, num_crops=num_crops, **options)
    raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
