#!/usr/bin/env python3
"""PyTorch-written checkpoints for `lewel import` (read by tests/import.rs).

Regenerate from the crate root with:

    python3 tests/parity/make_import_fixtures.py

Needs `torch` (2.x, CPU is enough), `numpy` and the `safetensors` Python package. Written from our
own specification (LEWEL_SPEC sections 1-4, 6 and 8), not from the official code. It writes, under
tests/fixtures/import/ (about 3.1 MB in all):

  lewel_checkpoint.pth.tar  the official checkpoint layout (LEWEL_SPEC 6), torch.save zip format:
                            'epoch' 3, 'arch' 'LEWELB_EMAN', 'state_dict' of a DDP-wrapped LEWEL
                            model (module.online_net.*, module.target_net.*, module.predictor.*,
                            module.predictor_obj.*), 'best_acc1' a numpy float64 (as the official
                            kNN monitor returns), 'optimizer' the state_dict of a LARS optimizer
                            (LEWEL_SPEC 4.2) over the official two parameter groups (4.1) after two
                            steps on random gradients, 'scaler' a GradScaler-like dict. The model is
                            ResNet-50 at 1/16 width (hid 256, dim 16) so the file stays small.
  backbone_legacy.pth       what the official extract_backbone.py makes of it (LEWEL_SPEC 8): the
                            online backbone in torchvision names, legacy serialization.
  resnet18_torchvision.pth  a torchvision-style ResNet-18 (1/16 width) state_dict with fc.weight and
                            fc.bias and no num_batches_tracked (as torchvision's original weight files),
                            pickle protocol 4, one conv weight non-contiguous (permuted strides) and
                            bn1's running stats two views of one storage.
  resnet34_div64.pth,       another architecture, and a ResNet-18 with a tensor missing and one of
  resnet18_damaged_div64.pth  the wrong shape (1/64 width: a few KB each); each must be one line.
  evil.pth                  a torch.save file whose pickle names posix.system (must be refused).
  images.safetensors        `images`: 3 normalized images, float32 (3, 3, 48, 48).
  expected.safetensors      float64 references: `lewel.features` and `r18.features`, the pooled
                            eval-mode features (online backbone; the ResNet-18) of `images`; float32
                            copies of a few momentum buffers (`momentum.<name>`) and tensors
                            (`lewel.<name>`, `r18.<name>`, contiguous).
"""

import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from lewel_reference import LEWEL, ResNet, init_state  # noqa: E402

OUT = os.path.join(HERE, "..", "fixtures", "import")
DIV = 16
torch.manual_seed(20260311)


class Wrapped(nn.Module):
    """Stands in for DistributedDataParallel: its state_dict names carry the `module.` prefix."""

    def __init__(self, m):
        super().__init__()
        self.module = m


def collect_params(model, eman):
    """LEWEL_SPEC 4.1: every named parameter (target_net's included), group 0 excluded from LARS and
    weight decay ('bn', 'downsample.1', 'bias', and with EMAN 'mlp.1'), group 1 the rest."""
    excl, rest = [], []
    for n, p in model.named_parameters():
        if "bn" in n or "downsample.1" in n or "bias" in n or (eman and "mlp.1" in n):
            excl.append(p)
        else:
            rest.append(p)
    return [{"params": excl, "weight_decay": 0.0, "lars_exclude": True}, {"params": rest}]


class Lars(torch.optim.Optimizer):
    """LEWEL_SPEC 4.2: u = lr * tau * (g + wd * p) (tau = 1, wd = 0 when excluded), buf = mu * buf + u,
    p -= buf; parameters without a gradient are skipped."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not g["lars_exclude"]:
                    wd = g["weight_decay"]
                    pn, gn = torch.norm(p), torch.norm(d)
                    tau = 0.0 if pn == 0 else (g["eta"] * pn / (gn + wd * pn)).item()
                    d = (d + wd * p) * tau
                u = g["lr"] * d
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = u.clone()
                else:
                    st["momentum_buffer"].mul_(g["momentum"]).add_(u)
                p.sub_(st["momentum_buffer"])


def pooled(backbone, images):
    """Pooled eval-mode features in float64."""
    m = backbone.double().eval()
    with torch.no_grad():
        return m(images.double()).mean(dim=(2, 3))


def main():
    os.makedirs(OUT, exist_ok=True)
    expected = {}
    images = torch.randn(3, 3, 48, 48, dtype=torch.float32)
    save_file({"images": images.contiguous()}, os.path.join(OUT, "images.safetensors"))

    # --- the official checkpoint -------------------------------------------------------------
    model = LEWEL(50, DIV)
    model.load_state_dict(init_state(50, DIV, seed=5))
    ddp = Wrapped(model)
    opt = Lars(collect_params(ddp, eman=True), lr=0.5, weight_decay=1.5e-6)
    gen = torch.Generator().manual_seed(11)
    for _ in range(2):
        for n, p in ddp.named_parameters():
            p.grad = None if n.startswith("module.target_net.") else torch.randn(
                p.shape, generator=gen) * 1e-2
        opt.step()
    names = {p: n[len("module."):] for n, p in ddp.named_parameters()}
    for n in ["online_net.backbone.conv1.weight",
              "online_net.backbone.layer1.0.downsample.1.weight",
              "online_net.backbone.layer4.2.bn3.bias",
              "online_net.neck.proj.mlp.1.weight",
              "online_net.neck.proj_obj.mlp.3.weight",
              "predictor.mlp.1.bias",
              "predictor_obj.mlp.0.weight"]:
        p = dict(model.named_parameters())[n]
        assert names[p] == n
        expected["momentum." + n] = opt.state[p]["momentum_buffer"].float().contiguous()
    sd = ddp.state_dict()
    for n in ["target_net.backbone.layer2.0.downsample.1.running_var",
              "online_net.backbone.bn1.num_batches_tracked",
              "predictor_obj.mlp.3.weight"]:
        expected["lewel." + n] = sd["module." + n].clone().contiguous()
    ckpt = {
        "epoch": 3,
        "arch": "LEWELB_EMAN",
        "state_dict": sd,
        "best_acc1": np.float64(12.5),
        "optimizer": opt.state_dict(),
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                   "growth_interval": 2000, "_growth_tracker": 7},
    }
    torch.save(ckpt, os.path.join(OUT, "lewel_checkpoint.pth.tar"))
    expected["lewel.features"] = pooled(model.online_net.backbone, images)

    # --- extract_backbone.py's output (LEWEL_SPEC 8), legacy serialization ----------------------
    bb = {}
    for k, v in sd.items():
        if not k.startswith("module.online_net.backbone") or "fc" in k:
            continue
        bb[k.replace("backbone.", "").replace("module.online_net.", "")] = v
    with open(os.path.join(OUT, "backbone_legacy.pth"), "wb") as f:
        torch.save(bb, f, _use_new_zipfile_serialization=False)

    # --- a torchvision-style ResNet-18 state_dict --------------------------------------------
    r18 = ResNet(18, DIV)
    with torch.no_grad():
        for m in r18.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape))
    fc = nn.Linear(r18.out_channels, 10)
    rsd = {k: v for k, v in r18.state_dict().items() if not k.endswith("num_batches_tracked")}
    # layer1.0.conv1.weight stored channels-last: an OIHW view with permuted strides.
    w = rsd["layer1.0.conv1.weight"]
    rsd["layer1.0.conv1.weight"] = w.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not rsd["layer1.0.conv1.weight"].is_contiguous()
    # bn1's running stats: two views of one storage (the second at a non-zero offset).
    c = rsd["bn1.running_mean"].numel()
    both = torch.cat([rsd["bn1.running_mean"], rsd["bn1.running_var"]])
    rsd["bn1.running_mean"], rsd["bn1.running_var"] = both[:c], both[c:]
    rsd["fc.weight"], rsd["fc.bias"] = fc.weight.detach(), fc.bias.detach()
    torch.save(rsd, os.path.join(OUT, "resnet18_torchvision.pth"), pickle_protocol=4)
    for n in ["layer1.0.conv1.weight", "bn1.running_mean", "bn1.running_var"]:
        expected["r18." + n] = rsd[n].clone().contiguous()
    expected["r18.features"] = pooled(r18, images)

    # --- what must be refused in one line ------------------------------------------------------
    # A ResNet-34 (basic blocks [3, 4, 6, 3]): read as ResNet-18 by its blocks, then too many.
    torch.save(ResNet(34, 64).state_dict(), os.path.join(OUT, "resnet34_div64.pth"))
    # A ResNet-18 with bn1.weight missing and layer2.0.conv1.weight of the wrong shape.
    bad = ResNet(18, 64).state_dict()
    del bad["bn1.weight"]
    bad["layer2.0.conv1.weight"] = torch.zeros(3, 1, 3, 3)
    torch.save(bad, os.path.join(OUT, "resnet18_damaged_div64.pth"))

    # --- a pickle that would run a command if unpickled ---------------------------------------
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))

    torch.save({"state_dict": Evil()}, os.path.join(OUT, "evil.pth"))

    save_file({k: v.contiguous() for k, v in expected.items()},
              os.path.join(OUT, "expected.safetensors"))
    total = 0
    for f in sorted(os.listdir(OUT)):
        size = os.path.getsize(os.path.join(OUT, f))
        total += size
        print(f"  {size:9d}  {f}")
    print(f"  {total:9d}  total bytes")


if __name__ == "__main__":
    main()
