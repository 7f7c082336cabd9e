"""scikit-learn's bundled handwritten digits as a small, offline image–caption dataset (the quickstart's data)."""

from __future__ import annotations

import numpy as np


def digits_dataset(n: int | None = None, image_size: int = 32, seed: int = 0):
    """scikit-learn's bundled handwritten digits (8×8, 1,797 images) as a `datasets.Dataset` of RGB PIL images.

    Columns: `image` (PIL, upscaled to `image_size`), `label` (int), `caption` ("a handwritten digit three").
    """
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))[:n]
    images = []
    for index in order:
        pixels = (digits.images[index] / 16.0 * 255).astype(np.uint8)
        images.append(Image.fromarray(pixels).convert("RGB").resize((image_size, image_size), Image.NEAREST))
    labels = [int(digits.target[i]) for i in order]
    captions = [f"a handwritten digit {DIGIT_NAMES[label]}" for label in labels]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=DIGIT_NAMES),
            "caption": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels, "caption": captions}, features=features)


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
