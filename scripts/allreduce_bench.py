#!/usr/bin/env python3
"""Measures, on a multi-GPU machine, the collectives a data-parallel LEWEL step makes, with NCCL
through torch.distributed (a measuring tool only: lewel itself needs no Python).

  torchrun --nproc_per_node=8 scripts/allreduce_bench.py            # one node, 8 GPUs
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
           --rdzv_endpoint=HOST:29500 scripts/allreduce_bench.py    # two nodes

Prints, from rank 0, the time and NCCL's bus bandwidth (algorithm bandwidth x 2(n-1)/n) of:
  - the whole flat f32 gradient buffer of ResNet-50 LEWEL (46,609,472 values, 186.4 MB), in one
    all-reduce and in buckets of 25 MB (the overlap design: one bucket as soon as backward has
    written it);
  - SyncBN's statistics: per BN layer of one online forward (ResNet-50's 53 BN2d and the neck's
    and predictors' BN1d), one all-reduce of 2 x C f32 (sum and sum of squares together);
    LEWEL-B makes this for 2 views, and its backward the same again.
benches/README.md ("all-reduce") says how these numbers turn into scaling efficiency.
"""
import os
import statistics
import time

import torch
import torch.distributed as dist

GRAD_VALUES = 46_609_472  # LEWEL_SPEC 10: online_net + both predictors
BUCKET_BYTES = 25 << 20
# Channels of every BN of one online forward: ResNet-50 (stem, then per bottleneck bn1, bn2,
# bn3 and the downsample BN of each stage's first block), the neck's two BN1d(4096), the two
# predictors' BN1d(4096).
RESNET50_BN = [64]
for width, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
    for b in range(blocks):
        RESNET50_BN += [width, width, 4 * width] + ([4 * width] if b == 0 else [])
BN_CHANNELS = RESNET50_BN + [4096, 4096, 4096, 4096]


def timed(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    grads = torch.randn(GRAD_VALUES, device="cuda")
    factor = 2 * (world - 1) / world
    rows = []

    def report(name, seconds, nbytes):
        bus = nbytes * factor / seconds / 1e9 if world > 1 else float("nan")
        rows.append(f"{name:<44} {seconds * 1e3:9.3f} ms  busbw {bus:7.1f} GB/s")

    nbytes = grads.numel() * 4
    report("gradients, one all-reduce (186.4 MB f32)", timed(lambda: dist.all_reduce(grads), 20), nbytes)
    per = BUCKET_BYTES // 4
    buckets = list(grads.split(per))
    report(
        f"gradients, {len(buckets)} buckets of 25 MB",
        timed(lambda: [dist.all_reduce(b) for b in buckets], 20),
        nbytes,
    )
    stats = [torch.randn(2 * c, device="cuda") for c in BN_CHANNELS]
    t = timed(lambda: [dist.all_reduce(s) for s in stats], 20)
    rows.append(
        f"SyncBN statistics, {len(stats)} all-reduces of 2C f32      {t * 1e3:9.3f} ms"
        f"  ({t / len(stats) * 1e6:.1f} us each; x2 views x2 fwd/bwd = {4 * t * 1e3:.2f} ms a step)"
    )
    if rank == 0:
        name = torch.cuda.get_device_name()
        print(f"{world} ranks ({name}), NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
        print("\n".join(rows))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
