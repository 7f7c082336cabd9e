"""Image preprocessing on CPU: transformers' torchvision-backed image processors against their PIL-backed twins.

    python benchmarks/bench_preprocessing.py                    # 64 photo-sized images, batches of 32, 3 rounds
    python benchmarks/bench_preprocessing.py --images 256 --repeat 5

transformers ships each image processor twice: `XImageProcessor` (the torchvision backend, what `AutoImageProcessor`
returns when torchvision is importable) and `XImageProcessorPil` (PIL + numpy). Both are built here with the same
settings for the preprocessing families the library's encoders use:

* ViT: resize to 224 x 224 (bilinear), mean/std 0.5 (`google/vit-*`);
* DINOv2: shorter side to 256 (bicubic), center crop 224, ImageNet mean/std (`BitImageProcessor`, `facebook/dinov2-*`);
* CLIP: shorter side to 224 (bicubic), center crop 224, CLIP mean/std (`openai/clip-*`; timm models too, through
  `hf_align.model.processing.timm_image_processor`);
* ConvNeXt: shorter side to 256 = 224 / 0.875 (bicubic), center crop 224, ImageNet mean/std (`facebook/convnext-*`);
* EfficientNet: resize to 224 x 224 (bicubic), mean/std 0.5, no crop (the library's EfficientNet-Lite0).

Inputs are what extraction hands the processor: decoded RGB PIL images, here `--images` synthetic photographs (smooth
colour fields, edges and sensor noise) in COCO's sizes (640 x 480, 480 x 640, 640 x 427, 500 x 375), JPEG-encoded at
quality 90 and decoded with PIL beforehand (decoding is not timed). Each processor turns them into `pixel_values` in
batches of `--batch-size`, with torch at 1 intra-op thread (what each extraction worker gets, as DataLoader workers
run torch single-threaded) and at every core. Each run is timed on two clocks: wall-clock time (`images_per_s`) and
this process's CPU time (`images_per_cpu_s`, summed over its threads: images per core-second). On a machine shared
with other jobs the second is the one to compare: the others' load stretches wall-clock time, not this process's CPU
time; with several threads it also counts the time threads spend spinning. Rounds run round-robin and each row keeps
its fastest, since other jobs only ever slow a run down.

Each row also gives how far the torchvision output is from the PIL output (the reference): the largest and the mean
absolute difference of `pixel_values` (normalised units), and the largest in 8-bit levels (the difference times the
channel's std times 255). The two backends resize differently (torchvision's antialiased tensor kernels against
PIL's filters), so they are close, not equal.
Results: results/preprocessing.json (`--results-name` to write another file).
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
import torch
from _common import machine, print_table, write_results
from PIL import Image
from transformers import (
    BitImageProcessor,
    BitImageProcessorPil,
    CLIPImageProcessor,
    CLIPImageProcessorPil,
    ConvNextImageProcessor,
    ConvNextImageProcessorPil,
    EfficientNetImageProcessor,
    EfficientNetImageProcessorPil,
    ViTImageProcessor,
    ViTImageProcessorPil,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

SIZES = ((640, 480), (480, 640), (640, 427), (500, 375))  # (width, height), COCO's most common

# name -> (torchvision class, PIL class, settings)
PROCESSORS = {
    "ViT": (ViTImageProcessor, ViTImageProcessorPil, {"size": {"height": 224, "width": 224}}),
    "DINOv2": (
        BitImageProcessor,
        BitImageProcessorPil,
        {
            "size": {"shortest_edge": 256},
            "crop_size": {"height": 224, "width": 224},
            "image_mean": IMAGENET_DEFAULT_MEAN,
            "image_std": IMAGENET_DEFAULT_STD,
        },
    ),
    "CLIP": (CLIPImageProcessor, CLIPImageProcessorPil, {}),
    "ConvNeXt": (
        ConvNextImageProcessor,
        ConvNextImageProcessorPil,
        {
            "size": {"shortest_edge": 224},
            "crop_pct": 0.875,
            "image_mean": IMAGENET_DEFAULT_MEAN,
            "image_std": IMAGENET_DEFAULT_STD,
        },
    ),
    "EfficientNet": (
        EfficientNetImageProcessor,
        EfficientNetImageProcessorPil,
        {
            "size": {"height": 224, "width": 224},
            "do_center_crop": False,
            "include_top": False,
            "rescale_offset": False,
        },
    ),
}


def photographs(n: int, seed: int = 0) -> list[Image.Image]:
    """`n` decoded RGB PIL images that compress like photographs: a smooth colour field (a 6 x 8 random grid upscaled
    bicubically), a few hard-edged shapes, and sensor noise; JPEG-encoded at quality 90, then decoded."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        width, height = SIZES[i % len(SIZES)]
        grid = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        canvas = np.asarray(grid.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
        for _ in range(4):
            top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
            canvas[top : top + height // 3, left : left + width // 3] = rng.integers(0, 256, 3)
        canvas += rng.normal(0.0, 6.0, canvas.shape)
        buffer = io.BytesIO()
        Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        buffer.seek(0)
        image = Image.open(buffer).convert("RGB")
        image.load()
        images.append(image)
    return images


def process_all(processor, images: list[Image.Image], batch_size: int) -> torch.Tensor:
    """`pixel_values` (n, 3, H, W) of every image, `batch_size` images per processor call."""
    parts = [
        processor(images[start : start + batch_size], return_tensors="pt")["pixel_values"]
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(parts)


def throughput(processor, images: list[Image.Image], batch_size: int, threads: int) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second of this process) with torch at `threads` threads."""
    torch.set_num_threads(threads)
    process_all(processor, images[:batch_size], batch_size)  # warm-up: kernels, caches
    wall, cpu = time.perf_counter(), time.process_time()
    process_all(processor, images, batch_size)
    return len(images) / (time.perf_counter() - wall), len(images) / (time.process_time() - cpu)


def difference(fast: torch.Tensor, reference: torch.Tensor, std) -> dict:
    """How far the torchvision output is from the PIL one: normalised units, and 8-bit levels per channel's std."""
    gap = (fast - reference).abs()
    levels = gap * torch.tensor(std, dtype=gap.dtype)[None, :, None, None] * 255
    return {
        "max_abs_diff": gap.max().item(),
        "mean_abs_diff": gap.mean().item(),
        "max_diff_levels": levels.max().item(),
        "mean_diff_levels": levels.mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="round-robin rounds; each row keeps its fastest")
    parser.add_argument("--processors", default="all", help=f"comma-separated, from {sorted(PROCESSORS)}, or 'all'")
    parser.add_argument("--results-name", default="preprocessing", help="results/<name>.json")
    args = parser.parse_args()
    names = list(PROCESSORS) if args.processors == "all" else args.processors.split(",")
    unknown = sorted(set(names) - set(PROCESSORS))
    if unknown:
        parser.error(f"--processors: unknown {unknown}; known: {sorted(PROCESSORS)}")
    all_threads = os.cpu_count() or 1
    thread_counts = sorted({1, all_threads})
    images = photographs(args.images)
    built = {
        name: {"torchvision": fast(**settings), "pil": slow(**settings)}
        for name, (fast, slow, settings) in PROCESSORS.items()
        if name in names
    }

    best: dict[tuple, tuple[float, float]] = {}
    for _ in range(args.repeat):
        for name, backends in built.items():
            for backend, processor in backends.items():
                for threads in thread_counts:
                    rates = throughput(processor, images, args.batch_size, threads)
                    seen = best.get((name, backend, threads), (0.0, 0.0))
                    best[name, backend, threads] = (max(seen[0], rates[0]), max(seen[1], rates[1]))

    rows = []
    for name, backends in built.items():
        torch.set_num_threads(all_threads)
        reference = process_all(backends["pil"], images, args.batch_size)
        fast = process_all(backends["torchvision"], images, args.batch_size)
        gaps = difference(fast, reference, backends["pil"].image_std)
        for threads in thread_counts:
            pil_wall, pil_cpu = best[name, "pil", threads]
            for backend in ("pil", "torchvision"):
                wall, cpu = best[name, backend, threads]
                row = {
                    "processor": name,
                    "backend": backend,
                    "threads": threads,
                    "images_per_s": wall,
                    "images_per_cpu_s": cpu,
                    "x pil (cpu)": cpu / pil_cpu,
                    "x pil (wall)": wall / pil_wall,
                    "output": "x".join(str(s) for s in reference.shape[1:]),
                }
                if backend == "torchvision":
                    row.update(gaps)
                rows.append(row)

    print_table(
        f"Image preprocessing, {args.images} decoded JPEGs of {len(SIZES)} photo sizes, batches of {args.batch_size}",
        rows,
        [
            "processor",
            "backend",
            "threads",
            "images_per_s",
            "images_per_cpu_s",
            "x pil (cpu)",
            "x pil (wall)",
            "max_abs_diff",
            "mean_abs_diff",
            "max_diff_levels",
        ],
    )
    torch.set_num_threads(all_threads)
    write_results(args.results_name, {"machine": machine(torch.device("cpu")), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
