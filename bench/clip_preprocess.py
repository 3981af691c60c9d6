"""What a scoring actor spends on CLIP's image preprocessing per row, before and after the decode stage
took the resize and crop: transformers' CLIPImageProcessorPil in the actor, against a lookup table on
the actor's device over uint8 crops made in the CPU stage. CLIP's own 224 settings; 16 frames of a
512 x 320 video (DynamiCrafter's size), the median of several runs.

    python bench/clip_preprocess.py [--frames 16] [--height 320] [--width 512]

Prints milliseconds per row for each half and the actor's ratio (processor / table).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPImageProcessorPil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import seconds
from pipelines.clip import Clip, pixel_table
from pipelines.clip_crop import ClipCrop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    frames = np.random.default_rng(0).integers(0, 256, (args.frames, args.height, args.width, 3), np.uint8)
    processor = CLIPImageProcessorPil()
    crop = ClipCrop.from_config(processor.to_dict())
    clip = Clip("bench", None, None, crop, pixel_table(processor).to(device), device)
    crops = crop(frames)

    def median_ms(fn) -> float:
        fn()  # warm-up
        return 1000 * statistics.median(seconds(fn) for _ in range(args.repeats))

    before = median_ms(lambda: processor(images=list(frames), return_tensors="pt")["pixel_values"].to(device))
    stage = median_ms(lambda: crop(frames))
    after = median_ms(lambda: clip.pixels(crops))
    print(f"{args.frames} frames of {args.height}x{args.width} on {device}, ms per row:")
    print(f"  actor, processor (before):        {before:8.1f}")
    print(f"  decode stage, resize and crop:    {stage:8.1f}")
    print(f"  actor, lookup table (after):      {after:8.1f}")
    print(f"  actor's preprocessing, before / after: {before / after:.1f}x")


if __name__ == "__main__":
    main()
