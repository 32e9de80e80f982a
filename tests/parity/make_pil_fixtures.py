"""Fixtures for src/data/pil.rs: torchvision/PIL outputs of every augmentation op for fixed
parameters, on small generated images. Run from the repository root:

    python3 tests/parity/make_pil_fixtures.py

Writes tests/fixtures/pil/ops.safetensors (u8 images, f32 normalized views, and the parameters
as tensors). Needs numpy, Pillow, torch, torchvision, safetensors; the Rust test needs none.
"""
import numpy as np
import torch
import torchvision
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter, ImageOps
import PIL
from safetensors.numpy import save_file

rs = np.random.RandomState(0)


def photo(w, h):
    """Smooth gradients, a few shapes and noise: exercises rounding in every op."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([
        128 + 100 * np.sin(x / 7.0 + y / 11.0),
        128 + 90 * np.cos(y / 5.0) * np.sin(x / 13.0),
        40 + 200 * (x + y) / (w + h),
    ], axis=-1)
    for _ in range(4):
        cx, cy, r = rs.uniform(0, w), rs.uniform(0, h), rs.uniform(3, w / 3)
        col = rs.uniform(0, 255, 3)
        m = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        img[m] = col
    img += rs.normal(0, 12, img.shape)
    img[0, 0] = [255, 255, 255]
    img[-1, -1] = [0, 0, 0]
    img[1, 2] = [255, 0, 0]
    img[2, 1] = [7, 7, 7]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def arr(im):
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


out = {}
small = photo(37, 29)
big = photo(100, 75)
out["small"] = arr(small)
out["big"] = arr(big)

for k, f in enumerate([0.0, 0.6, 0.93, 1.0, 1.37, 1.4]):
    out[f"brightness.{k}"] = arr(F.adjust_brightness(small, f))
    out[f"brightness.{k}.f"] = np.array([f], np.float32)
for k, f in enumerate([0.6, 0.81, 1.0, 1.23, 1.4]):
    out[f"contrast.{k}"] = arr(F.adjust_contrast(small, f))
    out[f"contrast.{k}.f"] = np.array([f], np.float32)
for k, f in enumerate([0.8, 0.97, 1.2]):
    out[f"saturation.{k}"] = arr(F.adjust_saturation(small, f))
    out[f"saturation.{k}.f"] = np.array([f], np.float32)
for k, f in enumerate([-0.1, -0.0333, -0.002, 0.0, 0.004, 0.05, 0.1]):
    out[f"hue.{k}"] = arr(F.adjust_hue(small, f))
    out[f"hue.{k}.f"] = np.array([f], np.float64)
out["grayscale"] = arr(F.rgb_to_grayscale(small, num_output_channels=3))
out["solarize"] = arr(ImageOps.solarize(small, 128))
out["hflip"] = arr(F.hflip(small))
for k, s in enumerate([0.1, 0.5, 0.77, 1.3, 2.0]):
    out[f"blur.{k}"] = arr(small.filter(ImageFilter.GaussianBlur(radius=s)))
    out[f"blur.{k}.f"] = np.array([s], np.float32)
    if k in (1, 4):
        out[f"blur_big.{k}"] = arr(big.filter(ImageFilter.GaussianBlur(radius=s)))
# Crop then bilinear resize, as RandomResizedCrop: (top, left, h, w, out_h, out_w).
crops = [
    (0, 0, 75, 100, 48, 48),     # whole image, downscale
    (10, 20, 40, 60, 32, 32),    # downscale
    (5, 7, 30, 22, 48, 48),      # upscale
    (3, 0, 70, 48, 48, 48),      # one side unchanged
    (0, 0, 75, 100, 75, 64),     # one pass only
    (1, 2, 67, 91, 37, 29),      # odd sizes
]
for k, (t, l, h, w, oh, ow) in enumerate(crops):
    im = F.resized_crop(big, t, l, h, w, [oh, ow], interpolation=F.InterpolationMode.BILINEAR)
    out[f"resized_crop.{k}"] = arr(im)
    out[f"resized_crop.{k}.p"] = np.array([t, l, h, w, oh, ow], np.int64)
# Eval transform: shorter side to 40, centre crop 32 (the 256/224 rule at a small size).
ev = F.center_crop(F.resize(big, 40, interpolation=F.InterpolationMode.BILINEAR), 32)
out["eval"] = arr(ev)
# Normalize (ToTensor then Normalize), kept HWC.
t = F.normalize(F.to_tensor(small), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
out["normalized"] = np.ascontiguousarray(t.permute(1, 2, 0).numpy().astype(np.float32))

# Whole views from fixed parameters, composed from torchvision's ops in the official order:
# crop+resize, flip, jitter ops in the given order, grayscale, blur, solarize.
# (top, left, h, w, flip, order, b, c, s, hue or None for no jitter, gray, sigma or 0, solarize)
views = [
    (4, 9, 50, 61, 1, [2, 0, 3, 1], 1.31, 0.64, 1.12, -0.071, 0, 1.7, 0),
    (0, 0, 75, 100, 0, [3, 1, 0, 2], 0.7, 1.38, 0.85, 0.093, 1, 0.0, 1),
    (20, 30, 33, 41, 1, None, 1, 1, 1, 0, 0, 0.35, 1),
]
size = 40
for k, (t, l, h, w, flip, order, b, c, sat, hue, gray, sigma, sol) in enumerate(views):
    im = F.resized_crop(big, t, l, h, w, [size, size], interpolation=F.InterpolationMode.BILINEAR)
    if flip:
        im = F.hflip(im)
    if order is not None:
        for op in order:
            im = [lambda x: F.adjust_brightness(x, b), lambda x: F.adjust_contrast(x, c),
                  lambda x: F.adjust_saturation(x, sat), lambda x: F.adjust_hue(x, hue)][op](im)
    if gray:
        im = F.rgb_to_grayscale(im, num_output_channels=3)
    if sigma > 0:
        im = im.filter(ImageFilter.GaussianBlur(radius=sigma))
    if sol:
        im = ImageOps.solarize(im, 128)
    out[f"view.{k}"] = arr(im)
    out[f"view.{k}.p"] = np.array([t, l, h, w, flip, gray, sol] + (order or [9, 9, 9, 9]), np.int64)
    out[f"view.{k}.f"] = np.array([b, c, sat, hue, sigma], np.float32)

# RandomResizedCrop(scale=(0.2, 1)) as torchvision samples it: histograms of the area fraction and
# of the log aspect ratio (10 bins each) over 200,000 draws, for a typical and a very wide image.
torch.manual_seed(0)
rrc = torchvision.transforms.RandomResizedCrop(224, scale=(0.2, 1.0))
for name, (W, H) in {"typical": (500, 375), "wide": (400, 60)}.items():
    n = 200_000
    area = np.empty(n)
    logr = np.empty(n)
    img = Image.new("RGB", (W, H))
    for i in range(n):
        t, l, h, w = rrc.get_params(img, rrc.scale, rrc.ratio)
        area[i] = h * w / (W * H)
        logr[i] = np.log(w / h)
    out[f"rrc.{name}.size"] = np.array([W, H], np.int64)
    out[f"rrc.{name}.area"] = (np.histogram(area, bins=10, range=(0, 1))[0] / n)
    lo, hi = np.log(3 / 4) - 1e-9, np.log(4 / 3) + 1e-9
    out[f"rrc.{name}.logr"] = (np.histogram(np.clip(logr, lo, hi), bins=10, range=(lo, hi))[0] / n)

save_file(out, "tests/fixtures/pil/ops.safetensors",
          metadata={"pillow": PIL.__version__, "torchvision": torchvision.__version__,
                    "numpy": np.__version__, "torch": torch.__version__})
print(f"{len(out)} tensors, Pillow {PIL.__version__}, torchvision {torchvision.__version__}")
