"""Reading and writing media files: rotation, high bit depth images, audio the output cannot hold.

Each test makes a tiny file with PyAV or PIL and checks the decoded pixels (or the written file).
"""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from scope_streamdiffusion import cli, video_io
from scope_streamdiffusion.video_io import MediaError, open_source, open_writer, read_image

W, H = 64, 48
CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"


def corner_image() -> np.ndarray:
    """A black (H, W) frame whose top-left quarter is white: every rotation and flip moves it elsewhere."""
    img = np.zeros((H, W, 3), np.uint8)
    img[: H // 2, : W // 2] = 255
    return img


def white_corners(frame) -> list[str]:
    h, w = frame.shape[:2]
    quarters = {"top-left": frame[: h // 2, : w // 2], "top-right": frame[: h // 2, w // 2 :],
                "bottom-left": frame[h // 2 :, : w // 2], "bottom-right": frame[h // 2 :, w // 2 :]}
    return [name for name, q in quarters.items() if float(q.float().mean()) > 128]


def display_matrix(m0: int, m1: int, m3: int, m4: int) -> list[int]:
    """FFmpeg's 3x3 display matrix (16.16 fixed point, the last entry 2.30) from its 2x2 part."""
    one = 1 << 16
    return [m0 * one, m1 * one, 0, m3 * one, m4 * one, 0, 0, 0, 1 << 30]


def set_tkhd_matrix(path: Path, matrix: list[int]) -> None:
    """Write ``matrix`` into the mp4's track header, where phones store it (for PyAV without
    VideoStream.set_display_matrix)."""
    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    version = data[at + 4]
    # version+flags, times/track id/duration (v0: 20 bytes, v1: 32), reserved, layer, group, volume.
    at += 8 + (32 if version == 1 else 20) + 16
    data[at : at + 36] = struct.pack(">9i", *matrix)
    path.write_bytes(bytes(data))


def make_video(path: Path, frames: int = 3, matrix: list[int] | None = None, fps: int = 12,
               pcm_layout: str | None = None) -> Path:
    """``frames`` copies of :func:`corner_image`, with a display matrix and a PCM (s16) track if asked."""
    with av.open(str(path), "w") as out:
        video = out.add_stream(CODEC, rate=fps)
        video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        if matrix is not None and hasattr(video, "set_display_matrix"):
            video.set_display_matrix(matrix)
            matrix = None
        if pcm_layout:
            sound = out.add_stream("pcm_s16le", rate=44100)
            sound.layout = pcm_layout
        for _ in range(frames):
            for packet in video.encode(av.VideoFrame.from_ndarray(corner_image(), format="rgb24")):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if pcm_layout:
            channels = len(av.AudioLayout(pcm_layout).channels)
            samples = 44100 * frames // fps
            wave = (3000 * np.sin(np.arange(samples) / 10)).astype(np.int16)
            for start in range(0, samples, 1024):
                chunk = np.repeat(wave[start : start + 1024], channels)[None, :]  # packed s16: interleaved
                frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout=pcm_layout)
                frame.sample_rate, frame.pts = 44100, start
                for packet in sound.encode(frame):
                    out.mux(packet)
            for packet in sound.encode(None):
                out.mux(packet)
    if matrix is not None:
        set_tkhd_matrix(path, matrix)
    return path


def probe(path: Path) -> dict:
    with av.open(str(path)) as container:
        frames = list(container.decode(container.streams.video[0]))
        return {"frames": len(frames), "audio": len(container.streams.audio)}


def read_all(path: Path) -> list:
    source = open_source(str(path), width=W, height=H)
    try:
        return list(source.frames)
    finally:
        source.close()


# ----- rotation ------------------------------------------------------------------------------------------


# The corner a player shows the stored top-left quarter in. Players (ffplay/ffmpeg autorotate) turn
# rotation 90 counter-clockwise ("cclock"), -90 clockwise ("clock"), 180 upside down, and flip a
# mirrored matrix.
@pytest.mark.parametrize("matrix, corner, size", [
    (display_matrix(0, -1, 1, 0), "bottom-left", (W, H)),  # rotation 90: PyAV's set_display_rotation(90)
    (display_matrix(0, 1, -1, 0), "top-right", (W, H)),  # rotation -90: a phone held upright
    (display_matrix(-1, 0, 0, -1), "bottom-right", (H, W)),  # 180: a phone upside down
    (display_matrix(-1, 0, 0, 1), "top-right", (H, W)),  # mirrored left to right (front camera)
    (None, "top-left", (H, W)),  # no matrix: as stored
], ids=["rot90", "rot-90", "rot180", "hflip", "none"])
def test_video_display_matrix_is_applied(tmp_path, matrix, corner, size):
    frames = read_all(make_video(tmp_path / "clip.mp4", frames=3, matrix=matrix))
    assert len(frames) == 3
    for frame in frames:
        assert tuple(frame.shape) == (*size, 3)
        assert frame.is_contiguous()
        assert white_corners(frame) == [corner]


def test_jpeg_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((H, W, 3), np.uint8)
    stored[:, : W // 2] = 255  # white left half as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: turn 90 degrees clockwise to display (a phone photo taken upright)
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    for frame in (read_image(path), read_all(path)[0]):
        assert tuple(frame.shape) == (W, H, 3)  # portrait
        assert frame[: W // 2].float().mean() > 240 and frame[W // 2 :].float().mean() < 15  # left went to the top


# ----- high bit depth images -----------------------------------------------------------------------------


def bands(values) -> np.ndarray:
    """An (H, W) greyscale image of three vertical bands."""
    img = np.empty((H, W), np.asarray(values).dtype)
    for i, v in enumerate(values):
        img[:, i * W // 3 : (i + 1) * W // 3 + 1] = v
    return img


@pytest.mark.parametrize("values, suffix, mode, expected", [
    (np.array([0, 100 * 257, 65535], np.uint16), ".png", "I;16", [0, 100, 255]),  # 16-bit PNG
    (np.array([0, 100 * 257, 65535], np.int32), ".tif", "I", [0, 100, 255]),  # 32-bit int, 16-bit values
    (np.array([0, 100_000, 200_000], np.int32), ".tif", "I", [0, 127, 255]),  # beyond 16 bits: its range
    (np.array([70_000, 75_000, 80_000], np.int32), ".tif", "I", [0, 127, 255]),  # from its minimum, not 0
    (np.array([0.0, 100 / 255, 1.0], np.float32), ".tif", "F", [0, 100, 255]),  # float intensities 0..1
    (np.array([-0.5, np.nan, 1.0], np.float32), ".tif", "F", [0, 0, 255]),  # negative and NaN: black
    (np.array([0.0, 100.0, 300.0], np.float32), ".tif", "F", [0, 100, 255]),  # floats stored as 0..255: clipped
])
def test_high_bit_depth_greyscale_is_scaled(tmp_path, values, suffix, mode, expected):
    path = tmp_path / f"grey{suffix}"
    Image.fromarray(bands(values)).save(path)
    with Image.open(path) as im:
        assert im.mode in (mode, "I")  # older Pillow reads 16-bit PNGs as I
    frame = read_image(path).numpy()
    assert frame.shape == (H, W, 3) and frame.dtype == np.uint8
    assert (frame == frame[..., :1]).all()  # greyscale stays grey
    got = [int(frame[H // 2, i * W // 3 + W // 6, 0]) for i in range(3)]
    assert got == expected


def test_8bit_rgb_image_unchanged(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "rgb.png")
    assert (read_image(tmp_path / "rgb.png").numpy() == img).all()


# ----- audio the output container cannot hold ------------------------------------------------------------


def mp4_refuses_audio(src: Path, tmp_path: Path) -> bool:
    """Whether this FFmpeg fails to finish an .mp4 holding ``src``'s audio packets copied unchanged.
    FFmpeg 7 and later refuse PCM without a channel layout (as .mkv stores it); 6.1 takes it."""
    try:
        with av.open(str(src)) as source:
            audio = source.streams.audio[0]
            out = av.open(str(tmp_path / "raw.mp4"), "w")
            try:
                add = getattr(out, "add_stream_from_template", None)
                stream = add(audio) if add else out.add_stream(template=audio)
                for packet in source.demux(audio):
                    if packet.dts is not None:
                        packet.stream = stream
                        out.mux(packet)
            finally:
                out.close()
    except av.error.FFmpegError:
        return True
    return False


def test_pcm_audio_into_mp4_left_out_before_any_frame(tmp_path):
    src = make_video(tmp_path / "in.mkv", frames=6, pcm_layout="stereo")
    refused = mp4_refuses_audio(src, tmp_path)
    source = open_source(str(src), width=W, height=H)
    assert source.audio is not None and source.audio.codec == "pcm_s16le"
    writer = open_writer(str(tmp_path / "out.mp4"), width=W, height=H, fps=source.fps, audio=source.audio)
    # Decided when the writer opens, so no frame is ever written into a file that cannot be finished.
    if refused:
        assert len(writer.warnings) == 1
        assert "pcm_s16le" in writer.warnings[0] and "left out" in writer.warnings[0]
    else:
        assert writer.warnings == []
    for frame in source.frames:
        writer.write(frame)
    writer.close()
    source.close()
    assert probe(tmp_path / "out.mp4") == {"frames": 6, "audio": 0 if refused else 1}


def test_pcm_audio_into_mkv_kept(tmp_path):
    src = make_video(tmp_path / "in.mkv", frames=6, pcm_layout="stereo")
    source = open_source(str(src), width=W, height=H)
    writer = open_writer(str(tmp_path / "out.mkv"), width=W, height=H, fps=source.fps, audio=source.audio)
    for frame in source.frames:
        writer.write(frame)
    writer.close()
    source.close()
    assert writer.warnings == []
    assert probe(tmp_path / "out.mkv") == {"frames": 6, "audio": 1}


def test_close_failure_is_one_line_naming_the_output(tmp_path, monkeypatch):
    # As if the check before writing had passed: FFmpeg itself then fails to finish the file.
    monkeypatch.setattr(video_io, "_muxer_takes", lambda *args: True)
    src = make_video(tmp_path / "in.mkv", frames=3, pcm_layout="stereo")
    if not mp4_refuses_audio(src, tmp_path):
        pytest.skip("this FFmpeg finishes .mp4 files with PCM audio: nothing to fail")
    source = open_source(str(src), width=W, height=H)
    writer = open_writer(str(tmp_path / "out.mp4"), width=W, height=H, fps=source.fps, audio=source.audio)
    for frame in source.frames:
        writer.write(frame)
    source.close()
    with pytest.raises(MediaError) as info:
        writer.close()
    message = str(info.value)
    assert "out.mp4" in message and "Fix:" in message and "\n" not in message
    writer.close()  # a second close does nothing


# ----- animated GIF --------------------------------------------------------------------------------------


GIF_COLOURS = [(255, 0, 0), (0, 200, 0), (40, 80, 255), (255, 255, 255)]


def gif_frame(i: int) -> np.ndarray:
    """Five flat colours, as a GIF's palette holds them: a dark ground and a block that moves and
    changes colour with ``i`` (so every frame differs from the one before)."""
    img = np.full((H, W, 3), (20, 20, 60), np.uint8)
    x = (i * 5) % (W - 16)
    img[8:40, x : x + 16] = GIF_COLOURS[i % len(GIF_COLOURS)]
    return img


def write_frames(path: Path, frames: list, fps: Fraction, audio=None):
    writer = open_writer(str(path), width=W, height=H, fps=fps, audio=audio)
    for frame in frames:
        writer.write(torch.from_numpy(frame))
    writer.close()
    return writer


@pytest.mark.parametrize("fps", [Fraction(30), Fraction(12)])
def test_gif_output_is_an_animated_gif(tmp_path, fps):
    frames = [gif_frame(i) for i in range(12)]
    path = tmp_path / "out.gif"
    write_frames(path, frames, fps)
    assert path.is_file()  # not a folder of PNGs named out.gif
    with av.open(str(path)) as container:
        assert container.format.name == "gif" and not container.streams.audio
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (W, H)
        got = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        seconds = container.duration / 1_000_000
    assert len(got) == len(frames)
    # Delays are whole 1/100 s: 30 fps is 3, 4, 3, ... and the length stays 12 frames' worth.
    assert abs(seconds - len(frames) / fps) <= 0.02
    for written, read in zip(frames, got):
        assert np.abs(read.astype(int) - written).max() <= 8
    source = open_source(str(path), width=W, height=H)
    assert source.total == len(frames) and abs(source.fps / fps - 1) < 0.02
    source.close()


@pytest.mark.parametrize("fps, stamps", [(Fraction(120), None), (Fraction(240), None), (Fraction(30), 0.004)])
def test_gif_output_thins_a_source_faster_than_50_fps(tmp_path, fps, stamps):
    """A GIF's delays are whole 1/100 s: two frames in one (120 fps, or live frames 4 ms apart) made
    the muxer fail mid-run. At most 50 frames a second are kept, and the GIF keeps the source's length."""
    frames = [gif_frame(i) for i in range(24)]
    path = tmp_path / "fast.gif"
    writer = open_writer(str(path), width=W, height=H, fps=fps, variable_rate=stamps is not None)
    for i, frame in enumerate(frames):
        writer.write(torch.from_numpy(frame), None if stamps is None else 100.0 + i * stamps)
    writer.close()
    length = len(frames) / fps if stamps is None else (len(frames) - 1) * stamps
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [(p.pts, p.duration) for p in container.demux(stream) if p.size]
    assert 0 < len(packets) <= length * 50 + 1
    assert all(b[0] - a[0] >= 2 for a, b in zip(packets, packets[1:]))  # delays of at least 2/100 s
    assert abs(packets[-1][0] / 100 - length) <= 0.03


def test_gif_input_is_a_video_at_its_own_rate(tmp_path):
    frames = [gif_frame(i) for i in range(6)]
    path = tmp_path / "in.gif"
    # Delays of 30 and 40 ms (3 and 4 hundredths, as GIFs store them): 30 fps on average.
    Image.fromarray(frames[0]).save(path, save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]],
                                    duration=[30, 40, 30, 30, 40, 30], loop=0)
    source = open_source(str(path), width=W, height=H)
    got = list(source.frames)
    source.close()
    assert source.total == len(got) == 6
    assert abs(source.fps - 30) < 0.5  # FFmpeg's own guess is the first delay's, 100/3
    for written, read in zip(frames, got):
        assert tuple(read.shape) == (H, W, 3)
        assert np.abs(read.numpy().astype(int) - written).max() <= 8


def test_gif_output_leaves_the_audio_out_with_one_warning(tmp_path):
    src = make_video(tmp_path / "in.mkv", frames=6, pcm_layout="stereo")
    source = open_source(str(src), width=W, height=H)
    writer = write_frames(tmp_path / "out.gif", [f.numpy() for f in source.frames], source.fps, source.audio)
    source.close()
    assert len(writer.warnings) == 1
    assert "pcm_s16le" in writer.warnings[0] and ".gif" in writer.warnings[0] and "left out" in writer.warnings[0]
    assert probe(tmp_path / "out.gif") == {"frames": 6, "audio": 0}


@pytest.fixture
def model_args(tiny_sd15, tiny_taesd):
    return ["--model", str(tiny_sd15), "--tiny-vae-id", str(tiny_taesd), "--width", "64", "--height", "64",
            "--no-progress"]


def test_cli_pcm_mkv_to_mp4_keeps_the_frames(tmp_path, capsys, model_args):
    src = make_video(tmp_path / "in.mkv", frames=4, pcm_layout="stereo")
    refused = mp4_refuses_audio(src, tmp_path)
    dst = tmp_path / "out.mp4"
    code = cli.main(["run", "-i", str(src), "-o", str(dst), *model_args])
    err = capsys.readouterr().err
    assert code == 0, err
    assert ("warning: the audio track (pcm_s16le) cannot be stored in .mp4" in err) == refused, err
    assert probe(dst) == {"frames": 4, "audio": 0 if refused else 1}
