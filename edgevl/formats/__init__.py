"""The input/output formats Mini-InternVL's domain adaptation trained on, for the inference side.

Pure helpers (numpy, Pillow, OpenCV; no torch): multi-view driving layout and DriveLM object tags,
grounding boxes, video frame sampling, multiple-choice classification. EdgeVL.generate() uses them for
`images={camera: view}` and `video=...`; the rest is for building prompts and reading answers."""
from .classification import UNPARSED, multiple_choice_prompt, parse_choice
from .driving import (CAMERA_ORDER, ObjectTag, assemble_views, assembled_to_view, camera_prompt, driving_query,
                      format_object_tag, parse_object_tags, tags_to_normalized, tags_to_pixels, view_to_assembled)
from .grounding import (Box, GroundingResult, detection_prompt, draw_boxes, parse_boxes, region_prompt,
                        to_normalized_box, to_pixel_box)
from .video import check_frame_budget, max_frames_that_fit, read_video_frames, sample_frame_indices, video_query

__all__ = [
    "UNPARSED", "multiple_choice_prompt", "parse_choice",
    "CAMERA_ORDER", "ObjectTag", "assemble_views", "assembled_to_view", "camera_prompt", "driving_query",
    "format_object_tag", "parse_object_tags", "tags_to_normalized", "tags_to_pixels", "view_to_assembled",
    "Box", "GroundingResult", "detection_prompt", "draw_boxes", "parse_boxes", "region_prompt",
    "to_normalized_box", "to_pixel_box",
    "check_frame_budget", "max_frames_that_fit", "read_video_frames", "sample_frame_indices", "video_query",
]
