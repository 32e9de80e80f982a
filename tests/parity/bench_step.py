#!/usr/bin/env python3
"""Times whole LEWEL training steps in PyTorch: the same configuration `lewel bench` runs.

The model is our independent formulation (lewel_reference.py, written from LEWEL_SPEC.md), here
in float32 (or bf16 autocast on a GPU): online forward of both views, target forward without
gradients, the two-direction loss, backward, LARS with its exclusions, and the EMA (EMAN copies
the BN statistics too). The views are random normal images of the given size; the weights are
the reference's init.

  python3 tests/parity/bench_step.py --arch resnet50 --batch 16 --size 64 --steps 5 --json

prints one JSON line: {"step_s": [...], "median_s": ..., "images_per_s": ..., ...} where an image
is one sample of the batch (its two views together), as `lewel bench` counts.  --channels-last
stores activations NHWC (oneDNN's preferred layout on the CPU, tensor cores' on the GPU).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lewel_reference as ref  # noqa: E402

ARCHS = {"resnet50": (50, 1), "resnet18": (18, 1), "tiny": (50, 8)}


@torch.no_grad()
def lars_ema(model, method, lr, wd, eta, mu, m, bufs):
    for name, p in model.trainable():
        g = p.grad
        if ref.lars_excluded(name, method, "current"):
            u = lr * g
        else:
            pn = torch.linalg.vector_norm(p)
            gn = torch.linalg.vector_norm(g)
            tau = torch.where(pn > 0, eta * pn / (gn + wd * pn), torch.zeros_like(pn))
            u = (lr * tau) * (g + wd * p)
        b = bufs.get(name)
        if b is None:
            bufs[name] = b = u.clone()
        else:
            b.mul_(mu).add_(u)
        p.sub_(b)
    on = model.online_net.state_dict()
    tg = model.target_net.state_dict()
    for k, t in tg.items():
        if t.is_floating_point():
            t.mul_(m).add_(on[k], alpha=1.0 - m)
        elif method == "lewel-b-eman":
            t.copy_(on[k])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50", choices=sorted(ARCHS))
    ap.add_argument("--method", default="lewel-b-eman", choices=ref.METHODS)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="autocast to bf16 (GPU)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    depth, div = ARCHS[a.arch]
    dev = torch.device(a.device)
    model = ref.LEWEL(depth, div).to(dev)
    model.target_net.load_state_dict(model.online_net.state_dict())
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    v1 = torch.randn(a.batch, 3, a.size, a.size, device=dev).to(memory_format=fmt)
    v2 = torch.randn(a.batch, 3, a.size, a.size, device=dev).to(memory_format=fmt)
    bufs = {}
    times = []
    loss = None
    for s in range(a.warmup + a.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _, p in model.trainable():
            p.grad = None
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            loss = ref.forward_loss(model, v1, v2, a.method, 0.5)
        loss.backward()
        lars_ema(model, a.method, 1e-3, 1e-6, 0.001, 0.9, 0.99, bufs)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if s >= a.warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    out = {
        "engine": "pytorch " + torch.__version__,
        "device": a.device,
        "threads": torch.get_num_threads(),
        "arch": a.arch,
        "method": a.method,
        "batch": a.batch,
        "size": a.size,
        "channels_last": a.channels_last,
        "bf16": a.bf16,
        "step_s": times,
        "median_s": med,
        "images_per_s": a.batch / med,
        "loss": float(loss.detach()),
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(f"pytorch {a.arch} {a.method} batch {a.batch} x {a.size} px: median step "
              f"{med:.3f} s (min {min(times):.3f}, max {max(times):.3f}), "
              f"{a.batch / med:.2f} images/s")


if __name__ == "__main__":
    main()
