"""The command line end to end on CPU with the tiny models (in-process `main`, plus one subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from scope_streamdiffusion import cli
from scope_streamdiffusion.video_io import MediaError

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def model_args(tiny_sd15, tiny_taesd):
    return ["--model", str(tiny_sd15), "--tiny-vae-id", str(tiny_taesd), "--width", "64", "--height", "64",
            "--no-progress"]


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def subprocess_env(tmp_path) -> dict:
    """A CLI subprocess's environment: this checkout's code, offline, no verbosity or warning settings
    of the caller's."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONWARNINGS", "TORCH_LOGS") and not k.endswith("_VERBOSITY")}
    return {**env, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "SCOPE_STREAMDIFFUSION_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}


def assert_one_line_error(code, err, *words):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("scope-streamdiffusion: error: ")
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


def make_video(path: Path, frames: int = 10, fps: int = 12, size=(80, 48), audio: bool = True) -> Path:
    """A small h264 (or mpeg4) clip with moving colours and, optionally, an AAC sine track."""
    width, height = size
    with av.open(str(path), "w") as out:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        video = out.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if audio:
            sound = out.add_stream("aac", rate=44100)
            sound.layout = "mono"
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 0] = (i * 25) % 256
            img[:, : (i * 7) % width, 1] = 200
            for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if audio:
            samples = int(44100 * frames / fps)
            t = np.arange(samples) / 44100
            wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            for start in range(0, samples, 1024):
                chunk = wave[start : start + 1024]
                frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 44100, start
                for packet in sound.encode(frame):
                    out.mux(packet)
            for packet in sound.encode(None):
                out.mux(packet)
    return path


def probe(path: Path) -> dict:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        info = {"frames": len(frames), "size": (stream.width, stream.height), "fps": stream.average_rate,
                "audio": len(container.streams.audio)}
    if info["audio"]:
        with av.open(str(path)) as container:
            a = container.streams.audio[0]
            packets = [p for p in container.demux(a) if p.dts is not None]
            info["audio_seconds"] = float(sum(p.duration for p in packets) * a.time_base)
    return info


# ----- end to end ----------------------------------------------------------------------------------------


def test_video_with_audio_keeps_count_fps_size_and_audio(tmp_path, capsys, model_args):
    src = make_video(tmp_path / "clip.mp4", frames=10, fps=12)
    dst = tmp_path / "out.mp4"
    # 2 steps in stream batch: the output lags one frame and the run must flush it.
    code, out, err = run_cli(capsys, "run", "-i", src, "-o", dst, *model_args, "--num-inference-steps", "2",
                             "--prompt", "a test", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["frames_in"] == summary["frames_out"] == 10
    assert summary["lag_frames"] == 1
    info = probe(dst)
    assert info["frames"] == 10
    assert info["size"] == (64, 64)
    assert info["fps"] == Fraction(12)
    assert info["audio"] == 1
    assert abs(info["audio_seconds"] - 10 / 12) < 0.15


def test_gif_output_is_an_animated_gif_without_the_audio(tmp_path, capsys, model_args):
    src = make_video(tmp_path / "clip.mp4", frames=10, fps=12)
    dst = tmp_path / "out.gif"
    code, out, err = run_cli(capsys, "run", "-i", src, "-o", dst, *model_args)
    assert code == 0, err
    assert err.count("warning: the audio track (aac) cannot be stored in .gif") == 1, err
    info = probe(dst)
    assert (info["frames"], info["size"], info["audio"]) == (10, (64, 64), 0)
    with av.open(str(dst)) as container:
        assert container.format.name == "gif"
        assert abs(container.duration / 1_000_000 - 10 / 12) <= 0.02  # 12 fps as delays of 8 and 9/100 s


def test_folder_of_images_to_folder(tmp_path, capsys, model_args):
    from PIL import Image

    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for i in (1, 2, 10):  # natural order: 1, 2, 10
        Image.fromarray(np.full((40, 56, 3), i * 20, np.uint8)).save(frames_dir / f"f{i}.png")
    (frames_dir / "notes.txt").write_text("not an image")
    dst = tmp_path / "styled"
    code, out, err = run_cli(capsys, "run", "--input", frames_dir, "--output", dst, *model_args)
    assert code == 0, err
    written = sorted(dst.glob("*.png"))
    assert len(written) == 3
    assert Image.open(written[0]).size == (64, 64)
    assert "3 in, 3 out" in out


def test_test_pattern_is_the_default_input(tmp_path, capsys, model_args, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "run", "--frames", "4", *model_args, "--frame-buffer-size", "3", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["frames_out"] == 4 and summary["calls"] == 2  # 3 + (1 padded to 3)
    assert set(summary["latency_ms"]) == {"mean", "p50", "p99"}
    info = probe(tmp_path / "testpattern-streamdiffusion.mp4")
    assert info["frames"] == 4 and info["fps"] == Fraction(30) and info["audio"] == 0


def test_test_pattern_is_made_at_the_clamped_size_with_one_warning(tmp_path, capsys, model_args, caplog, monkeypatch):
    from scope_streamdiffusion import video_io

    sizes, original = [], video_io.test_pattern
    monkeypatch.setattr(video_io, "test_pattern", lambda count, w, h, fps: sizes.append((w, h)) or original(count, w, h, fps))
    args = [a for a in model_args]
    args[args.index("--width") + 1] = "5000"  # above the schema's maximum (2048)
    with caplog.at_level("WARNING", logger="scope_streamdiffusion"):
        # One image out of three frames: refused after the source opens, before any model loads.
        code, _, err = run_cli(capsys, "run", "--frames", "3", "-o", tmp_path / "one.png", *args)
    assert code != 0 and "one image" in err
    assert sizes == [(2048, 64)]
    assert sum("width=5000 is outside" in r.getMessage() for r in caplog.records) == 1


def test_unknown_device_is_one_line(capsys):
    code, _, err = run_cli(capsys, "run", "--device", "gpu7", "--model", "tiny-random")
    assert_one_line_error(code, err, "Unknown device 'gpu7'", "Fix:")


def test_config_file_with_flag_override(tmp_path, capsys, model_args):
    config = tmp_path / "run.toml"
    config.write_text('prompt = "from the file"\nwidth = 128\nframes = 3\nnum-inference-steps = 2\n')
    dst = tmp_path / "out.mkv"
    code, out, err = run_cli(capsys, "run", "--config", config, "-o", dst, *model_args)  # flags set --width 64
    assert code == 0, err
    info = probe(dst)
    assert info["frames"] == 3  # from the file
    assert info["size"] == (64, 64)  # the flag wins over the file's 128


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file_values_are_merged_and_validated(tmp_path, suffix):
    text = {".toml": 'model = "tiny-random"\nstrength = 0.7\nt_index_list = [20, 30]\ninput = "x.mp4"\n',
            ".yaml": "model: tiny-random\nstrength: 0.7\nt_index_list: [20, 30]\ninput: x.mp4\n"}[suffix]
    config = tmp_path / f"c{suffix}"
    config.write_text(text)
    args = cli.build_parser().parse_args(["run", "--config", str(config), "--guidance_scale", "1.5",
                                          "--t-index-list", "10,40"])
    params, opts = cli.resolve_run_settings(args)
    assert params == {"model_id": "tiny-random", "strength": 0.7, "guidance_scale": 1.5, "t_index_list": [10, 40]}
    assert opts == {"input": "x.mp4"}

    config.write_text("strenght: 0.5\n" if suffix == ".yaml" else "strenght = 0.5\n")
    with pytest.raises(cli.CliError, match="Did you mean 'strength'"):
        cli.resolve_run_settings(args)


@pytest.mark.parametrize("line", ["input: 5", "output: [a]", "frames: abc", "frames: 2.5", "frames: 0", "fps: abc",
                                  "fps: -3", "fps: .nan", "fps: 1e9"])
def test_run_options_in_a_config_file_are_validated(tmp_path, line):
    config = tmp_path / "c.yaml"
    config.write_text(line + "\n")
    args = cli.build_parser().parse_args(["run", "--config", str(config)])
    key = line.split(":")[0]
    with pytest.raises(cli.CliError, match=rf"c\.yaml': {key} = .* is invalid \(expected"):
        cli.resolve_run_settings(args)


def test_a_config_frame_rate_may_be_a_fraction(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text('fps: "30000/1001"\nframes: 3\n')
    args = cli.build_parser().parse_args(["run", "--config", str(config)])
    assert cli.resolve_run_settings(args)[1] == {"fps": "30000/1001", "frames": 3}


@pytest.mark.parametrize("flag", [["--fps", "nan"], ["--fps", "-5"], ["--fps", "0"], ["--fps", "1e9"],
                                  ["--frames", "0"], ["--frames", "-2"]])
def test_unusable_frames_or_fps_flags_are_one_line(capsys, flag):
    code, _, err = run_cli(capsys, "run", "--model", "tiny-random", *flag)
    assert_one_line_error(code, err, flag[0], "expected")
    assert code == cli.EXIT_USAGE


def test_an_output_that_cannot_be_written_is_one_line_before_loading(tmp_path, capsys, monkeypatch):
    from scope_streamdiffusion import pipeline

    monkeypatch.setattr(pipeline.StreamDiffusionPipeline, "__init__", lambda self, **kw: pytest.fail("model loaded"))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.mp4").mkdir()
    cases = [(f"{tmp_path / 'adir.mp4'}", ("is a folder", "Fix:")), (f"{tmp_path / 'afile'}/", ("is a file", "Fix:"))]
    if Path("/proc/self").is_dir():  # no file can be made there, not even by root
        cases.append(("/proc/sub/out.mp4", ("Cannot write", "/proc", "Fix:")))
    for output, words in cases:
        code, _, err = run_cli(capsys, "run", "--model", "tiny-random", "--frames", "2", "-o", output)
        assert_one_line_error(code, err, *words)


def test_help_shows_ranges_and_the_timestep_list_takes_its_documented_form(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "[range: 0.0 to 20.0]" in text and "[range: 64 to 2048]" in text  # guidance, width
    args = cli.build_parser().parse_args(["run", "--t-index-list", "[32, 45]"])
    assert cli.resolve_run_settings(args)[0]["t_index_list"] == [32, 45]


@pytest.mark.parametrize("stop", ["ctrl-c", "kill"])
def test_interrupted_run_keeps_a_playable_file(tmp_path, capsys, model_args, monkeypatch, stop):
    import signal

    from scope_streamdiffusion.pipeline import StreamDiffusionPipeline

    real_call = StreamDiffusionPipeline.__call__
    calls = {"n": 0}

    def interrupting_call(self, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # Ctrl-C (or `kill`, SIGTERM) while the 4th frame is processed
            if stop == "kill":  # only with a handler: the default action would end the test process
                assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
                os.kill(os.getpid(), signal.SIGTERM)
                pytest.fail("SIGTERM did not stop the run")
            raise KeyboardInterrupt
        return real_call(self, **kwargs)

    monkeypatch.setattr(StreamDiffusionPipeline, "__call__", interrupting_call)
    src = make_video(tmp_path / "clip.mp4", frames=8, fps=12)
    dst = tmp_path / "out.mp4"
    code, out, err = run_cli(capsys, "run", "-i", src, "-o", dst, *model_args)
    assert code == 130
    assert "interrupted" in err and "Traceback" not in err
    info = probe(dst)
    assert info["frames"] == 3
    assert info["audio"] == 1 and info["audio_seconds"] < 8 / 12  # audio cut with the video


def test_a_second_ctrl_c_while_the_process_exits_is_quiet(tmp_path, model_args):
    """Soon after start-up on a GPU a background compilation is still busy when a run ends, and the
    process's exit waits for it: a Ctrl-C then printed the traceback of that exit hook (and the process
    could abort). Now the process exits at once, quietly, with the output kept as one Ctrl-C keeps it."""
    import signal
    import time

    src = make_video(tmp_path / "clip.mp4", frames=8, fps=12)
    dst = tmp_path / "out.mp4"
    script = Path(__file__).with_name("cli_exit_while_compiling.py")
    proc = subprocess.Popen([sys.executable, str(script), "run", "-i", str(src), "-o", str(dst), *map(str, model_args)],
                            env=subprocess_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for(line):
        for out_line in proc.stdout:
            if out_line.strip() == line:
                return
        pytest.fail(f"the run ended before printing {line!r}: {proc.stderr.read()[-2000:]}")

    try:
        wait_for("streaming")  # the 4th frame went in
        proc.send_signal(signal.SIGINT)
        wait_for("exiting")  # the run is over; the exit hooks start
        time.sleep(0.5)  # into the wait for the compiler
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=20)  # the exit would wait 30 s for the compiler
        err = proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    info = probe(dst)
    assert info["frames"] == 3
    assert info["audio"] == 1 and info["audio_seconds"] < 8 / 12


def test_console_entry_point_with_tiny_random(tmp_path):
    env = subprocess_env(tmp_path)
    dst = tmp_path / "frames/"
    result = subprocess.run(
        [sys.executable, "-m", "scope_streamdiffusion.cli", "run", "--model", "tiny-random", "--width", "64",
         "--height", "64", "--frames", "2", "-o", f"{dst}/", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(list(dst.glob("*.png"))) == 2
    assert (tmp_path / "cache" / "tiny-random-taesd" / "config.json").is_file()  # no hub TAESD needed


# ----- errors: one line, non-zero, no traceback --------------------------------------------------------


def test_missing_input_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "-i", tmp_path / "nope.mp4", "--model", "tiny-random")
    assert_one_line_error(code, err, "does not exist")


def test_unreadable_video(tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    code, _, err = run_cli(capsys, "run", "-i", bad)
    assert_one_line_error(code, err, "cannot read video")


def test_no_webcam(capsys):
    code, _, err = run_cli(capsys, "run", "-i", "/dev/video97")
    assert_one_line_error(code, err, "webcam")


def test_model_not_found_offline(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "--frames", "1", "--model", "nobody-here/no-such-model-xyz",
                           "-o", tmp_path / "o.mp4", "--no-progress")
    assert_one_line_error(code, err, "no-such-model-xyz", "Fix:")
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_but_absent(capsys):
    code, _, err = run_cli(capsys, "run", "--device", "cuda", "--model", "tiny-random")
    assert_one_line_error(code, err, "CUDA is not available")


def test_a_lora_that_does_not_fit_is_one_line_without_the_diffusers_log(tmp_path, tiny_sdxl, model_args):
    """diffusers logs the whole state-dict error of a LoRA that does not fit before raising it; the
    error line already says what it means. --debug shows the library's lines too."""
    from scope_streamdiffusion.testing.tiny_models import build_tiny_lcm_lora

    sdxl_lora = build_tiny_lcm_lora(tiny_sdxl, tmp_path / "xl-lora")
    command = [sys.executable, "-m", "scope_streamdiffusion.cli", "run", "-o", str(tmp_path / "x.png"), "-i", "text",
               *map(str, model_args), "--lora", str(sdxl_lora)]
    result = subprocess.run(command, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert_one_line_error(result.returncode, result.stderr, "does not fit", "size mismatch", "Fix:")
    result = subprocess.run([*command, "--debug"], env=subprocess_env(tmp_path), capture_output=True, text=True,
                            timeout=300)
    assert "was unsuccessful" in result.stderr and "Traceback" in result.stderr


# Logs as the libraries log while a model loads: through each library's logging (with its own handler
# where it has one), and a Python warning. The libraries are imported before main here (the test above:
# after it).
NOISY_LOAD = """
import logging, sys, warnings
import diffusers.utils.logging, huggingface_hub.utils.logging, transformers.utils.logging
from scope_streamdiffusion import cli
from scope_streamdiffusion.pipeline import StreamDiffusionPipeline

real_init = StreamDiffusionPipeline.__init__

def noisy_init(self, **kwargs):
    for library in (diffusers, transformers, huggingface_hub):
        library.utils.logging.get_logger(library.__name__ + ".loading").warning("notice from %s", library.__name__)
    for name in ("peft.tuners", "accelerate.utils", "torch._dynamo.convert_frame", "torch._inductor.utils"):
        logging.getLogger(name).warning("notice from %s", name)
    warnings.warn("a deprecation notice", FutureWarning)
    real_init(self, **kwargs)

StreamDiffusionPipeline.__init__ = noisy_init
sys.argv[0] = "scope-streamdiffusion"
sys.exit(cli.main())
"""


def test_main_called_from_python_leaves_logging_and_warnings_as_they_were(capsys):
    """The CLI quiets the libraries for its command only: a program that calls main() keeps its own
    logging (levels, handlers), warnings filters and environment afterwards."""
    import logging
    import warnings

    names = ("", "diffusers", "transformers", "huggingface_hub", "torch")
    before = ({n: logging.getLogger(n or None).level for n in names}, list(logging.getLogger().handlers),
              list(warnings.filters), {k: os.environ.get(k) for k in cli._VERBOSITY_VARIABLES})
    assert cli.main(["info", "--json"]) == 0
    capsys.readouterr()
    after = ({n: logging.getLogger(n or None).level for n in names}, list(logging.getLogger().handlers),
             list(warnings.filters), {k: os.environ.get(k) for k in cli._VERBOSITY_VARIABLES})
    assert after == before


def test_a_program_that_calls_main_keeps_its_ctrl_c(tmp_path):
    """Only the exit of the process ends it at once on Ctrl-C: a program that called main() (argv from
    sys.argv, as the console script does) still gets its KeyboardInterrupt afterwards."""
    script = ("import os, signal, sys, time\n"
              "from scope_streamdiffusion import cli\n"
              "sys.argv = ['scope-streamdiffusion', 'info', '--json']\n"
              "assert cli.main() == 0\n"
              "try:\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(5)\n"
              "except KeyboardInterrupt:\n"
              "    print('still handled')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=subprocess_env(tmp_path))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("still handled"), proc.stderr


def test_quieted_warnings_keep_torch_cudas(monkeypatch):
    """torch.cuda warns when the driver is too old for the build: that is the reason a GPU is not used,
    so it stays visible when other libraries' warnings are hidden."""
    import warnings

    monkeypatch.setattr(sys, "warnoptions", [])
    with warnings.catch_warnings(record=True) as caught:
        cli._quiet_libraries()
        warnings.warn_explicit("CUDA initialization: the NVIDIA driver is too old", UserWarning, "cuda.py", 1,
                               module="torch.cuda")
        warnings.warn_explicit("a deprecated argument", FutureWarning, "pipeline.py", 1, module="diffusers.pipelines")
    assert [str(w.message) for w in caught] == ["CUDA initialization: the NVIDIA driver is too old"]


@pytest.mark.parametrize("debug", [False, True])
def test_library_logs_and_warnings_show_only_with_debug(tmp_path, model_args, debug):
    """Library log lines and Python warnings came between the CLI's own lines; our own warnings
    (a clamped value here) still show, once."""
    command = [sys.executable, "-c", NOISY_LOAD, "run", "-i", "text", "-o", str(tmp_path / "x.png"),
               *map(str, model_args), "--strength", "5", *(["--debug"] if debug else [])]
    result = subprocess.run(command, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ours = [line for line in result.stderr.splitlines() if "strength=5.0 is outside" in line]
    assert len(ours) == 1 and ours[0].startswith("scope-streamdiffusion: WARNING: ")
    notices = ["notice from diffusers", "notice from transformers", "notice from huggingface_hub", "notice from peft",
               "notice from accelerate", "notice from torch._dynamo", "notice from torch._inductor",
               "a deprecation notice"]
    if debug:
        assert all(notice in result.stderr for notice in notices), result.stderr
    else:
        assert result.stderr.strip() == ours[0], result.stderr


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(MediaError):
        cli.main(["run", "-i", str(tmp_path / "nope.png"), "--debug"])


def test_download_offline_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "download", "nobody-here/no-such-model-xyz", "--dir", tmp_path)
    assert_one_line_error(code, err, "no-such-model-xyz")


def test_bench_missing_module_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "scope_streamdiffusion.bench", None)  # import fails as if absent
    code, _, err = run_cli(capsys, "bench")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "bench" in err


def test_info_json(capsys):
    code, out, err = run_cli(capsys, "info", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["torch"] == torch.__version__
    assert {"xformers", "torch.compile", "tensorrt"} <= set(info["acceleration"])
    assert info["auto_acceleration"] == "none" or torch.cuda.is_available()  # CPU: eager
    assert "stabilityai/sd-turbo" in {m["id"] for m in info["models"]}
    assert info["model_dirs"]["hf_cache"]


# ----- the stream-batch lag is flushed and aligned -------------------------------------------------------


class LaggingPipe:
    """Mimics the engine: the first call returns its own frames, then each call returns the frames
    given ``lag`` calls earlier (the first ``lag`` of those are call 0's frames)."""

    def __init__(self, steps: int, group: int):
        self.frame_buffer_size = group
        self.calls: list = []
        self.engine = SimpleNamespace(
            settings=SimpleNamespace(use_denoising_batch=True, strength=0.5, t_index_list=None,
                                     timesteps=lambda img2img: list(range(steps))))
        self.lag = steps - 1

    def __call__(self, video, **params):
        self.calls.append(torch.stack(video))
        k = len(self.calls) - 1
        source = self.calls[max(k - self.lag, 0)] if k >= self.lag else self.calls[0]
        return {"video": source.float() / 255}


@pytest.mark.parametrize("steps,group,count", [(1, 1, 5), (3, 1, 5), (3, 2, 5), (2, 4, 3)])
def test_runner_flushes_the_lag_and_keeps_frames_aligned(steps, group, count):
    inputs = [torch.full((4, 4, 3), 10 * (i + 1), dtype=torch.uint8) for i in range(count)]
    written = []
    writer = SimpleNamespace(write=lambda frame, stamp=None: written.append(int(frame[0, 0, 0])))
    source = SimpleNamespace(frames=iter(inputs), live=False, name="t", text=False)
    runner = cli._Runner(LaggingPipe(steps, group), writer, source, SimpleNamespace(update=lambda n: None,
                                                                                   set_postfix_str=lambda *a, **k: None))
    runner.run()
    assert written == [10 * (i + 1) for i in range(count)]


@pytest.mark.parametrize("steps,group", [(1, 1), (3, 1), (1, 2), (3, 2)])
def test_skipped_frames_keep_the_output_aligned_with_the_input(tmp_path, capsys, model_args, steps, group):
    """A frame the similar-image filter skips shows the last frame that ran; with the stream batch's
    lag that one comes out later. Each output frame still belongs to its input frame: a skip used to
    add a frame of lag (A A A A B B B B C ... came out with A's for B's), and with one step the first
    fix lost every frame after the first skip."""
    from PIL import Image

    folder = tmp_path / "seq"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    images = [(torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy() for _ in range(4)]
    for i in range(16):  # four copies of each: whole groups of 1 or 2 frames repeat
        Image.fromarray(images[i // 4]).save(folder / f"{i:02d}.png")
    common = ["run", "-i", folder, *model_args, "--t-index-list", *["47", "48", "49"][-steps:], "--cfg-type", "none",
              "--frame-buffer-size", str(group), "--json"]
    code, out, err = run_cli(capsys, *common, "-o", tmp_path / "off/")
    assert code == 0, err
    code, out, err = run_cli(capsys, *common, "-o", tmp_path / "on/", "--similar-image-filter",
                             "--similar-image-filter-threshold", "0.9")
    assert code == 0, err
    assert json.loads(out)["frames_skipped"] >= 4 and json.loads(out)["frames_out"] == 16

    def frames(name):
        return [np.asarray(Image.open(p)) for p in sorted((tmp_path / name).glob("*.png"))]

    off, on = frames("off"), frames("on")
    assert len(off) == len(on) == 16
    assert all(np.array_equal(a, b) for a, b in zip(off, on))


def test_json_summary_is_all_of_stdout_for_sdxl(tmp_path, capsys, tiny_sdxl):
    """compel prints a deprecation notice on stdout when given SDXL's two encoders; --json's stdout
    must stay parseable."""
    code, out, err = run_cli(capsys, "run", "--model", tiny_sdxl, "--no-use-tiny-vae", "--width", "64", "--height",
                             "64", "--frames", "1", "-o", f"{tmp_path / 'x'}/", "--json", "--no-progress")
    assert code == 0, err
    assert json.loads(out)["frames_out"] == 1


def test_single_image_to_image_with_default_name(tmp_path, capsys, model_args, monkeypatch):
    from PIL import Image

    Image.fromarray(np.full((50, 70, 3), 128, np.uint8)).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "run", "-i", "photo.jpg", *model_args, "--num-inference-steps", "2")
    assert code == 0, err
    assert Image.open(tmp_path / "photo-streamdiffusion.png").size == (64, 64)


def test_download_patterns_prefer_fp16_weights(monkeypatch):
    import huggingface_hub

    files = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "tokenizer/vocab.json", "tokenizer/merges.txt", "unet/diffusion_pytorch_model.bin", "flax_model.msgpack"]
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo: files)
    patterns = cli._allow_patterns("someone/some-model")
    assert patterns == ["*.json", "*.txt", "unet/diffusion_pytorch_model.fp16.safetensors",
                        "vae/diffusion_pytorch_model.safetensors"]
    from scope_streamdiffusion.schema import SD_TURBO_FILES

    assert cli._allow_patterns("stabilityai/sd-turbo") == SD_TURBO_FILES


@pytest.mark.parametrize("repo, fixture", [("stabilityai/sd-turbo", "tiny_sd15"), ("stabilityai/sdxl-turbo", "tiny_sdxl")])
def test_download_lists_make_a_folder_that_loads(tmp_path, request, repo, fixture):
    """`download` of a known model fetches only its list: that list must be every file the model's
    folder holds (configs, tokenizers, weights), or a folder in Scope's models dir passes for
    complete and fails to load."""
    import shutil

    from scope_streamdiffusion.engine import load_models

    source = Path(request.getfixturevalue(fixture))
    listed = cli._known_models()[repo]
    held = {str(f.relative_to(source)) for f in source.rglob("*") if f.is_file() and not f.name.startswith(".")}
    as_fp16 = {f.replace("model.safetensors", "model.fp16.safetensors") for f in held}
    assert as_fp16 <= set(listed), sorted(as_fp16 - set(listed))
    folder = tmp_path / repo.split("/")[1]
    for name in listed:  # the fp16 names as fetched, with the tiny model's plain weights behind them
        plain = name.replace(".fp16.", ".")
        (folder / plain).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / plain, folder / plain)
    assert cli._presence(folder, repo, listed) == "complete"
    models = load_models(str(folder), device=torch.device("cpu"), dtype=torch.float32, use_tiny_vae=False)
    assert models.family.is_sdxl == (fixture == "tiny_sdxl")


def test_text_to_image_input(tmp_path, capsys, model_args, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "run", "-i", "text", *model_args, "--prompt", "a lighthouse", "--json")
    assert code == 0, err
    image = np.asarray(Image.open(tmp_path / "text-streamdiffusion.png"))
    assert image.shape == (64, 64, 3) and image.std() > 0
    dst = tmp_path / "text.mkv"
    code, out, err = run_cli(capsys, "run", "-i", "text", "--frames", "3", "-o", dst, *model_args,
                             "--num-inference-steps", "2", "--json")
    assert code == 0, err
    assert probe(dst)["frames"] == 3 and json.loads(out)["frames_out"] == 3


def test_lora_flags_and_config(tmp_path, capsys, model_args, tiny_lcm_lora):
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "in.png")

    def run(name, *extra):
        code, _, err = run_cli(capsys, "run", "-i", tmp_path / "in.png", "-o", tmp_path / name, *model_args, *extra)
        assert code == 0, err
        return np.asarray(Image.open(tmp_path / name)).astype(int)

    plain = run("plain.png")
    fused = run("fused.png", "--lora", f"{tiny_lcm_lora}=10")
    adapter = run("adapter.png", "--lora", f"{tiny_lcm_lora}=10", "--lora-merge-mode", "runtime_peft")
    assert np.abs(fused - plain).max() > 2  # the LoRA changes the image
    assert np.abs(fused - adapter).max() <= 2  # fused or as an adapter: the same function
    config = tmp_path / "lora.yaml"
    config.write_text(f"loras:\n  - path: {tiny_lcm_lora}\n    scale: 10\n")
    assert np.abs(run("config.png", "--config", config) - fused).max() <= 2
    code, _, err = run_cli(capsys, "run", "-i", tmp_path / "in.png", "-o", tmp_path / "x.png", *model_args,
                           "--lora", tmp_path / "missing.safetensors")
    assert_one_line_error(code, err, "missing.safetensors")


def test_lora_flag_parsing(tmp_path):
    odd = tmp_path / "v=2"
    odd.mkdir()
    assert cli._lora_flag("style.safetensors") == {"path": "style.safetensors"}
    assert cli._lora_flag("style.safetensors=0.5") == {"path": "style.safetensors", "scale": 0.5}
    assert cli._lora_flag(str(odd)) == {"path": str(odd)}  # an existing path keeps its '='
    assert cli._lora_flag("a=b") == {"path": "a=b"}
    with pytest.raises(cli.CliError, match="finite"):
        cli._lora_flag("style.safetensors=nan")
    real = tmp_path / "ink.safetensors"
    real.write_bytes(b"")
    with pytest.raises(cli.CliError, match="'abc' is not a scale.*Fix"):  # the file exists: 'abc' was meant as its scale
        cli._lora_flag(f"{real}=abc")


def test_a_file_named_like_a_webcam_is_a_file():
    from scope_streamdiffusion.video_io import is_webcam

    assert is_webcam("webcam") and is_webcam("webcam:1") and is_webcam("/dev/video2")
    assert not is_webcam("webcam_demo.mp4") and not is_webcam("webcams/clip.mp4")


def test_a_webcam_stuck_in_a_read_is_not_closed_under_it():
    """close() must not free the camera while its thread is inside a read (the reader closes it when
    the read returns). A camera stand-in: real PyAV frames, a read that blocks until released."""
    import threading

    import av
    import numpy as np

    from scope_streamdiffusion.video_io import _LatestFrame

    release, closed = threading.Event(), []

    class StuckCamera:
        def decode(self, _stream):
            yield av.VideoFrame.from_ndarray(np.full((8, 8, 3), 7, np.uint8), format="rgb24")
            release.wait(10)  # the driver hangs in a read
            yield av.VideoFrame.from_ndarray(np.zeros((8, 8, 3), np.uint8), format="rgb24")

        def close(self):
            closed.append(threading.current_thread().name)

    grabber = _LatestFrame(StuckCamera(), None)
    frame, _ = grabber.next()
    assert frame.shape == (8, 8, 3) and int(frame[0, 0, 0]) == 7
    grabber.close(timeout=0.05)
    assert closed == []  # still reading: left open
    release.set()
    grabber._thread.join(5)
    assert closed == ["webcam"]  # closed once, by the reader, after its read returned


def test_a_live_stream_keeps_bounded_bookkeeping(tmp_path, tiny_sd15, tiny_taesd, monkeypatch):
    """A camera may stream for days: capture times are dropped once written, latencies are a window,
    and the summary still counts every call. Live frames here: the test pattern with capture times."""
    import argparse
    from fractions import Fraction

    from scope_streamdiffusion.pipeline import StreamDiffusionPipeline
    from scope_streamdiffusion.video_io import Source, open_writer, test_pattern

    monkeypatch.setattr(cli, "LATENCY_WINDOW", 2)
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), tiny_vae_id=str(tiny_taesd), width=64, height=64,
                                   num_inference_steps=2)  # a stream batch: outputs lag by one call
    source = Source("camera", iter(()), Fraction(30), live=True)

    def frames():
        for i, frame in enumerate(test_pattern(6, 64, 64)):
            source.timestamps.append(100.0 + i / 30)  # as the camera thread stamps them
            yield frame

    source.frames = frames()
    dst = tmp_path / "live.mkv"
    writer = open_writer(str(dst), width=64, height=64, fps=source.fps, variable_rate=True)
    summary = cli._stream(argparse.Namespace(no_progress=True), pipe, source, writer, str(dst), 0.0)
    assert summary["calls"] == 7 and summary["frames_out"] == 6  # six frames, one call flushes the lag
    assert summary["latency_ms"]["p50"] > 0
    assert len(source.timestamps) == 0  # every capture time was written and dropped
    assert probe(dst)["frames"] == 6
