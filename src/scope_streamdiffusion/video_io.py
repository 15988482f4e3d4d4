"""Frames in and out of files for the command line: video (PyAV), images, folders, webcam, test pattern.

Readers yield ``(H, W, 3)`` uint8 torch tensors, upright as a player shows them (display rotation,
EXIF orientation), and describe the source (frame rate, length if known, audio track). Writers take the
same kind of frames. Every problem a user can fix (missing file, unreadable video, no webcam,
unsupported output) raises :class:`MediaError` with a one-line message.
"""

from __future__ import annotations

import collections
import itertools
import math
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".gif")
DEFAULT_FPS = Fraction(30)


class MediaError(RuntimeError):
    """An input or output the user can fix; the message is one line."""


@dataclass
class AudioTrack:
    """Where the audio of the source lives, so the writer can copy its packets unchanged."""

    path: str
    stream_index: int
    codec: str
    start: float = 0.0  # start time of the source's video: audio is shifted by it to stay in sync


@dataclass
class Source:
    """An opened input: ``frames`` yields (H, W, 3) uint8 tensors; call ``close`` when done."""

    name: str
    frames: Iterator[torch.Tensor]
    fps: Fraction
    total: int | None = None  # frame count if known (for the progress bar)
    audio: AudioTrack | None = None
    live: bool = False  # a camera: frames carry wall-clock timestamps, never ends on its own
    # Live only: capture time of each frame read and not yet written (the writer pops them in order).
    timestamps: collections.deque = field(default_factory=collections.deque)
    text: bool = False  # no input frames (text-to-image): ``frames`` yields None
    _close: object = None

    def close(self) -> None:
        if callable(self._close):
            self._close()
            self._close = None


# ----- inputs ---------------------------------------------------------------------------------------


def is_webcam(spec: str) -> bool:
    return spec == "webcam" or spec.startswith(("webcam:", "/dev/video"))


def open_source(spec: str | None, *, width: int, height: int, frames: int | None = None,
                fps: float | None = None) -> Source:
    """Open ``spec``: "testpattern" (or None), "text" (no input: text-to-image, frames are None),
    "webcam[:N]", a /dev/video path, a video, an image or a folder of images. ``frames`` limits the
    length (and sets the test pattern's); ``fps`` overrides the frame rate of images and the test
    pattern (videos and cameras keep their own)."""
    rate = Fraction(fps).limit_denominator(1001) if fps else None
    if spec == "text":  # text-to-image: no input frames, the pipeline runs in text mode
        count = frames if frames is not None else 1
        return Source("text (no input)", iter([None] * count), rate or DEFAULT_FPS, total=count, text=True)
    if spec is None or spec == "testpattern":
        count = frames if frames is not None else 120
        return Source("test pattern", test_pattern(count, width, height, rate or DEFAULT_FPS), rate or DEFAULT_FPS,
                      total=count)
    if is_webcam(spec):
        return _open_webcam(spec, frames)
    path = Path(spec).expanduser()
    if not path.exists():
        raise MediaError(f"Input '{spec}' does not exist. Fix: check the path, or use --input testpattern "
                         "or --input webcam:0.")
    if path.is_dir():
        return _open_folder(path, frames, rate or DEFAULT_FPS)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return Source(path.name, _limit(iter([read_image(path)]), frames), rate or DEFAULT_FPS, total=1)
    return _open_video(path, frames)


def _limit(frames: Iterator[torch.Tensor], count: int | None) -> Iterator[torch.Tensor]:
    for i, frame in enumerate(frames):
        if count is not None and i >= count:
            return
        yield frame


def test_pattern(count: int, width: int, height: int, fps: Fraction = DEFAULT_FPS) -> Iterator[torch.Tensor]:
    """A moving pattern (colour waves, a bouncing disc, a sweeping bar) so motion is easy to judge."""
    ys = torch.linspace(0, 1, height).view(-1, 1)
    xs = torch.linspace(0, 1, width).view(1, -1)
    for i in range(count):
        t = i / float(fps)
        r = 0.5 + 0.5 * torch.sin(2 * math.pi * (xs + 0.25 * t))
        g = 0.5 + 0.5 * torch.sin(2 * math.pi * (ys - 0.2 * t) + 1.0)
        b = 0.5 + 0.5 * torch.sin(2 * math.pi * (xs + ys) * 1.5 + 3 * t)
        img = torch.stack([r.expand(height, width), g.expand(height, width), b.expand(height, width)], dim=-1)
        # A white disc bouncing on a Lissajous path: a sharp edge that moves every frame.
        cx, cy = 0.5 + 0.35 * math.sin(1.3 * t), 0.5 + 0.35 * math.sin(1.7 * t + 0.5)
        disc = ((xs - cx) ** 2 + (ys - cy) ** 2) < 0.12**2
        img[disc] = 1.0
        # A dark vertical bar sweeping left to right once every 4 seconds.
        bar = ((xs - (t / 4.0) % 1.0).abs() < 0.03).expand(height, width)
        img[bar] = img[bar] * 0.2
        yield (img * 255).round().to(torch.uint8)


def read_image(path: Path) -> torch.Tensor:
    """An image as a viewer shows it: EXIF orientation applied, 16-bit and float pixels scaled to 0..255."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return torch.from_numpy(_rgb_array(_exif_upright(im)))
    except (UnidentifiedImageError, OSError) as exc:
        raise MediaError(f"Cannot read image '{path}' ({exc}). Fix: use a PNG/JPEG/WebP file.") from exc


def _exif_upright(im):
    # Phone photos are stored sideways with an EXIF Orientation tag saying how to turn them.
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels are still good, shown as stored
        return im


def _rgb_array(im):
    """(H, W, 3) uint8 from a PIL image of any mode."""
    import numpy as np

    # convert("RGB") clips 16/32-bit integers (mode I;16, I) to white and 0..1 floats (mode F) to black.
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        grey = _grey_to_uint8(np.asarray(im))
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.array(im.convert("RGB"), dtype=np.uint8, copy=True)


def _grey_to_uint8(values):
    """Greyscale of 16/32-bit integers or floats -> uint8: 16-bit values /257; floats as 0..1
    intensities, or as 0..255 values when any exceeds 1 (both clipped); 32-bit values beyond 16 bits
    stretched from their minimum to their maximum."""
    import numpy as np

    if values.size == 0:
        return values.astype(np.uint8)
    if values.dtype.kind == "f":
        values = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if values.max() <= 1.0 else 1.0
        return (np.clip(values * scale, 0.0, 255.0) + 0.5).astype(np.uint8)
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi > 65535:
        return ((values.astype(np.int64) - lo) * 255 // max(hi - lo, 1)).astype(np.uint8)
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _open_folder(path: Path, frames: int | None, fps: Fraction) -> Source:
    files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS), key=_natural_key)
    if not files:
        raise MediaError(f"Folder '{path}' holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    if frames is not None:
        files = files[:frames]
    return Source(f"{path.name}/ ({len(files)} images)", (read_image(f) for f in files), fps, total=len(files))


def _natural_key(p: Path):
    # frame2.png sorts before frame10.png.
    import re

    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", p.name)]


def _open_video(path: Path, frames: int | None) -> Source:
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise MediaError(f"Cannot read video '{path}' ({_av_reason(exc)}). Fix: check that the file is a "
                         "complete video (mp4, mkv, mov, webm, ...).") from exc
    if not container.streams.video:
        container.close()
        raise MediaError(f"'{path}' has no video stream. Fix: pass a video file, an image or a folder of images.")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame-threaded decoding; the default is slice-only
    fps = stream.average_rate or stream.guessed_rate or DEFAULT_FPS
    fps = Fraction(fps.numerator, fps.denominator)
    if container.format.name == "gif" and stream.frames and stream.duration and stream.time_base:
        # GIF delays are whole 1/100 s (30 fps is 3, 4, 3, ...) and FFmpeg's average rate is the
        # first delay's (100/3): the mean over the whole file keeps the GIF's length.
        fps = (stream.frames / (stream.duration * stream.time_base)).limit_denominator(1001)
    total = stream.frames or None
    if not total and stream.duration and stream.time_base:
        total = int(round(float(stream.duration * stream.time_base * fps)))
    elif not total and container.duration:
        total = int(round(container.duration / 1_000_000 * float(fps)))
    if frames is not None:
        total = min(total, frames) if total else frames
    audio = None
    if container.streams.audio:
        a = container.streams.audio[0]
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        audio = AudioTrack(str(path), a.index, a.codec_context.name, start)

    stream_angle = _stream_rotation(stream)

    def decode() -> Iterator[torch.Tensor]:
        try:
            for frame in container.decode(stream):
                image = frame.to_ndarray(format="rgb24")
                yield torch.from_numpy(_upright(image, _orientation(frame, stream_angle)))
        except av.error.FFmpegError as exc:
            raise MediaError(f"Cannot decode video '{path}' ({_av_reason(exc)}). Fix: re-encode or repair "
                             "the file.") from exc

    return Source(path.name, _limit(decode(), frames), fps, total=total, audio=audio, _close=container.close)


# (transpose, flip left-right, flip top-bottom) for a counter-clockwise turn of 0, 90, 180, 270 degrees.
_QUARTER_TURNS = ((False, False, False), (True, False, True), (False, True, True), (True, True, False))


def _stream_rotation(stream) -> float:
    """Counter-clockwise degrees of the stream's display matrix as PyAV < 14 reports it, else 0."""
    try:
        angle = float(stream.side_data.get("DISPLAYMATRIX", 0.0))  # PyAV 12-13; gone in 14
    except Exception:  # noqa: BLE001 - absent in this PyAV
        return 0.0
    return angle if math.isfinite(angle) else 0.0


def _orientation(frame, stream_angle: float = 0.0) -> tuple[bool, bool, bool]:
    """(transpose, hflip, vflip) that show ``frame`` as a player does (ffplay's autorotate): phone
    videos are stored sideways with a display matrix saying how to turn them."""
    matrix = _frame_display_matrix(frame)
    if matrix is not None:
        a, b, c, d = (float(v) for v in (matrix[0], matrix[1], matrix[3], matrix[4]))
        # Output x = a*x + c*y, y = b*x + d*y, snapped to the nearest quarter turn.
        if abs(a) + abs(d) >= abs(b) + abs(c):
            return False, a < 0, d < 0
        return True, c < 0, b < 0
    angle = getattr(frame, "rotation", 0) or stream_angle  # PyAV >= 14.3 (rotation only, no flips)
    return _QUARTER_TURNS[round(angle / 90) % 4]


def _frame_display_matrix(frame):
    """The frame's display matrix (FFmpeg's 9 int32) or None. Decoders copy the container's onto
    every frame (FFmpeg 6.1 and later)."""
    import numpy as np

    try:
        for data in frame.side_data:
            if getattr(data.type, "name", None) == "DISPLAYMATRIX":
                matrix = np.frombuffer(bytes(data), dtype=np.int32)
                return matrix if matrix.size == 9 else None
    except Exception:  # noqa: BLE001 - side data this PyAV cannot name: fall back to frame.rotation
        pass
    return None


def _upright(image, orientation: tuple[bool, bool, bool]):
    """Apply :func:`_orientation` to an (H, W, C) array; contiguous, as torch.from_numpy needs."""
    import numpy as np

    transpose, hflip, vflip = orientation
    if not (transpose or hflip or vflip):
        return image
    if transpose:
        image = image.transpose(1, 0, 2)
    if vflip:
        image = image[::-1]
    if hflip:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def _av_reason(exc: Exception) -> str:
    # PyAV errors repeat the file name; keep the FFmpeg reason only.
    return getattr(exc, "strerror", None) or str(exc).split(":")[0] or type(exc).__name__


def _webcam_device(spec: str) -> tuple[str, str | None]:
    """(device, input format) for "webcam", "webcam:N" or a /dev/video path on this OS."""
    index = spec.split(":", 1)[1] if spec.startswith("webcam:") else "0"
    if spec.startswith("/dev/"):
        return spec, "v4l2"
    if sys.platform == "darwin":
        return index, "avfoundation"
    if sys.platform == "win32":
        return (index if index.startswith("video=") else f"video={index}"), "dshow"
    return f"/dev/video{index}", "v4l2"


def _open_webcam(spec: str, frames: int | None) -> Source:
    import av

    device, fmt = _webcam_device(spec)
    if fmt == "v4l2" and not Path(device).exists():
        raise MediaError(f"No webcam at {device}. Fix: plug a camera in, check `ls /dev/video*`, or pass "
                         "--input webcam:N with another index.")
    try:
        container = av.open(device, format=fmt, options={"framerate": "30"} if fmt != "v4l2" else {})
        stream = container.streams.video[0]
    except (av.error.FFmpegError, OSError, IndexError) as exc:
        raise MediaError(f"Cannot open webcam {device} ({_av_reason(exc)}). Fix: check that no other program "
                         "uses it and that you may read it (the 'video' group on Linux).") from exc
    fps = stream.average_rate or stream.guessed_rate or DEFAULT_FPS
    grabber = _LatestFrame(container, stream)
    source = Source(f"webcam {device}", iter(()), Fraction(fps.numerator, fps.denominator), total=frames,
                    live=True, _close=grabber.close)

    def frames_iter() -> Iterator[torch.Tensor]:
        for _ in range(frames) if frames is not None else itertools.count():
            frame, stamp = grabber.next()
            source.timestamps.append(stamp)
            yield frame

    source.frames = frames_iter()
    return source


class _LatestFrame:
    """Decodes a camera on a thread and keeps only the newest frame, so a slow model never falls
    behind the live picture (frames it has no time for are dropped, not queued)."""

    def __init__(self, container, stream):
        self.container, self.stream = container, stream
        self._cond = threading.Condition()
        self._frame: torch.Tensor | None = None
        self._stamp = 0.0
        self._error: Exception | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="webcam", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for frame in self.container.decode(self.stream):
                image = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                with self._cond:
                    self._frame, self._stamp = image, time.monotonic()
                    self._cond.notify_all()
                if self._stop:
                    break
            raise MediaError("The webcam stopped sending frames.")
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        finally:
            # Closed by the thread that decodes, never under it (a camera stuck in a read).
            try:
                self.container.close()
            except Exception:  # noqa: BLE001 - closing a camera that already failed
                pass

    def next(self) -> tuple[torch.Tensor, float]:
        with self._cond:
            while self._frame is None and self._error is None:
                if not self._cond.wait(timeout=10.0):
                    raise MediaError("The webcam sent no frame for 10 s. Fix: check the camera.")
            if self._frame is None:
                raise self._error if isinstance(self._error, MediaError) else MediaError(
                    f"Webcam error: {self._error}")
            frame, self._frame = self._frame, None
            return frame, self._stamp

    def close(self, timeout: float = 2.0) -> None:
        """Stop decoding. A camera stuck in a read is left to its (daemon) thread, which closes it
        when the read returns: closing it from here would free it under that read."""
        self._stop = True
        self._thread.join(timeout=timeout)


# ----- outputs --------------------------------------------------------------------------------------


def output_kind(spec: str) -> str:
    """"video", "image" (one file) or "folder" of PNGs."""
    suffix = Path(spec).suffix.lower()
    if spec.endswith(("/", "\\")) or not suffix:
        return "folder"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    return "folder"


def uint8_frame(frame: torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3) float in [0, 1] (any device) -> contiguous uint8 on the CPU."""
    if frame.dtype != torch.uint8:
        frame = (frame.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return frame.cpu().contiguous()


class FolderWriter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.count = 0
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MediaError(f"Cannot create output folder '{self.path}' ({exc.strerror}).") from exc

    def write(self, frame: torch.Tensor, timestamp: float | None = None) -> None:
        from PIL import Image

        Image.fromarray(uint8_frame(frame).numpy()).save(self.path / f"{self.count:06d}.png")
        self.count += 1

    def close(self) -> None:
        pass


class ImageWriter:
    """A single image file: the output of a single-image input."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.count = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, frame: torch.Tensor, timestamp: float | None = None) -> None:
        from PIL import Image

        if self.count:
            raise MediaError(f"Output '{self.path}' is one image but the input has several frames. Fix: "
                             "write to a video file (out.mp4) or a folder (out/).")
        Image.fromarray(uint8_frame(frame).numpy()).save(self.path)
        self.count += 1

    def close(self) -> None:
        pass


def pick_video_codec(suffix: str) -> str:
    """h264 when this FFmpeg build can encode it, else mpeg4 (VP9/VP8 for .webm, gif for .gif)."""
    import av

    candidates = {".webm": ("libvpx-vp9", "libvpx"), ".gif": ("gif",)}.get(suffix, ("libx264", "h264", "mpeg4"))
    for name in candidates:
        try:
            av.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - not in this FFmpeg build
            continue
    raise MediaError(f"This FFmpeg build has no encoder for '{suffix}' (tried {', '.join(candidates)}). "
                     "Fix: write .mp4 or a folder of images.")


class VideoWriter:
    """Encodes frames into a video file with PyAV and copies the source's audio packets as they come.
    A .gif is an animated GIF: each frame with its own 256-colour palette, no audio.

    Frames are stamped at a constant ``fps`` (pts = index), or with explicit timestamps for live
    sources (variable frame rate, so playback runs at the speed the frames were captured).
    Audio is muxed up to the time of the last video frame written, so an interrupted run keeps
    audio and video the same length.
    """

    def __init__(self, path: str | Path, *, width: int, height: int, fps: Fraction, audio: AudioTrack | None = None,
                 variable_rate: bool = False):
        import av

        self.path = Path(path)
        self.count = 0
        self.fps = fps
        self.width, self.height = width, height
        self.warnings: list[str] = []
        self._first_stamp: float | None = None
        self._last_pts = -1
        self._offered = 0  # frames given to write(), written or not
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.container = av.open(str(self.path), mode="w")
        except (av.error.FFmpegError, OSError) as exc:
            raise MediaError(f"Cannot write '{self.path}' ({_av_reason(exc)}).") from exc
        codec = pick_video_codec(self.path.suffix.lower())
        self.stream = self.container.add_stream(codec, rate=fps)
        self.stream.width, self.stream.height = width, height
        self._paletted = codec == "gif"
        self.stream.pix_fmt = "pal8" if self._paletted else "yuv420p"
        if codec in ("libx264", "h264"):
            # Near-lossless and light on the CPU, which is busy feeding the GPU.
            self.stream.options = {"crf": "18", "preset": "veryfast"}
        elif self._paletted:
            # No cropping to the changed part nor transparent unchanged pixels: FFmpeg compares a frame's
            # palette indices with the previous frame's even when that one had another palette.
            self.stream.options = {"gifflags": "0"}
        else:
            self.stream.bit_rate = int(width * height * float(fps) * 0.25)
        # Timestamps: frames at 1/fps, or milliseconds for live (variable-rate) sources; a GIF's own 1/100 s.
        self.time_base = Fraction(1, 100) if self._paletted else (
            Fraction(1, 1000) if variable_rate else Fraction(fps.denominator, fps.numerator))
        self.stream.codec_context.time_base = self.time_base
        self.stream.time_base = self.time_base
        self._audio = _AudioCopier(audio, self.container, self.warnings) if audio else None

    def write(self, frame: torch.Tensor, timestamp: float | None = None) -> None:
        import av

        if timestamp is not None and self._first_stamp is None:
            self._first_stamp = timestamp
        if self._paletted:
            seconds = self._offered / self.fps if timestamp is None else timestamp - self._first_stamp
            self._offered += 1
            pts = int(round(seconds * 100))
            if self._last_pts >= 0 and pts < self._last_pts + 2:
                # At most 50 frames a second: two frames in one 1/100 s fail the muxer, and players
                # stretch delays under 2/100 s (to 1/10 s in browsers). A faster source is thinned.
                return
        elif timestamp is None:
            pts = self.count
        else:
            pts = max(int(round((timestamp - self._first_stamp) / self.time_base)), self._last_pts + 1)
        array = uint8_frame(frame).numpy()
        if self._paletted:
            video_frame = av.VideoFrame.from_ndarray(_own_palette(array), format="pal8")
        else:
            video_frame = av.VideoFrame.from_ndarray(array, format="rgb24")
        self._last_pts = pts
        video_frame.pts = pts
        video_frame.time_base = self.time_base
        try:
            for packet in self.stream.encode(video_frame):
                self.container.mux(packet)
            self.count += 1
            if self._audio:
                self._audio.copy_until(float((pts + 1) * self.time_base))
        except av.error.FFmpegError as exc:
            raise MediaError(f"Cannot write '{self.path}' ({_av_reason(exc)}). Fix: check free disk space, "
                             "or write .mkv.") from exc

    def close(self) -> None:
        """Flush the encoder and write the trailer: the file is playable after this, whatever happened."""
        import av

        if self.container is None:
            return
        container, self.container = self.container, None  # closed once, even if closing fails
        try:
            try:
                for packet in self.stream.encode(None):
                    container.mux(packet)
                if self._audio:
                    self._audio.copy_until(float((self._last_pts + 1) * self.time_base))
            finally:
                if self._audio:
                    self._audio.close()
                container.close()
        except av.error.FFmpegError as exc:
            # A raw PyAV error here would not say which file is broken, nor what to do.
            raise MediaError(f"Cannot finish '{self.path}' ({_av_reason(exc)}); the file is incomplete. Fix: "
                             "write .mkv, which holds any audio, or check free disk space.") from exc


def _own_palette(array):
    """(indices, ARGB palette) of an (H, W, 3) uint8 frame reduced to its own 256 colours. FFmpeg's
    rgb8 is one fixed 3-3-2 palette for every picture: grainy, colours off ~4x as much on a photo."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray(array).quantize(256, method=Image.Quantize.FASTOCTREE)
    colours = np.asarray(image.getpalette()[:768], np.uint8).reshape(-1, 3)
    palette = np.zeros((256, 4), np.uint8)
    palette[:, 0] = 255  # opaque
    palette[: len(colours), 1:] = colours
    return np.asarray(image), palette


class _AudioCopier:
    """Remuxes audio packets from the source file (no re-encoding, no quality loss)."""

    def __init__(self, track: AudioTrack, output, warnings: list[str]):
        import av

        self.input = av.open(track.path)
        in_stream = self.input.streams[track.stream_index]
        supported = getattr(output, "supported_codecs", None)
        if (supported is not None and track.codec not in supported) or not _muxer_takes(output.format.name, track):
            warnings.append(f"the audio track ({track.codec}) cannot be stored in "
                            f"{Path(output.name).suffix or 'this container'}; it was left out (write .mkv to keep it)")
            self.input.close()
            self.input = None
            return
        self.stream = _add_template(output, in_stream)
        self.output = output
        self.in_tb = in_stream.time_base
        self.shift = int(round(track.start / in_stream.time_base)) if track.start else 0
        self.packets = self.input.demux(in_stream)
        self.pending = None

    def copy_until(self, seconds: float) -> None:
        """Mux the audio packets that start before ``seconds`` of output time."""
        while self.input is not None:
            if self.pending is None:
                self.pending = next(self.packets, None)
                if self.pending is None:  # the audio ended first
                    self.close()
                    return
                if self.pending.dts is None:  # the demuxer's end-of-stream marker
                    self.pending = None
                    continue
            packet = self.pending
            start = packet.pts if packet.pts is not None else packet.dts
            if float((start - self.shift) * self.in_tb) >= seconds:
                return  # keep it for the next video frame
            self.pending = None
            if self.shift:
                packet.dts -= self.shift
                if packet.pts is not None:
                    packet.pts -= self.shift
            packet.stream = self.stream
            self.output.mux(packet)

    def close(self) -> None:
        if self.input is not None:
            self.input.close()
            self.input = None


def _add_template(container, stream):
    add = getattr(container, "add_stream_from_template", None)
    return add(stream) if add else container.add_stream(template=stream)  # PyAV < 14


def _muxer_takes(format_name: str, track: AudioTrack) -> bool:
    """Whether ``format_name`` can hold ``track``'s packets to the end, tried on a throwaway file in memory.
    Some pass the format's codec list yet fail only when the file is finished, which would lose the
    whole run: PCM without a channel layout (from .mkv) into .mp4 ("unsupported channel layout")."""
    import io

    import av

    try:
        with av.open(track.path) as source:
            in_stream = source.streams[track.stream_index]
            trial = av.open(io.BytesIO(), mode="w", format=format_name)
            try:
                stream = _add_template(trial, in_stream)
                packets = (p for p in source.demux(in_stream) if p.dts is not None)
                for packet in itertools.islice(packets, 4):
                    packet.stream = stream
                    trial.mux(packet)
            finally:
                trial.close()
    except Exception:  # noqa: BLE001 - refused here, the real file would fail the same way
        return False
    return True


def open_writer(spec: str, *, width: int, height: int, fps: Fraction, audio: AudioTrack | None = None,
                variable_rate: bool = False):
    kind = output_kind(spec)
    if kind == "video":
        return VideoWriter(spec, width=width, height=height, fps=fps, audio=audio, variable_rate=variable_rate)
    if kind == "image":
        return ImageWriter(spec)
    return FolderWriter(spec)
