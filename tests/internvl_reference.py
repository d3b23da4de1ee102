"""Test oracle: a direct port of InternVL's reference image preprocessing, PIL + numpy only.

Ported from the InternVL2 model cards' ``load_image`` / ``dynamic_preprocess`` /
``find_closest_aspect_ratio`` / ``build_transform``. torchvision is not available here, so its
transforms are emulated as torchvision computes them:

- ``T.Lambda(convert('RGB'))``: as is.
- ``T.Resize((S, S), BICUBIC)``: PIL ``resize`` (torchvision hands PIL images to Pillow); every input
  is already SxS, so Pillow returns a copy.
- ``T.ToTensor()``: uint8 HWC -> float32 CHW, then ``/ 255`` in float32.
- ``T.Normalize(mean, std)``: ``(x - mean) / std`` with float32 mean and std tensors.

Keep this file a literal port: it is what the production code is checked against.
"""

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(input_size):
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]

    def transform(img):
        img = img.convert("RGB") if img.mode != "RGB" else img
        img = img.resize((input_size, input_size), Image.BICUBIC)
        x = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        return (x - mean) / std

    return transform


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def target_ratios_for(min_num, max_num):
    # Inline in the reference's dynamic_preprocess; factored out only so tests can sweep
    # find_closest_aspect_ratio without rebuilding the list for every size.
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height

    # calculate the existing image aspect ratio
    target_ratios = target_ratios_for(min_num, max_num)

    # find the closest aspect ratio to the target
    target_aspect_ratio = find_closest_aspect_ratio(aspect_ratio, target_ratios, orig_width, orig_height, image_size)

    # calculate the target width and height
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]

    # resize the image (the reference passes no filter: Pillow's default for RGB is BICUBIC)
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        # split the image
        split_img = resized_img.crop(box)
        processed_images.append(split_img)
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        thumbnail_img = image.resize((image_size, image_size))
        processed_images.append(thumbnail_img)
    return processed_images


def pixel_values(image, min_num=1, max_num=12, image_size=448, use_thumbnail=True):
    """load_image's body for an already-opened PIL image, with the tiling knobs exposed."""
    transform = build_transform(input_size=image_size)
    images = dynamic_preprocess(image, min_num=min_num, max_num=max_num, image_size=image_size, use_thumbnail=use_thumbnail)
    return np.stack([transform(image) for image in images])


def load_image(image_file, input_size=448, max_num=12):
    image = Image.open(image_file).convert("RGB")
    transform = build_transform(input_size=input_size)
    images = dynamic_preprocess(image, image_size=input_size, use_thumbnail=True, max_num=max_num)
    pixel_values = [transform(image) for image in images]
    return np.stack(pixel_values)
