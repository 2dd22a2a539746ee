#!/usr/bin/env python3
"""Pillow's speed on MAE's training transform, the anchor `umae bench --data` is compared with.

    python3 -m venv /tmp/pil && /tmp/pil/bin/pip install pillow numpy
    /tmp/pil/bin/python scripts/pillow-pipeline.py /tmp/jpegs        # writes the images once
    umae bench recipes/mae-vitb.ron --data --set 'data.root="/tmp/jpegs"' --set eval.online_probe=false \
        --set data.format=Images --batch 64 --steps 10 --workers 2

When the folder holds no .jpg, writes 300 ImageNet-sized (500x375) JPEGs at quality 90 into it
(smooth colour fields with edges and grain). Then times, on one core, every .jpg of the folder
through MAE's training transform as torchvision runs it on Pillow: open + decode,
RandomResizedCrop(224, scale=(0.2, 1), ratio=(3/4, 4/3)) (crop, then a bicubic resize),
horizontal flip with probability 1/2, and per-channel normalisation into a float32 CHW array
(the tensor umae's pipeline produces; a lookup table per channel, the fastest numpy form found:
broadcasting `(a - mean) / std` over HWC runs 5x slower).
"""
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

folder = Path(sys.argv[1] if len(sys.argv) > 1 else "jpegs")
count, size = 300, 224
folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for f in [] if any(folder.glob("*.jpg")) else [folder / f"{i:04d}.jpg" for i in range(count)]:
    field = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    img = Image.fromarray(field, "RGB").resize((500, 375), Image.BICUBIC)
    a = np.asarray(img).astype(np.int16)
    a[:, ::50] = 255 - a[:, ::50]  # hard edges
    a += rng.integers(-16, 17, size=a.shape, dtype=np.int16)  # grain
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(f, quality=90)

files = sorted(folder.glob("*.jpg"))
mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
table = ((np.arange(256, dtype=np.float32)[None, :] / 255.0 - mean[:, None]) / std[:, None]).astype(np.float32)


def crop_box(w, h):
    area = w * h
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * random.uniform(0.2, 1.0)
        ratio = math.exp(random.uniform(lo, hi))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = random.randint(0, w - cw), random.randint(0, h - ch)
            return x, y, x + cw, y + ch
    return 0, 0, w, h


def view(path):
    img = Image.open(path).convert("RGB")
    img = img.crop(crop_box(*img.size)).resize((size, size), Image.BICUBIC)
    if random.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    a = np.asarray(img)
    return np.stack([table[c][a[:, :, c]] for c in range(3)])


os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
for f in files[:30]:
    view(f)
for _ in range(3):
    t = time.perf_counter()
    for f in files:
        view(f)
    rate = len(files) / (time.perf_counter() - t)
    print(f"Pillow {Image.__version__}: decode + RandomResizedCrop 224 (bicubic) + flip + normalise, 1 core: {rate:.0f} images/s")
