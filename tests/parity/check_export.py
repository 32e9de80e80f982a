#!/usr/bin/env python3
"""Check that `lewel export` writes a backbone that torchvision's ResNet accepts as-is.

For each depth checked (50 by default, 18 too with the default --depths), at full width
(div 1), the script checks the following:

 1. `lewel_reference.py make` writes a full LEWEL state. Its BN running statistics are
    perturbed, so eval-mode BN is really exercised, and the target net differs from the
    online net.
 2. `lewel export` turns that state into a backbone file. The file must have exactly the
    `online_net.backbone.*` names with the prefix removed, and the same values bit for bit.
    Each `num_batches_tracked` must be an int64 scalar.
 3. The file is loaded into `torchvision.models.resnet{50,18}(weights=None)` with
    `load_state_dict(sd, strict=False)`. The only missing keys may be `fc.weight` and
    `fc.bias`, and nothing may be unexpected.
 4. The model is put in eval mode and `fc` is replaced by Identity, so it outputs the
    global-average-pooled layer4 features. These features, computed on fixed random
    normalized images, are compared with `lewel embed`. `lewel embed` is run twice: on
    the exported backbone and on the full state (whose online backbone it must pick).
    The check passes when ||rust - torch|| / ||torch|| <= --tol (1e-5). Both sides
    compute in float32. For scale, the script also prints each side's error against the
    same torchvision model in float64, and how far the target backbone's features are
    from the online backbone's. That last distance is what a mix-up would cost, and it
    must exceed 100 x tol.

It prints one line per check with PASS or FAIL, and a final PASS or FAIL. The exit
status is non-zero if anything failed.

Run it from the repository root, after `cargo build --release`:

    python3 tests/parity/check_export.py              # depths 50 and 18, about a minute
    python3 tests/parity/check_export.py --depths 50

It needs python3 with torch, torchvision and safetensors, and target/release/lewel. It
works in a temporary directory and deletes it at the end; pass --keep to keep it. The
full-width depth-50 state is about 500 MB.
"""

import argparse
import copy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

try:
    import torchvision
except ImportError:  # pragma: no cover - environment problem, reported plainly
    sys.exit("check_export.py needs torchvision: pip install torchvision "
             "(a build matching the installed torch)")

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "tests" / "parity" / "lewel_reference.py"
PREFIX = "online_net.backbone."
TARGET_PREFIX = "target_net.backbone."
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Checks:
    def __init__(self):
        self.failed = 0
        self.count = 0

    def report(self, tag, text, ok):
        self.count += 1
        if not ok:
            self.failed += 1
        print(f"[{tag}] {text}  {'PASS' if ok else 'FAIL'}", flush=True)

    @staticmethod
    def info(tag, text):
        print(f"[{tag}] {text}", flush=True)


def run(cmd, what):
    """Run a command from the repo root; raise with its output when it fails."""
    p = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {p.returncode}): {' '.join(map(str, cmd))}\n"
                           f"{p.stdout}{p.stderr}")
    return p.stdout


def rel_l2(a, b):
    """||a - b|| / ||b|| and max |a - b|, both in float64."""
    a, b = a.double(), b.double()
    d = a - b
    nb = b.norm().item()
    rel = d.norm().item() / nb if nb > 0 else float("inf")
    return rel, d.abs().max().item()


def make_images(n, size, seed):
    """Uniform [0, 1) pixels, normalized with the ImageNet mean and std: float32 NCHW."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 3, size, size), generator=gen, dtype=torch.float32)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def pooled_model(depth, sd):
    """torchvision ResNet with `sd` loaded (strict=False), fc = Identity, in eval mode.
    Returns (model, missing, unexpected)."""
    m = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    m.fc = nn.Identity()
    m.eval()
    return m, list(missing), list(unexpected)


@torch.no_grad()
def features(model, x):
    return model(x)


def embed(binary, checkpoint, images, out):
    run([binary, "embed", "--checkpoint", checkpoint, "--images", images, "--out", out],
        "lewel embed")
    f = load_file(str(out))
    if "features" not in f:
        raise RuntimeError(f"{out}: no tensor 'features' (keys: {sorted(f)})")
    return f["features"]


def check_depth(depth, args, binary, work, checks):
    tag = f"r{depth}"
    d = work / tag
    d.mkdir()
    state_p, views_p = d / "state.safetensors", d / "views.safetensors"
    backbone_p, images_p = d / "backbone.safetensors", d / "images.safetensors"
    t0 = time.time()

    # 1. a full LEWEL state
    run([sys.executable, REFERENCE, "make", "--depth", depth, "--div", 1, "--batch", 2,
         "--size", 64, "--seed", args.seed, "--state", state_p, "--views", views_p],
        "lewel_reference.py make")
    views_p.unlink()

    # 2. export and compare with the source names and values
    run([binary, "export", "--checkpoint", state_p, "--out", backbone_p], "lewel export")
    state = load_file(str(state_p))
    src = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    tgt = {k[len(TARGET_PREFIX):]: v for k, v in state.items() if k.startswith(TARGET_PREFIX)}
    del state
    sd = load_file(str(backbone_p))
    names_ok = set(sd) == set(src)
    bad_values = [k for k in sorted(set(sd) & set(src))
                  if sd[k].dtype != src[k].dtype or sd[k].shape != src[k].shape
                  or not torch.equal(sd[k], src[k])]
    nbt = [k for k in sd if k.endswith("num_batches_tracked")]
    bad_nbt = [k for k in nbt if sd[k].dtype != torch.int64 or sd[k].dim() != 0]
    bad_float = [k for k in sd if k not in nbt and sd[k].dtype != torch.float32]
    text = (f"export: {len(sd)} tensors, names = {PREFIX}* without the prefix: {names_ok}; "
            f"values bit-equal: {len(bad_values) == 0}; {len(nbt)} num_batches_tracked int64 []: "
            f"{len(bad_nbt) == 0}; others float32: {len(bad_float) == 0}")
    if not names_ok:
        text += (f" (only in export: {sorted(set(sd) - set(src))[:5]}, "
                 f"only in state: {sorted(set(src) - set(sd))[:5]})")
    for label, lst in (("differ", bad_values), ("bad num_batches_tracked", bad_nbt),
                       ("not float32", bad_float)):
        if lst:
            text += f" ({label}: {lst[:5]})"
    checks.report(tag, text, names_ok and not bad_values and not bad_nbt and not bad_float)

    # 3. torchvision accepts it
    model, missing, unexpected = pooled_model(depth, sd)
    ok = set(missing) == {"fc.weight", "fc.bias"} and len(missing) == 2 and unexpected == []
    checks.report(tag, f"torchvision resnet{depth} load_state_dict(strict=False): "
                       f"missing={sorted(missing)} unexpected={sorted(unexpected)}", ok)

    # 4. same pooled features
    x = make_images(args.images, args.size, args.seed)
    save_file({"images": x}, str(images_p))
    f_tv = features(model, x)
    f_tv64 = features(copy.deepcopy(model).double(), x.double())
    target_model, _, _ = pooled_model(depth, tgt)
    f_target = features(target_model, x)
    del target_model, tgt, src

    f_bb = embed(binary, backbone_p, images_p, d / "features_backbone.safetensors")
    f_full = embed(binary, state_p, images_p, d / "features_state.safetensors")
    state_p.unlink()  # the big file
    want_shape = tuple(f_tv.shape)
    for label, f in (("embed(export)", f_bb), ("embed(full state)", f_full)):
        shape_ok = tuple(f.shape) == want_shape and f.dtype == torch.float32
        if not shape_ok:
            checks.report(tag, f"{label}: features {tuple(f.shape)} {f.dtype}, torchvision "
                               f"{want_shape} float32", False)
            continue
        rel, mx = rel_l2(f, f_tv)
        rel64, _ = rel_l2(f, f_tv64)
        checks.report(tag, f"{label} vs torchvision f32, {tuple(f.shape)}: rel L2 {rel:.2e}, "
                           f"max abs {mx:.2e} (|features| max {f_tv.abs().max().item():.3g}), "
                           f"vs f64 {rel64:.2e}; tol {args.tol:g}", rel <= args.tol)
    if f_bb.shape == f_full.shape:
        same = torch.equal(f_bb, f_full)
        rel, mx = rel_l2(f_full, f_bb)
        checks.report(tag, f"embed(full state) vs embed(export): "
                           f"{'bit-identical' if same else f'rel L2 {rel:.2e}, max abs {mx:.2e}'}",
                      rel <= args.tol)
    rel_tv64, _ = rel_l2(f_tv, f_tv64)
    rel_target, _ = rel_l2(f_target, f_tv)
    checks.info(tag, f"scale: torchvision f32 vs f64 rel L2 {rel_tv64:.2e}; "
                     f"target vs online backbone features rel L2 {rel_target:.2e}")
    checks.report(tag, f"power: target-vs-online distance {rel_target:.2e} > 100 x tol",
                  rel_target > 100 * args.tol)
    checks.info(tag, f"done in {time.time() - t0:.1f} s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=str(REPO / "target" / "release" / "lewel"),
                    help="the lewel binary (default: target/release/lewel)")
    ap.add_argument("--depths", type=int, nargs="+", default=[50, 18], choices=[18, 50],
                    help="ResNet depths to check, full width (default: 50 18)")
    ap.add_argument("--images", type=int, default=4, help="number of images (default 4)")
    ap.add_argument("--size", type=int, default=96, help="image side in px (default 96)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the state and images")
    ap.add_argument("--tol", type=float, default=1e-5,
                    help="relative L2 tolerance of the features (default 1e-5)")
    ap.add_argument("--workdir", default=None,
                    help="parent of the temporary directory (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)

    binary = Path(args.binary)
    if not binary.is_absolute():
        binary = (Path.cwd() / binary).resolve()
    if not binary.exists():
        sys.exit(f"no {binary}: run `cargo build --release` first")
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True).stdout
    for sub in ("export", "embed"):
        if f"  {sub} " not in help_text:
            sys.exit(f"{binary} has no `{sub}` subcommand: rebuild with `cargo build --release`")

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{torch.get_num_threads()} threads; {binary}", flush=True)
    checks = Checks()
    work = Path(tempfile.mkdtemp(prefix="lewel_check_export_", dir=args.workdir))
    try:
        for depth in args.depths:
            try:
                check_depth(depth, args, binary, work, checks)
            except RuntimeError as e:
                checks.report(f"r{depth}", f"error: {e}", False)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{checks.count - checks.failed}/{checks.count} checks passed")
    print("PASS" if checks.failed == 0 else "FAIL")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
