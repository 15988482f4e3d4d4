"""Frames in and out: any layout, dtype, size or device in; (T, 3, H, W) floats in [0, 1] out.

Resizing keeps the aspect ratio: the source is centre-cropped to the target aspect, then resized
with antialiasing (a 16:9 webcam streamed at 512x512 keeps round faces round).

Scope's frames (uint8 RGB, the source's size) can skip the host side of that: :func:`raw_batch`
stacks them as they are and the model step converts and resizes them (:func:`to_unit`), inside its
CUDA graph in the graph modes, so a call costs the host one copy instead of a conversion per frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# Integer frames are 0-255 intensities (as Scope sends uint8), except 16-bit images; bool is 0/1.
_INTEGER_SCALE = {torch.uint16: 65535.0, torch.bool: 1.0} if hasattr(torch, "uint16") else {torch.bool: 1.0}


def snap_to_multiple(value: int, multiple: int = 8, minimum: int = 64) -> int:
    return max(minimum, (int(value) // multiple) * multiple)


def _channels_last_layout(frame: torch.Tensor) -> bool:
    """True for (..., H, W, C); False for channels-first (..., C, H, W)."""
    if frame.shape[-1] in (1, 3, 4):
        return True
    if frame.shape[-3] in (1, 3, 4):
        return False
    raise ValueError(f"frame of shape {tuple(frame.shape)} has no 1-, 3- or 4-channel axis")


def to_chw01(frame, device: torch.device) -> torch.Tensor:
    """One frame -> (3, H, W) float32 in [0, 1] on ``device``: drops batch dims of 1, alpha, converts grey."""
    if not isinstance(frame, torch.Tensor):
        try:
            frame = torch.as_tensor(frame)
        except ValueError:  # a numpy view with negative strides (OpenCV's BGR->RGB frame[..., ::-1])
            import numpy as np

            frame = torch.as_tensor(np.ascontiguousarray(frame))
    while frame.dim() > 3 and frame.shape[0] == 1:
        frame = frame[0]
    if frame.dim() == 2:
        frame = frame.unsqueeze(-1)
    if frame.dim() != 3:
        raise ValueError(f"expected a frame of shape (H, W, C) or (1, H, W, C), got {tuple(frame.shape)}")
    if _channels_last_layout(frame):
        frame = frame.permute(2, 0, 1)
    if frame.shape[1] == 0 or frame.shape[2] == 0:
        raise ValueError(f"empty frame of shape {tuple(frame.shape)}")
    if frame.is_complex():
        raise ValueError("complex-valued frames are not images")
    in_range = frame.dtype == torch.uint8  # Scope's frames: already in [0, 255], nothing to sanitise
    scale = _INTEGER_SCALE.get(frame.dtype, 1.0 if frame.is_floating_point() else 255.0)
    frame = frame.to(device=device, non_blocking=True).to(torch.float32)
    if scale != 1.0:
        frame = frame / scale
    channels = frame.shape[0]
    if channels == 1:
        frame = frame.expand(3, -1, -1)
    elif channels == 4:
        frame = frame[:3]
    if not in_range:
        frame = torch.nan_to_num(frame, nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0)
    return frame


def fit(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Centre-crop (B, C, h, w) to the aspect of width x height, then resize to it."""
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    target = width / height
    if w / h > target:
        new_w = max(1, round(h * target))
        left = (w - new_w) // 2
        images = images[..., :, left : left + new_w]
    else:
        new_h = max(1, round(w / target))
        top = (h - new_h) // 2
        images = images[..., top : top + new_h, :]
    antialias = images.shape[-1] > width or images.shape[-2] > height
    return F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=antialias)


def _is_stack(frames) -> bool:
    """A (T, H, W, C) tensor or array with T > 1."""
    return getattr(frames, "ndim", 0) == 4 and frames.shape[0] > 1


def _frame_list(video) -> list | tuple:
    """``video`` as a list of frames: a (T, H, W, C) tensor or array with T > 1 splits (also as an
    item of a list), one frame is wrapped."""
    if _is_stack(video):
        return list(video)
    if not isinstance(video, (list, tuple)):
        return [video]
    if any(_is_stack(f) for f in video):
        return [frame for f in video for frame in (list(f) if _is_stack(f) else [f])]
    return video


def frames_to_batch(video, width: int, height: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A list of frames (or one (T, H, W, C) tensor) -> (T, 3, height, width) in [0, 1]."""
    video = _frame_list(video)
    if len(video) == 0:
        raise ValueError("video is an empty list of frames")
    # Resized in float32, cast to the model's dtype once at the end.
    return torch.stack([fit(to_chw01(f, device).unsqueeze(0), width, height)[0] for f in video]).to(dtype)


def raw_batch(video) -> torch.Tensor | None:
    """uint8 RGB frames of one size -- (1, H, W, 3) or (H, W, 3) each, or one (T, H, W, 3) tensor, on
    one device -- as one uint8 (T, H, W, 3) batch, untouched, where they are; else None (the general
    path, :func:`frames_to_batch`). :func:`to_unit` converts and resizes it later."""
    if isinstance(video, torch.Tensor) and video.dim() == 4 and video.shape[-1] == 3 and video.shape[0] > 1:
        return video if video.dtype == torch.uint8 and video.numel() > 0 else None  # as it is, no split
    video = _frame_list(video)
    if not video or not all(isinstance(f, torch.Tensor) and f.dtype == torch.uint8 and f.dim() in (3, 4)
                            and f.shape[-1] == 3 and f.numel() == 3 * f.shape[-3] * f.shape[-2] > 0 for f in video):
        return None
    shape = tuple(video[0].shape[-3:])
    if any(tuple(f.shape[-3:]) != shape for f in video) or len({f.device for f in video}) != 1:
        return None
    return video[0].reshape(1, *shape) if len(video) == 1 else torch.stack([f.reshape(shape) for f in video])


def to_unit(images: torch.Tensor, width: int, height: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A :func:`raw_batch` (uint8 (T, h, w, 3)) -> (T, 3, height, width) in [0, 1], computed as
    :func:`frames_to_batch` computes it (the same values, left channels-last as the convolutions
    want them) in ``dtype`` (float32 by default); other batches pass through unchanged."""
    if images.dtype != torch.uint8:
        return images
    unit = fit(images.permute(0, 3, 1, 2).to(torch.float32) / 255.0, width, height)
    return unit if dtype is None else unit.to(dtype)


def batch_to_frames(images: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) in [0, 1] -> (T, H, W, 3) float32, Scope's output layout."""
    return images.permute(0, 2, 3, 1).float().contiguous()
