#!/usr/bin/env python3
"""Write the Pillow reference images the resize tests compare against.

    python3 -m venv /tmp/pil && /tmp/pil/bin/pip install pillow numpy
    /tmp/pil/bin/python scripts/pillow-fixture.py tests/fixtures/pillow

The source is a small RGB picture with smooth gradients, hard edges and noise; each expected
image is one of torchvision's transforms written out by Pillow itself:
  crop-bicubic.png   img.crop(CROP).resize((24, 24), BICUBIC)   (RandomResizedCrop's resample)
  crop-bilinear.png  the same with BILINEAR
  eval-bicubic.png   Resize(27) (shorter side, BICUBIC) then CenterCrop(24)
The tests read CROP from crop.txt.
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/pillow")
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(17)
h, w = 45, 61
y, x = np.mgrid[0:h, 0:w]
r = 255 * x / (w - 1)
g = 128 + 100 * np.sin(y / 3.0) * np.cos(x / 5.0)
b = np.where((x // 7 + y // 5) % 2 == 0, 230, 20).astype(float)
pixels = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, size=(h, w, 3))
src = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
src.save(out / "source.png")

crop = (7, 4, 7 + 40, 4 + 33)  # left, top, right, bottom: a 40x33 crop
(out / "crop.txt").write_text(" ".join(str(v) for v in crop) + "\n")
src.crop(crop).resize((24, 24), Image.BICUBIC).save(out / "crop-bicubic.png")
src.crop(crop).resize((24, 24), Image.BILINEAR).save(out / "crop-bilinear.png")

size, short = 24, 24 * 256 // 224  # 27
rw, rh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
resized = src.resize((rw, rh), Image.BICUBIC)
top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
resized.crop((left, top, left + size, top + size)).save(out / "eval-bicubic.png")
print(f"wrote {out}: source {w}x{h}, crop {crop}, eval resize {rw}x{rh}")
