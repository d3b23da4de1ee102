"""Video input: uniform frame sampling, frame reading with OpenCV, the Frame-N prompt, the context budget.

Reference: the InternVL2 model cards' (and README's) video example:
    def get_index(bound, fps, max_frame, first_idx=0, num_segments=32):   # bound=None: the whole video
        start_idx = max(first_idx, round(start * fps)); end_idx = min(round(end * fps), max_frame)
        seg_size = float(end_idx - start_idx) / num_segments
        return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]
    max_frame = len(vr) - 1; each frame dynamic_preprocess(..., max_num=1) -> one 448 tile, no thumbnail
    video_prefix = ''.join([f'Frame{i+1}: <image>\\n' for i in range(len(num_patches_list))])
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_TEXT_TOKENS = 128  # room kept for the template, the question and "FrameN: " labels
FRAME_LABEL_TOKENS = 8  # "FrameN: " + <img> + </img> + newline, generously


def sample_frame_indices(num_frames_in_video: int, num_frames: int) -> list[int]:
    """InternVL's get_index with bound=None: the midpoints of num_frames equal segments of [0, last frame]."""
    if not isinstance(num_frames_in_video, (int, np.integer)) or num_frames_in_video < 1:
        raise ValueError(f"num_frames_in_video={num_frames_in_video!r}: the video must have at least one frame")
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r}: expected a positive number of frames to sample")
    max_frame = num_frames_in_video - 1
    seg_size = float(max_frame) / num_frames
    return [int(seg_size / 2 + np.round(seg_size * i)) for i in range(num_frames)]


def video_query(prompt: str, num_frames: int) -> str:
    """`Frame1: <image>\\nFrame2: <image>\\n...` then the prompt (InternVL's video_prefix)."""
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}: expected at least one frame")
    if "<image>" in prompt:
        raise ValueError("a video prompt must not contain <image>: the Frame1..N placeholders are added for you")
    return "".join(f"Frame{i + 1}: <image>\n" for i in range(num_frames)) + prompt


def max_frames_that_fit(max_seq: int, tokens_per_frame: int = 256, max_new_tokens: int = 128,
                        text_tokens: int = DEFAULT_TEXT_TOKENS) -> int:
    """How many one-tile frames fit in max_seq next to the text and the answer (0 if none)."""
    room = max_seq - max_new_tokens - text_tokens
    return max(room // (tokens_per_frame + FRAME_LABEL_TOKENS), 0)


def check_frame_budget(num_frames: int, max_seq: int, tokens_per_frame: int = 256, max_new_tokens: int = 128,
                       text_tokens: int = DEFAULT_TEXT_TOKENS) -> None:
    """ValueError, saying how many frames fit, when num_frames one-tile frames overflow the context."""
    fit = max_frames_that_fit(max_seq, tokens_per_frame, max_new_tokens, text_tokens)
    if num_frames > fit:
        need = num_frames * (tokens_per_frame + FRAME_LABEL_TOKENS) + text_tokens + max_new_tokens
        raise ValueError(f"num_frames={num_frames} needs about {need} tokens ({tokens_per_frame} per frame, "
                         f"{max_new_tokens} new tokens, ~{text_tokens} of text) but the model holds max_seq={max_seq}: "
                         f"at most {fit} frames fit; use num_frames<={fit}, fewer max_new_tokens, or a larger max_seq")


def read_video_frames(path, num_frames: int) -> list[np.ndarray]:
    """num_frames RGB uint8 frames [H, W, 3] sampled uniformly (sample_frame_indices) with OpenCV.
    Frames are read in order with grab(), not seeked, so the indices are exact for every codec."""
    try:
        import cv2
    except ImportError:
        raise ImportError("reading video needs OpenCV: pip install 'edgevl[video]'") from None

    from ..preprocess import ImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"video file not found: {path}")
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise ImageError(f"cannot open video {path}: OpenCV has no decoder for it or the file is damaged")
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if total < 1:
            raise ImageError(f"cannot read video {path}: it reports {total} frames")
        wanted = sample_frame_indices(total, num_frames)
        decoded = {}
        for index in range(max(wanted) + 1):
            if not capture.grab():
                raise ImageError(f"cannot read frame {index} of video {path} (it reports {total} frames): "
                                 "the file is truncated or its frame count is wrong")
            if index in wanted:
                ok, bgr = capture.retrieve()
                if not ok:
                    raise ImageError(f"cannot decode frame {index} of video {path}")
                decoded[index] = np.ascontiguousarray(bgr[..., ::-1])
        return [decoded[i] for i in wanted]
    finally:
        capture.release()
