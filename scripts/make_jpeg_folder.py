"""An ImageFolder of photo-like JPEGs for trying `lewel pretrain --data` where no dataset is at hand
(the GPU evidence script uses it): ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG, ImageNet's
typical file (500x375, quality 90, 4:2:0), with the odd-but-valid files a real folder holds (CMYK
and grayscale JPEG, a PNG named .JPEG, progressive JPEG) and 1% corrupt ones in train/ (truncated
JPEGs, random bytes named .JPEG, empty files).

    python3 scripts/make_jpeg_folder.py ROOT [--classes 10] [--per-class 256] [--val-per-class 30]

Needs numpy and Pillow. Prints what it wrote, and the corrupt files' paths.
"""

import argparse
import os
from multiprocessing import Pool

import numpy as np
from PIL import Image

W, H = 500, 375


def photo(cls, seed):
    """A smooth background, a few flat discs and fine noise; the class sets the palette."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    base = np.array([(cls * 53) % 256, (cls * 97) % 256, (cls * 151) % 256], np.float32)
    a, b = r.uniform(5, 40, 2)
    img = np.stack(
        [
            base[0] * 0.5 + 60 * np.sin(x / a + y / b),
            base[1] * 0.5 + 50 * np.cos(y / a) * np.sin(x / b),
            base[2] * 0.5 + 80 * (x + y) / (W + H),
        ],
        -1,
    )
    for _ in range(r.integers(3, 8)):
        cx, cy, rad = r.uniform(0, W), r.uniform(0, H), r.uniform(20, 150)
        img[(x - cx) ** 2 + (y - cy) ** 2 < rad * rad] = r.uniform(0, 255, 3)
    img += r.normal(0, 10, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write(job):
    path, cls, seed, kind = job
    if kind == "empty":
        open(path, "wb").close()
        return
    if kind == "random":
        with open(path, "wb") as f:
            f.write(np.random.default_rng(seed).integers(0, 256, 5000, dtype=np.uint8).tobytes())
        return
    im = photo(cls, seed)
    if kind == "cmyk":
        im.convert("CMYK").save(path, "JPEG", quality=90)
    elif kind == "gray":
        im.convert("L").save(path, "JPEG", quality=90)
    elif kind == "png":
        im.save(path, "PNG")
    elif kind == "progressive":
        im.save(path, "JPEG", quality=90, progressive=True)
    else:
        im.save(path, "JPEG", quality=90, subsampling=2)
        if kind == "truncated":
            with open(path, "rb") as f:
                data = f.read()
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=256)
    ap.add_argument("--val-per-class", type=int, default=30)
    a = ap.parse_args()
    jobs, bad = [], []
    odd = ["cmyk", "gray", "png", "progressive"]
    corrupt = ["truncated", "random", "empty"]
    n_train = a.classes * a.per_class
    n_bad = max(3, n_train // 100)
    step = max(1, n_train // n_bad)
    for split, per in (("train", a.per_class), ("val", a.val_per_class)):
        for c in range(a.classes):
            d = os.path.join(a.root, split, f"class{c:03d}")
            os.makedirs(d, exist_ok=True)
            for i in range(per):
                k = c * per + i
                kind = "jpeg"
                if split == "train" and c == 0 and i < len(odd):
                    kind = odd[i]
                elif split == "train" and k % step == step // 2 and len(bad) < n_bad:
                    # About 1% of train/, spread over the classes.
                    kind = corrupt[len(bad) % 3]
                path = os.path.join(d, f"{split}_{k:06d}.JPEG")
                if kind in corrupt:
                    bad.append(path)
                jobs.append((path, c, (0 if split == "train" else 1) << 32 | k, kind))
    with Pool() as p:
        p.map(write, jobs, chunksize=16)
    print(
        f"{a.root}: train/ {n_train} files ({len(bad)} corrupt, {len(odd)} odd but valid), "
        f"val/ {a.classes * a.val_per_class}, {a.classes} classes"
    )
    for b in sorted(bad):
        print(f"corrupt: {b}")


if __name__ == "__main__":
    main()
