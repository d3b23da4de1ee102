"""Video: InternVL's frame sampling, OpenCV reading, Frame-N prompts, the context budget, end to end."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgevl import EdgeVL
from edgevl.cli import main
from edgevl.formats.video import (check_frame_budget, max_frames_that_fit, read_video_frames, sample_frame_indices,
                                  video_query)
from edgevl.preprocess import ImageError


def _reference_get_index(num_video_frames, num_segments, fps=30.0):
    # InternVL2 model card: get_index(bound=None, fps, max_frame=len(vr) - 1, first_idx=0, num_segments)
    start, end = -100000, 100000
    max_frame = num_video_frames - 1
    start_idx = max(0, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]


def write_clip(path, num_frames=20, size=(64, 48)):
    """MJPG .avi (a codec opencv-python-headless can write); frame i is filled with value 10*i."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    assert writer.isOpened()
    for i in range(num_frames):
        frame = np.full((size[1], size[0], 3), (10 * i) % 256, np.uint8)
        frame[:, :, 0] = 0  # blue channel off: BGR -> RGB order shows up in the red channel
        writer.write(frame)
    writer.release()
    return path


@pytest.mark.parametrize("total", [1, 2, 7, 8, 9, 31, 100, 1001])
@pytest.mark.parametrize("count", [1, 4, 8, 16, 32])
def test_sampling_matches_internvl_get_index(total, count):
    indices = sample_frame_indices(total, count)
    assert indices == _reference_get_index(total, count)
    assert all(0 <= i < total for i in indices) and indices == sorted(indices)


def test_sampling_rejects_bad_counts():
    with pytest.raises(ValueError, match="num_frames_in_video"):
        sample_frame_indices(0, 8)
    with pytest.raises(ValueError, match="num_frames"):
        sample_frame_indices(10, 0)


def test_read_frames_picks_the_sampled_frames_in_rgb(tmp_path):
    clip = write_clip(tmp_path / "clip.avi", 20)
    frames = read_video_frames(clip, 4)
    assert len(frames) == 4 and frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    for frame, index in zip(frames, sample_frame_indices(20, 4)):
        assert abs(int(frame[..., 1].mean()) - 10 * index) <= 3  # MJPG is lossy
        assert frame[..., 2].mean() < 3 and abs(int(frame[..., 0].mean()) - 10 * index) <= 3  # R, G set; B zero


def test_unreadable_video_is_a_clear_error(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        read_video_frames(tmp_path / "nope.mp4", 4)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ImageError, match="bad.mp4"):
        read_video_frames(bad, 4)


def test_prompt_and_budget():
    assert video_query("What happens?", 3) == "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nWhat happens?"
    with pytest.raises(ValueError, match="<image>"):
        video_query("<image> what?", 2)
    fit = max_frames_that_fit(8192, 256, max_new_tokens=128)
    assert fit == (8192 - 128 - 128) // (256 + 8)
    check_frame_budget(fit, 8192, 256, 128)
    with pytest.raises(ValueError, match=f"at most {fit} frames fit"):
        check_frame_budget(fit + 1, 8192, 256, 128)


def test_video_generate_end_to_end(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import edgevl.api

    clip = write_clip(tmp_path / "clip.avi", 30)
    model = EdgeVL.from_pretrained(tiny_checkpoint("qwen2"))
    rendered = []
    render = edgevl.api.render_prompt
    monkeypatch.setattr(edgevl.api, "render_prompt", lambda *a, **k: rendered.append(render(*a, **k)) or rendered[-1])
    result = model.generate("What happens?", video=clip, num_frames=5, max_new_tokens=3)
    assert result.tiles_per_image == [1] * 5
    (text,) = rendered
    assert all(f"Frame{i}: <image>\n" in text for i in range(1, 6)) and "Frame6" not in text
    assert result.prompt_tokens > 5 * 256

    small = EdgeVL.from_pretrained(tiny_checkpoint("qwen2"), max_seq=1200)
    with pytest.raises(ValueError, match="at most 4 frames fit"):
        small.generate("What happens?", video=clip, num_frames=8, max_new_tokens=16)
    assert small.generate("What happens?", video=clip, num_frames=4, max_new_tokens=16).tiles_per_image == [1] * 4
    with pytest.raises(ValueError, match="not both"):
        model.generate("x", images=np.zeros((8, 8, 3), np.uint8), video=clip)

    code = main(["generate", "--model", str(tiny_checkpoint("qwen2")), "--video", str(clip), "--num-frames", "2",
                 "--prompt", "What happens?", "--max-new-tokens", "2"])
    assert code == 0 and "tiles per image [1, 1]" in capsys.readouterr().err
