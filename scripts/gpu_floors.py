#!/usr/bin/env python3
"""Per-op floors of one LEWEL training step on a GPU: FLOPs and bytes by op kind, per image.

Counts ResNet-50 LEWEL (the official sizes: hid 4096, dim 256, 4 heads) at a given image size from
the shapes that a forward of our PyTorch formulation (tests/parity/lewel_reference.py) passes
through each layer, then multiplies by what one training step runs per image (one sample, its two
views): the online network forward and backward on both views, the target network forward on both
views, the predictors forward and backward on the online side only; LARS and the EMA over the
parameters once. Bytes are the minimal traffic of the ops as lewel's CUDA path runs them today
(each input read and each output written once per pass; activations in bf16, parameters,
gradients and optimizer state in f32): the floor of the op as built, not of a fused design.

  python3 scripts/gpu_floors.py [--size 224] [--batch 128] [--tflops 790] [--tbps 4.3] [--method lewel-b-eman]

prints a markdown table: per kind, GFLOP and GB per image per step, the time floor per image at the
given peak FLOP/s and bandwidth (per layer and pass the larger of FLOPs/peak and bytes/bandwidth,
summed over the kind's layers), which of the two dominates, how much of the floor the FLOPs alone
explain, and the share of the summed floors; then the step floor in images/s.
"""

import argparse
import os
import sys
from collections import defaultdict

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "parity"))
import lewel_reference as ref  # noqa: E402

ACT = 2  # bytes per activation element (bf16)
F32 = 4


def trace(module, x):
    """(kind, name, in_shape, out_shape, module) for every leaf op of one forward, in order."""
    rows = []
    hooks = []
    for name, m in module.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.BatchNorm2d, nn.BatchNorm1d, nn.MaxPool2d)):
            def hook(m, inp, out, name=name):
                rows.append((type(m).__name__, name, tuple(inp[0].shape), tuple(out.shape), m))
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        module(x)
    for h in hooks:
        h.remove()
    return rows


def numel(s):
    n = 1
    for d in s:
        n *= d
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--tflops", type=float, default=790.0, help="dense bf16 peak reached by GEMMs")
    ap.add_argument("--tbps", type=float, default=4.3, help="HBM bandwidth reached by copies")
    ap.add_argument("--method", default="lewel-b-eman", choices=ref.METHODS)
    ap.add_argument("--batch", type=int, default=128, help="per-GPU batch (weights are read once per batch)")
    a = ap.parse_args()

    model = ref.LEWEL(50, 1).eval()
    x = torch.zeros(2, 3, a.size, a.size)  # batch 2 (BN1d over one column needs two values)
    enc = trace(model.online_net, x)
    z = torch.zeros(2, 256, 1)
    o = torch.zeros(2, 256, 256 // 4)
    pred = trace(model.predictor, z) + trace(model.predictor_obj, o)

    flops = defaultdict(float)
    bytes_ = defaultdict(float)
    floor = defaultdict(float)  # per layer the larger of its two floors, summed
    eman = a.method == "lewel-b-eman"
    peak_f, peak_b = a.tflops * 1e12, a.tbps * 1e12

    def add(kind, f, b, per=2):
        f, b = f / per, b / per  # the traced batch is 2: per image
        flops[kind] += f
        bytes_[kind] += b
        floor[kind] += max(f / peak_f, b / peak_b)

    def pass_costs(rows, online, target):
        """online: views through the online side (forward + backward); target: views forward."""
        for cls, name, ins, outs, m in rows:
            e_in, e_out = numel(ins), numel(outs)
            if cls in ("Conv2d", "Conv1d"):
                w = m.weight.numel() * 2 / a.batch  # once per batch; add() divides by the traced 2
                macs = e_out * m.weight.numel() // m.out_channels
                fwd_b = (e_in + e_out) * ACT + w * ACT
                first = name.endswith("backbone.conv1")
                add("conv / linear (GEMM) forward", 2 * macs * (online + target), fwd_b * (online + target))
                # data gradient (not for the stem: its input needs none) and weight gradient
                dx_f = 0 if first else 2 * macs
                dx_b = 0 if first else (e_out + e_in) * ACT + w * ACT
                dw_b = (e_in + e_out) * ACT + w * F32
                add("conv / linear (GEMM) backward", (dx_f + 2 * macs) * online, (dx_b + dw_b) * online)
            elif cls in ("BatchNorm2d", "BatchNorm1d"):
                # forward: two statistics passes and the apply (read x three times, write y), the
                # residual read where a block ends; backward: two passes over x, dy and the ReLU's
                # output, dx written (and the residual's gradient read and written).
                res = name.endswith("bn3") or name.endswith("downsample.1")
                f_b = (4 + (1 if res else 0)) * e_in * ACT
                t_b = f_b if not eman else (2 + (1 if res else 0)) * e_in * ACT
                add("batchnorm (+ReLU, +add) forward", 8 * e_in * (online + target), f_b * online + t_b * target)
                add("batchnorm (+ReLU, +add) backward", 12 * e_in * online, (7 + (2 if res else 0)) * e_in * ACT * online)
            elif cls == "MaxPool2d":
                add("max pool", 9 * e_out * (online + target), ((e_in + 2 * e_out) * ACT) * (online + target) + (e_out * 2 + e_in) * ACT * online)

    pass_costs(enc, online=2, target=2)
    pass_costs(pred, online=2, target=0)

    # The neck's aggregation (a batched matmul per view over the last map's positions; its softmax
    # and normalization are small): forward on 2 online + 2 target views, backward (two products)
    # on 2 online views. The loss is tiny.
    c, hw, k = 2048, (a.size // 32) ** 2, 64
    agg_f, agg_b = 2 * c * hw * k, (c * hw + 256 * hw + c * k) * ACT
    add("neck aggregation (bmm)", agg_f * (2 + 2 + 2 * 2), agg_b * (2 + 2 + 2 * 2), per=1)

    params = sum(p.numel() for _, p in model.trainable())
    target_state = sum(t.numel() for t in model.target_net.state_dict().values())
    # LARS: read p, g, m; write p, m. EMA: read target and online, write target. Per step, not per
    # image: spread over the per-GPU batch below.
    opt_bytes = params * F32 * 5 + target_state * F32 * 3

    rows = []
    for kind in flops:
        tf, tb = flops[kind] / peak_f, bytes_[kind] / peak_b
        # bound: which floor dominates the kind's summed per-layer floors
        rows.append((kind, flops[kind], bytes_[kind], floor[kind], "compute" if tf >= tb else "memory",
                     100 * tf / floor[kind]))
    rows.sort(key=lambda r: -r[3])
    total_t = sum(r[3] for r in rows)
    total_f = sum(r[1] for r in rows)
    print(f"ResNet-50 {a.method}, {a.size} px, per image per step at {a.batch} images per GPU; "
          f"peaks {a.tflops:g} TFLOP/s, {a.tbps:g} TB/s\n")
    print("| op kind | GFLOP | GB | floor us | mostly | FLOP floor / floor | share |")
    print("|---|---|---|---|---|---|---|")
    for kind, f, b, t, bound, cf in rows:
        print(f"| {kind} | {f / 1e9:.2f} | {b / 1e9:.3f} | {t * 1e6:.1f} | {bound} | {cf:.0f}% | {100 * t / total_t:.0f}% |")
    print(f"| **sum** | **{total_f / 1e9:.1f}** | **{sum(r[2] for r in rows) / 1e9:.2f}** | **{total_t * 1e6:.1f}** | | | |")
    for batch in (a.batch,):
        ot = opt_bytes / (a.tbps * 1e12)
        print(f"\nper-GPU batch {batch}: optimizer (LARS + EMA) {opt_bytes / 1e9:.2f} GB a step = {ot * 1e3:.2f} ms, "
              f"{ot / batch * 1e6:.1f} us an image; step floor {batch * total_t * 1e3 + ot * 1e3:.1f} ms = "
              f"{batch / (batch * total_t + ot):.0f} images/s")


if __name__ == "__main__":
    main()
