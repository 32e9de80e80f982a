"""One row per run folder from its metrics.jsonl: steps, the median step time and data wait (after
the first 3 steps, which hold cuDNN's algorithm search and the loader's start), the median images
per second, the samples skipped, the loss and the kNN accuracy from first to last, device memory.

    python3 scripts/metrics_summary.py RUN_DIR...
"""

import json
import os
import statistics
import sys


def row(d):
    path = os.path.join(d, "metrics.jsonl")
    if not os.path.exists(path):
        return f"| {os.path.basename(d)} | no metrics.jsonl |"
    steps, knn = [], []
    with open(path) as f:
        for line in f:
            m = json.loads(line)
            if "step" in m:
                steps.append(m)
            elif m.get("knn_acc") is not None:
                knn.append(m["knn_acc"])
    if not steps:
        return f"| {os.path.basename(d)} | no steps |"
    late = steps[3:] or steps
    med = lambda k: statistics.median(s[k] for s in late)
    mib = max((s.get("device_mib") or 0) for s in steps)
    acc = f"{knn[0]:.1f} -> {knn[-1]:.1f}" if knn else "-"
    return (
        f"| {os.path.basename(d)} | {len(steps)} | {med('ms'):.1f} | {med('data_ms'):.1f} | "
        f"{med('img_per_s'):.0f} | {steps[-1]['skipped']} | "
        f"{steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f} | {acc} | {mib} |"
    )


print("| run | steps | median ms | median data ms | img/s | skipped | loss | kNN % | device MiB |")
print("|---|---|---|---|---|---|---|---|---|")
for d in sys.argv[1:]:
    print(row(d))
