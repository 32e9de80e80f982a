#!/usr/bin/env python3
"""Times whole training steps of the official LEWEL code (LayneH/LEWEL, commit 4ee47eb) itself.

The official code is CC-BY-NC-4.0 and none of it is in this file: the user's checkout goes on
sys.path at run time and this driver imports its modules and calls them. It builds what their
main.py builds for the LEWEL-B EMAN script (scripts/run_lewelb_eman.sh): their argument parser
given that script's flags, their model class (models/lewel.py, LEWELB_EMAN with their
resnet50_encoder, BatchNorm, 4 heads, scale 1, loss weight 0.5, m 0.98), their parameter groups
(main.py's collect_params) and LARS (utils/LARS.py), wrapped in DistributedDataParallel over a
one-process group (gloo on the CPU, nccl on a GPU) as their main.py wraps it. Then it runs their
own training loop, main.py's train(): each step is their forward of both views through the online
and target nets and their loss, zero_grad, backward, LARS step and EMAN target update
(momentum_update). The loader it is given yields the same two random views every step (drawn
once, as bench_step.py and `lewel bench` do) and marks the time between steps, so each step is
timed from a synchronized device to a synchronized device with no data time.

Differences from their run, for a benchmark: the learning rate is 1e-3 without their warm-up ramp
(as `lewel bench` and bench_step.py; the weights stay near their init, so no step meets NaNs or
denormals), one process, and the batch is what --batch says. --method lewel-b builds their LEWELB
with SyncBN, wd/m of scripts/srun_lewelb.sh; on the CPU without DDP, which refuses SyncBN there
(SyncBN without a process group is plain batch norm, what it computes over one rank).

  python3 tests/parity/bench_official.py --official /path/to/LEWEL --arch resnet50 \\
      --batch 16 --size 64 --steps 5 --json

prints one JSON line with the keys bench_step.py prints ("median_s", "step_s", ...) and the
parameter counts of their networks and the forward passes of one step, for comparing the work
with `lewel bench` and bench_step.py. --check only imports their code and checks the options.
Exit status 2 with one line on stdout: this configuration cannot run with the official code
(e.g. --arch tiny, which their backbone module does not have).
"""

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch

# Our arch names and their backbone factory (backbone/resnet.py). Our `tiny` (ResNet-50 at 1/8
# width, 512/32 heads) has no counterpart there.
ARCHS = {"resnet50": "resnet50_encoder", "resnet18": "resnet18_encoder"}
# Our method names: (their --arch, --norm, --enc-m, --wd) from scripts/run_lewelb_eman.sh and
# scripts/srun_lewelb.sh.
METHODS = {
    "lewel-b-eman": ("LEWELB_EMAN", "None", "0.98", "0.0000015"),
    "lewel-b": ("LEWELB", "SyncBN", "0.996", "0.000001"),
}


class Unsupported(Exception):
    """This configuration cannot be timed with the official code (exit 2, one line)."""


def import_official(root):
    """Their main.py as a module (its parser, collect_params, train) and what it imports."""
    root = os.path.abspath(root)
    for f in ("main.py", "models/lewel.py", "utils/LARS.py", "backbone/resnet.py"):
        if not os.path.isfile(os.path.join(root, f)):
            raise SystemExit(f"bench_official: {root} is not a LEWEL checkout (no {f})")
    sys.path.insert(0, root)
    # engine.py imports faiss for the kNN monitor, which a training step never calls.
    try:
        import faiss  # noqa: F401
    except ImportError:
        sys.modules["faiss"] = types.ModuleType("faiss")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import main as official_main  # their main.py: the parser is built, nothing runs
    except ImportError as e:
        raise SystemExit(f"bench_official: importing {root}/main.py: {e} (their data modules "
                         f"need torchvision, numpy and PIL in this Python)")
    if not hasattr(official_main, "train") or not hasattr(official_main, "collect_params"):
        raise SystemExit(f"bench_official: {root}/main.py has no train/collect_params")
    return official_main


def official_commit(root):
    """The checkout's commit when it is a git work tree of its own (not a folder in another)."""
    def git(*cmd):
        r = subprocess.run(["git", "-C", root, *cmd], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else ""
    try:
        top = git("rev-parse", "--show-toplevel")
        if top and os.path.realpath(top) == os.path.realpath(root):
            return git("rev-parse", "--short", "HEAD") or None
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def their_args(om, a, batch):
    """Their parsed arguments: their script's flags, then ours (backbone, batch, lr)."""
    arch, norm, enc_m, wd = METHODS[a.method]
    flags = ["--arch", arch, "--backbone", ARCHS[a.arch], "--dataset", "im_folder",
             "--lr", repr(a.lr), "-b", str(batch), "--wd", wd, "--enc-m", enc_m,
             "--epochs", "200", "--cos", "--warmup-epoch", "0", "--lewel-l2-norm",
             "--lewel-scale", "1.0", "--lewel-num-heads", "4", "--lewel-loss-weight", "0.5",
             "--norm", norm, "--print-freq", str(1 << 30)]
    if a.amp or a.bf16:
        flags.append("--amp")
    return om.parser.parse_args(flags)


def count(params):
    return sum(p.numel() for p in params)


def init_group(dev, folder):
    """A one-process group, as their dist_init would give with world size 1."""
    import torch.distributed as dist
    backend = "nccl" if dev.type == "cuda" and dist.is_nccl_available() else "gloo"
    store = os.path.join(folder, "store")
    dist.init_process_group(backend, init_method="file://" + store, rank=0, world_size=1)
    return backend


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="a checkout of github.com/LayneH/LEWEL")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--method", default="lewel-b-eman", choices=sorted(METHODS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true",
                    help="their --amp path (autocast + GradScaler) with autocast in bf16 (GPU)")
    ap.add_argument("--amp", action="store_true",
                    help="their --amp path as their scripts run it: fp16 autocast, GradScaler")
    ap.add_argument("--channels-last", action="store_true",
                    help="model and views NHWC (their code does not do this itself)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--no-ddp", action="store_true",
                    help="do not wrap in DistributedDataParallel (their main.py always does)")
    ap.add_argument("--check", action="store_true",
                    help="only import their code and check the options, then exit")
    ap.add_argument("--verbose", action="store_true", help="their prints on stderr")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    try:
        return run(a)
    except Unsupported as e:
        print(f"official: {e}", flush=True)
        return 2


def run(a):
    if a.arch not in ARCHS:
        raise Unsupported(
            f"--arch {a.arch} is not in the official backbone module (backbone/resnet.py has "
            f"resnet18/34/50/101_encoder and resnet50w2x_encoder; this driver maps resnet50 and "
            f"resnet18), so the official column is skipped")
    dev = torch.device(a.device)
    if (a.amp or a.bf16) and dev.type != "cuda":
        raise Unsupported("their --amp path is CUDA-only (torch.cuda.amp autocast and GradScaler); "
                          "on the CPU the official step runs in float32 without --amp/--bf16")
    if a.amp and a.bf16:
        raise SystemExit("bench_official: --amp (fp16) or --bf16, not both")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench_official: --device {a.device}: this torch sees no CUDA device")
    if a.batch < 2 or a.size < 1 or a.steps < 1 or a.warmup < 0:
        raise SystemExit("bench_official: --batch at least 2, --size and --steps at least 1")
    om = import_official(a.official)
    if ARCHS[a.arch] not in om.backbone_models.__dict__:
        raise Unsupported(f"this checkout's backbone module has no {ARCHS[a.arch]}")
    if a.check:
        print(json.dumps({"official": os.path.abspath(a.official), "ok": True}))
        return 0

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if dev.type == "cuda":
        if dev.index is not None:
            torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # their main.py sets it
    quiet = sys.stderr if a.verbose else open(os.devnull, "w")
    args = their_args(om, a, a.batch)
    # their main(): args.gpu = local rank (None here on the CPU: their loop then moves nothing)
    args.gpu = dev.index if dev.type == "cuda" else None
    if dev.type == "cuda" and args.gpu is None:
        args.gpu = torch.cuda.current_device()
    if a.bf16:
        # Their loop enters torch.cuda.amp.autocast() (fp16); with --bf16 the same call in bf16,
        # the precision bench_step.py and lewel run on a GPU.
        torch.cuda.amp.autocast = functools.partial(torch.cuda.amp.autocast, dtype=torch.bfloat16)

    with contextlib.redirect_stdout(quiet):
        model = om.get_lewel_model(args.arch)(
            om.backbone_models.__dict__[args.backbone],
            dim=args.proj_dim, m=args.enc_m, hid_dim=args.hid_dim,
            norm_layer=om.get_norm(args.norm), num_neck_mlp=args.num_neck_mlp,
            scale=args.lewel_scale, l2_norm=args.lewel_l2_norm,
            num_heads=args.lewel_num_heads, loss_weight=args.lewel_loss_weight)
    core = model
    params = {
        "online_net": count(core.online_net.parameters()),
        "target_net": count(core.target_net.parameters()),
        "predictors": count(core.predictor.parameters()) + count(core.predictor_obj.parameters()),
        "trainable": count(p for p in core.parameters() if p.requires_grad),
        "total": count(core.parameters()),
    }
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    model = model.to(dev).to(memory_format=fmt)
    backend = None
    note = None
    use_ddp = not a.no_ddp
    if use_ddp and args.norm == "SyncBN" and dev.type != "cuda":
        # DDP refuses SyncBatchNorm on CPU modules; without a group SyncBN is plain batch norm,
        # which is what it computes over one rank.
        use_ddp = False
        note = "lewel-b on the CPU: no DDP (it refuses SyncBN off the GPU); SyncBN runs as BN"
        print(f"bench_official: note: {note}", file=sys.stderr)
    store = tempfile.TemporaryDirectory(prefix="bench_official_")
    if use_ddp:
        backend = init_group(dev, store.name)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if dev.type == "cuda" else None)
    with contextlib.redirect_stdout(quiet):
        groups = om.collect_params(model, exclude_bias_and_bn=True, sync_bn="EMAN" in args.arch)
    optimizer = om.LARS(groups, lr=args.lr, momentum=args.momentum,
                        weight_decay=args.weight_decay)
    scaler = torch.cuda.amp.GradScaler() if args.amp else None

    v1 = torch.randn(a.batch, 3, a.size, a.size, device=dev).to(memory_format=fmt)
    v2 = torch.randn(a.batch, 3, a.size, a.size, device=dev).to(memory_format=fmt)
    idx = torch.arange(a.batch, device=dev)

    # Forward passes of the first step, counted with hooks that are gone after it.
    forwards = {"online_backbone": 0, "target_backbone": 0, "predictor": 0, "predictor_obj": 0}
    hooks = []
    for key, mod in (("online_backbone", core.online_net.backbone),
                     ("target_backbone", core.target_net.backbone),
                     ("predictor", core.predictor), ("predictor_obj", core.predictor_obj)):
        def hook(_m, _i, _o, key=key):
            forwards[key] += 1
        hooks.append(mod.register_forward_hook(hook))
    last = {}
    core.register_forward_hook(lambda _m, _i, out: last.__setitem__("loss", out.detach()))

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n = a.warmup + a.steps
    marks = []

    class Views:
        """Their loop's loader: the same two views each step, the time marked between steps."""

        def __len__(self):
            return n

        def __iter__(self):
            for k in range(n):
                if k == 1:
                    for h in hooks:
                        h.remove()
                sync()
                marks.append(time.perf_counter())
                yield [v1, v2], None, idx
            sync()
            marks.append(time.perf_counter())

    with contextlib.redirect_stdout(quiet):
        om.train(Views(), model, optimizer, scaler, 0, args)
    if backend is not None:
        torch.distributed.destroy_process_group()
    store.cleanup()
    if n == 1:
        for h in hooks:
            h.remove()
    times = [marks[k + 1] - marks[k] for k in range(a.warmup, n)]
    med = statistics.median(times)
    loss = float(last["loss"])
    commit = official_commit(a.official)
    out = {
        "engine": f"official LEWEL {commit or 'checkout'} on pytorch {torch.__version__}",
        "official": os.path.abspath(a.official),
        "model": f"{args.arch} {args.backbone} norm {args.norm}",
        "device": a.device,
        "threads": torch.get_num_threads(),
        "arch": a.arch,
        "method": a.method,
        "batch": a.batch,
        "size": a.size,
        "channels_last": a.channels_last,
        "bf16": a.bf16,
        "amp": "bf16" if a.bf16 else ("fp16" if a.amp else None),
        "ddp": backend,
        "lr": args.lr,
        "step_s": times,
        "median_s": med,
        "images_per_s": a.batch / med,
        "loss": loss,
        "params": params,
        "forwards": forwards,
    }
    if note:
        out["note"] = note
    if a.json:
        print(json.dumps(out))
    else:
        print(f"official {a.arch} {a.method} batch {a.batch} x {a.size} px: median step "
              f"{med:.3f} s (min {min(times):.3f}, max {max(times):.3f}), "
              f"{a.batch / med:.2f} images/s | params {params} | forwards of a step {forwards}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
