#!/usr/bin/env python3
"""Check `lewel export --format detectron2` and configs/detectron2/ from Python.

CI does not run this; the Rust tests (tests/detectron2.rs) check the same file structurally
without Python. This script adds what only Python and detectron2 can say:

 1. A full-width ResNet-50 backbone in torchvision names with random values (numpy only; or
    --checkpoint RUN for a real run) is exported by `lewel export --format detectron2`.
 2. The .pkl loads with pickle.load and with pickle.load(f, encoding="latin1") (detectron2's
    call), every warning an error (numpy 2 must resolve numpy.core quietly): a dict with
    'model', '__author__' and 'matching_heuristics' True, every value a C-contiguous, writeable
    float32 numpy array. Its opcodes are of protocol 2 at most (pickletools).
 3. Each array equals, bit for bit, the torchvision tensor renamed by the rules of detectron2's
    tools/convert-torchvision-to-d2.py, and nothing else is in the file.
 4. Every config in configs/detectron2/ loads with PyYAML through its _BASE_ chain.
 5. Only where torch and detectron2 import (a source checkout on PYTHONPATH is enough: nothing
    used here needs detectron2's compiled ops): each mask_rcnn_* config is merged into
    detectron2's get_cfg() (a key detectron2 lacks, or a value of the wrong type, fails here), the
    model is built on the CPU, DetectionCheckpointer loads the .pkl, and every array of the .pkl
    is the model's tensor of that name (res5 under roi_heads in C4, the backbone under
    backbone.bottom_up in FPN). Then the model's own ResNet (eval mode) runs on fixed random
    normalized images and its pooled res5 features are compared with `lewel embed` on the
    torchvision file (relative error at most --tol), and one image goes through the whole
    detector in eval mode.

It prints one line per check (PASS, FAIL or SKIP) and a final PASS or FAIL; the exit status is
non-zero if anything failed. From the repository root, after `cargo build --release`:

    python3 tests/parity/check_detectron2.py
    python3 tests/parity/check_detectron2.py --checkpoint runs/lewel   # a real run instead

It needs numpy and PyYAML; torch and detectron2 for step 5.
"""

import argparse
import json
import pickle
import pickletools
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "detectron2"
LEAVES = ["mask_rcnn_R_50_C4_1x.yaml", "mask_rcnn_R_50_C4_2x.yaml",
          "mask_rcnn_R_50_FPN_1x.yaml", "mask_rcnn_R_50_FPN_2x.yaml"]
FAILED = []


def report(ok, what):
    print(("PASS " if ok else "FAIL ") + what)
    if not ok:
        FAILED.append(what)


# ---------------------------------------------------------------------------------------------
# safetensors without the safetensors package

def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        dt = {np.dtype("<f4"): "F32", np.dtype("<i8"): "I64"}[a.dtype]
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_safetensors(path):
    with open(path, "rb") as f:
        b = f.read()
    n = struct.unpack("<Q", b[:8])[0]
    out = {}
    for name, h in json.loads(b[8:8 + n]).items():
        if name == "__metadata__":
            continue
        s, e = h["data_offsets"]
        dt = {"F32": "<f4", "I64": "<i8"}[h["dtype"]]
        out[name] = np.frombuffer(b[8 + n + s:8 + n + e], dt).reshape(h["shape"])
    return out


# ---------------------------------------------------------------------------------------------
# A torchvision ResNet-50 backbone, and the converter's renaming

def random_resnet50(seed):
    """Every tensor of torchvision's resnet50 but fc, random but sane (eval BN keeps scale)."""
    r = np.random.default_rng(seed)
    t = {}

    def conv(name, o, i, k):
        t[name + ".weight"] = (r.standard_normal((o, i, k, k)) * np.sqrt(2 / (o * k * k))).astype("<f4")

    def bn(name, c):
        t[name + ".weight"] = (1 + 0.1 * r.standard_normal(c)).astype("<f4")
        t[name + ".bias"] = (0.1 * r.standard_normal(c)).astype("<f4")
        t[name + ".running_mean"] = (0.1 * r.standard_normal(c)).astype("<f4")
        t[name + ".running_var"] = r.uniform(0.5, 1.5, c).astype("<f4")
        t[name + ".num_batches_tracked"] = np.array(7, "<i8")

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    c_in = 64
    for li, n in enumerate([3, 4, 6, 3]):
        w = 64 << li
        for b in range(n):
            p = f"layer{li + 1}.{b}."
            conv(p + "conv1", w, c_in, 1); bn(p + "bn1", w)
            conv(p + "conv2", w, w, 3); bn(p + "bn2", w)
            conv(p + "conv3", 4 * w, w, 1); bn(p + "bn3", 4 * w)
            if b == 0:
                conv(p + "downsample.0", 4 * w, c_in, 1); bn(p + "downsample.1", 4 * w)
            c_in = 4 * w
    return t


def converter_name(k):
    """The renaming rules of detectron2's tools/convert-torchvision-to-d2.py."""
    if "layer" not in k:
        k = "stem." + k
    for t in (1, 2, 3, 4):
        k = k.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        k = k.replace(f"bn{t}", f"conv{t}.norm")
    return k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


# ---------------------------------------------------------------------------------------------
# Checks

def check_pickle(pkl, torchvision):
    raw = pkl.read_bytes()
    proto = max(op.proto for op, _, _ in pickletools.genops(raw))
    report(proto <= 2, f"pickle opcodes are protocol {proto} at most 2 ({len(raw) / 1e6:.1f} MB)")
    loaded = None
    for enc in (None, "latin1"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with open(pkl, "rb") as f:
                d = pickle.load(f) if enc is None else pickle.load(f, encoding=enc)
        ok = (list(d) == ["model", "__author__", "matching_heuristics"]
              and d["__author__"] == "lewel" and d["matching_heuristics"] is True
              and all(type(v) is np.ndarray and v.dtype == np.float32 and v.flags.c_contiguous
                      and v.flags.writeable for v in d["model"].values()))
        report(ok, f"pickle.load(encoding={enc!r}) under numpy {np.__version__}: "
                   f"{len(d['model'])} writeable float32 arrays, author and heuristics set")
        loaded = d["model"]
    want = {converter_name(k): v for k, v in torchvision.items()
            if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    same = set(want) == set(loaded) and all(
        want[k].shape == loaded[k].shape
        and np.array_equal(want[k].view(np.uint32), loaded[k].view(np.uint32)) for k in want)
    report(same, f"{len(loaded)} arrays are the torchvision tensors under the converter's names, "
                 "bit for bit, and nothing else")
    return loaded


def load_yaml_with_base(path):
    """As fvcore's CfgNode.load_yaml_with_base: _BASE_ relative to the file, dicts merged."""
    with open(path) as f:
        cfg = yaml.safe_load(f)
    base = cfg.pop("_BASE_", None)
    if base is None:
        return cfg
    merged = load_yaml_with_base(path.parent / base)

    def merge(a, b):
        for k, v in a.items():
            if isinstance(v, dict) and isinstance(b.get(k), dict):
                merge(v, b[k])
            else:
                b[k] = v
    merge(cfg, merged)
    return merged


def check_yaml():
    for f in sorted(CONFIGS.glob("*.yaml")):
        try:
            c = load_yaml_with_base(f)
            ok = (isinstance(c["SOLVER"]["BASE_LR"], float)
                  and isinstance(c["SOLVER"]["WEIGHT_DECAY"], float)
                  and all(isinstance(x, float) for x in c["MODEL"]["PIXEL_MEAN"] + c["MODEL"]["PIXEL_STD"]))
            report(ok, f"PyYAML loads {f.name} with its bases (floats are floats)")
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            report(False, f"PyYAML loads {f.name}: {e}")


def check_detectron2(lewel, tmp, pkl, torchvision_file, loaded, tol):
    try:
        import torch
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model
    except ImportError as e:
        print(f"SKIP detectron2 checks: {e}")
        return
    torch.manual_seed(0)
    images = torch.randn(2, 3, 96, 128)
    write_safetensors(tmp / "images.safetensors", {"images": images.numpy().astype("<f4")})
    subprocess.run([str(lewel), "embed", "--checkpoint", str(torchvision_file), "--images",
                    str(tmp / "images.safetensors"), "--out", str(tmp / "feats.safetensors")],
                   check=True, capture_output=True)
    ours = torch.from_numpy(read_safetensors(tmp / "feats.safetensors")["features"].copy())
    for leaf in LEAVES:
        cfg = get_cfg()
        cfg.merge_from_file(str(CONFIGS / leaf))
        cfg.MODEL.WEIGHTS = str(pkl)
        cfg.MODEL.DEVICE = "cpu"
        report(True, f"{leaf}: detectron2 merges it into get_cfg()")
        model = build_model(cfg)
        DetectionCheckpointer(model).load(str(pkl))
        sd = model.state_dict()
        used, bad = {}, []
        for key, v in sd.items():
            for n in loaded:
                if key == n or key.endswith("." + n):
                    used[n] = used.get(n, 0) + 1
                    if not torch.equal(v.cpu(), torch.from_numpy(loaded[n])):
                        bad.append(key)
        report(not bad and len(used) == len(loaded) and set(used.values()) == {1},
               f"{leaf}: every array of the .pkl is loaded into exactly one model tensor "
               f"({len(used)} of {len(loaded)}; {len(bad)} differ)")
        model.eval()
        with torch.no_grad():
            if "FPN" in leaf:
                res5 = model.backbone.bottom_up(images)["res5"]
            else:
                res5 = model.roi_heads.res5(model.backbone(images)["res4"])
            theirs = res5.mean(dim=(2, 3))
            err = ((theirs - ours).norm() / theirs.norm()).item()
            report(err <= tol, f"{leaf}: detectron2's ResNet (eval) vs lewel embed, pooled res5: "
                               f"relative error {err:.2e} (tol {tol:.0e})")
            out = model([{"image": torch.rand(3, 160, 224) * 255}])
            report("instances" in out[0], f"{leaf}: one image through the whole detector (eval, CPU)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lewel", default=str(REPO / "target" / "release" / "lewel"))
    ap.add_argument("--checkpoint", help="a run folder or state to export instead of a random ResNet-50")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lewel-d2-"))
    try:
        if a.checkpoint:
            tv = tmp / "backbone.safetensors"
            subprocess.run([a.lewel, "export", "--checkpoint", a.checkpoint, "--out", str(tv)], check=True)
        else:
            tv = tmp / "resnet50.safetensors"
            write_safetensors(tv, random_resnet50(0))
        pkl = tmp / "model.pkl"
        r = subprocess.run([a.lewel, "export", "--checkpoint", str(tv), "--format", "detectron2",
                            "--out", str(pkl)], capture_output=True, text=True)
        report(r.returncode == 0, f"lewel export --format detectron2: {r.stdout.strip()}{r.stderr.strip()}")
        if r.returncode == 0:
            loaded = check_pickle(pkl, read_safetensors(tv))
            check_yaml()
            check_detectron2(a.lewel, tmp, pkl, tv, loaded, a.tol)
    finally:
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("FAIL" if FAILED else "PASS")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
