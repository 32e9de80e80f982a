#!/usr/bin/env python3
"""Independent float64 PyTorch formulation of one LEWEL training iteration.

Written from our own specification (/work/shared/LEWEL_SPEC.md, sections 1-4),
not from the official code.  It is a parity reference for the Rust engine:

  make     write an initial state (IN) and two random views (V)
  step     run exactly one iteration (forward, loss, backward, LARS, EMA) and write OUT
  compare  compare two OUT files (A = candidate, B = reference)

File formats (safetensors):
  IN   : online_net.*, target_net.*, predictor.*, predictor_obj.* (PyTorch state_dict
         names, no `module.` prefix, BN buffers included; num_batches_tracked int64 [])
         plus optional momentum.<param name> LARS buffers for every trainable parameter.
  V    : view1, view2, float32 (B, 3, S, S).
  OUT  : loss f32 [] ; grad.<name> f32 for every trainable parameter (online_net params,
         predictor.*, predictor_obj.*) ; state.<name> for every entry of IN after the step
         (same dtype/shape) plus state.momentum.<name> for every trainable parameter.

Everything is computed in float64; files hold float32 (int64 for num_batches_tracked).
"""

import argparse
import copy
import math
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

METHODS = ("lewel-b-eman", "lewel-b")
EXCLUDE_RULES = ("current", "released-log")

# ---------------------------------------------------------------------------------------
# Backbone: torchvision-style ResNet v1.5 with a width divisor, no avgpool / fc.
# ---------------------------------------------------------------------------------------


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)  # v1.5: stride on the 3x3
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + idt)


RESNET_CFG = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}


class ResNet(nn.Module):
    def __init__(self, depth=50, div=1):
        super().__init__()
        if depth not in RESNET_CFG:
            raise ValueError(f"unsupported depth {depth}")
        if 64 % div != 0:
            raise ValueError(f"width divisor {div} must divide 64")
        block, layers = RESNET_CFG[depth]
        stem = 64 // div
        widths = [64 // div, 128 // div, 256 // div, 512 // div]
        self.inplanes = stem
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0], 1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], 2)
        self.out_channels = widths[3] * block.expansion
        del self.inplanes

    def _make_layer(self, block, planes, n, stride):
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        blocks = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        for _ in range(1, n):
            blocks.append(block(self.inplanes, planes))
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)  # after the final ReLU of the last block


# ---------------------------------------------------------------------------------------
# Neck / predictors
# ---------------------------------------------------------------------------------------


class MLP1D(nn.Module):
    """Conv1d(k=1, no bias) -> BN1d -> ReLU -> Conv1d(k=1, no bias), names mlp.0..mlp.3."""

    def __init__(self, cin, hid, cout):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Conv1d(cin, hid, 1, bias=False),
            nn.BatchNorm1d(hid),
            nn.ReLU(),
            nn.Conv1d(hid, cout, 1, bias=False),
        )

    def forward(self, x):
        return self.mlp(x)


class ObjectNeck(nn.Module):
    def __init__(self, cin, hid, dim, heads=4, scale=1.0):
        super().__init__()
        self.proj = MLP1D(cin, hid, dim)
        self.proj_obj = MLP1D(cin, hid, dim)
        self.heads = heads
        self.scale = scale

    def forward(self, x):
        b, c, h, w = x.shape
        npos = h * w
        nh = self.heads
        xf = x.reshape(b, c, npos)  # row-major (h, w)
        g = x.mean(dim=(2, 3)).unsqueeze(2)  # (B, C, 1)
        u = torch.cat([g, xf], dim=2)  # pooled vector is column 0
        z = self.proj(u)  # (B, D, 1+L); BN over B*(1+L) columns
        dim = z.shape[1]
        if dim % nh != 0 or c % nh != 0:
            raise ValueError(f"C={c} and D={dim} must be divisible by heads={nh}")
        k = dim // nh
        zg = z[:, :, :1]  # (B, D, 1)
        a = z[:, :, 1:]  # (B, D, L)
        a = F.normalize(a, p=2, dim=1, eps=1e-12)  # per pixel, over all D channels
        a = a / self.scale
        wts = torch.softmax(a, dim=2)  # over positions, per (b, d)
        wts = wts.reshape(b, nh, k, npos)  # d = h*K + k
        xh = xf.reshape(b, nh, c // nh, npos)  # c = h*(C/nh) + j
        v = torch.matmul(xh, wts.transpose(2, 3))  # (B, nh, C/nh, K)
        v = v.reshape(b, c, k)
        o = self.proj_obj(v)  # (B, D, K); BN over B*K columns
        return zg, o


class EncoderObj(nn.Module):
    def __init__(self, depth, div, hid, dim, heads, scale):
        super().__init__()
        self.backbone = ResNet(depth, div)
        self.neck = ObjectNeck(self.backbone.out_channels, hid, dim, heads, scale)

    def forward(self, x):
        return self.neck(self.backbone(x))


class LEWEL(nn.Module):
    def __init__(self, depth=50, div=1, hid=None, dim=None, heads=4, scale=1.0):
        super().__init__()
        hid = 4096 // div if hid is None else hid
        dim = 256 // div if dim is None else dim
        self.online_net = EncoderObj(depth, div, hid, dim, heads, scale)
        self.target_net = EncoderObj(depth, div, hid, dim, heads, scale)
        self.predictor = MLP1D(dim, hid, dim)
        self.predictor_obj = MLP1D(dim, hid, dim)
        for p in self.target_net.parameters():
            p.requires_grad_(False)
        self.dim = dim

    def trainable(self):
        """(name, param) for online_net, predictor, predictor_obj, in module order."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("target_net.")]


# ---------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------


def nmse(p, t):
    p = F.normalize(p, p=2, dim=1, eps=1e-12)
    t = F.normalize(t, p=2, dim=1, eps=1e-12)
    return 2.0 - 2.0 * (p * t).sum(dim=1).mean()


def direction_loss(model, z_a, o_a, zt_b, ot_b, w):
    b = z_a.shape[0]
    d = model.dim
    pz = model.predictor(z_a).reshape(b, d)
    l_inst = nmse(pz, zt_b.reshape(b, d))
    po = model.predictor_obj(o_a)  # (B, D, K)
    k = po.shape[2]
    po = po.transpose(1, 2).reshape(b * k, d)
    to = ot_b.transpose(1, 2).reshape(b * k, d)
    l_obj = nmse(po, to)
    return w * l_inst + (1.0 - w) * l_obj


def set_modes(model, method):
    model.train()
    if method == "lewel-b-eman":
        model.target_net.eval()
    elif method != "lewel-b":
        raise ValueError(f"unknown method {method}")


def forward_loss(model, v1, v2, method, loss_weight):
    """Forward order: online(v1), online(v2), target(v1), target(v2); directions 1 then 2."""
    set_modes(model, method)
    z1, o1 = model.online_net(v1)
    z2, o2 = model.online_net(v2)
    with torch.no_grad():
        zt1, ot1 = model.target_net(v1)
        zt2, ot2 = model.target_net(v2)
        zt1, ot1, zt2, ot2 = (t.clone().detach() for t in (zt1, ot1, zt2, ot2))
    loss = direction_loss(model, z1, o1, zt2, ot2, loss_weight)  # online v1 vs target v2
    loss = loss + direction_loss(model, z2, o2, zt1, ot1, loss_weight)  # online v2 vs target v1
    return loss


# ---------------------------------------------------------------------------------------
# Optimizer (LARS, spec 4.1-4.2) and EMA (spec 3.3)
# ---------------------------------------------------------------------------------------


def lars_excluded(name, method, exclude_rule):
    if "bn" in name or "downsample.1" in name or "bias" in name:
        return True
    if exclude_rule == "current":
        return "EMAN" in method.upper() and "mlp.1" in name
    if exclude_rule == "released-log":
        return False
    raise ValueError(f"unknown exclude rule {exclude_rule}")


@torch.no_grad()
def lars_step(named, grads, bufs, lr, wd, eta, mu, method, exclude_rule):
    """named: [(name, p)], grads: {name: g}, bufs: {name: buf or None}. Updates p in place,
    returns the new buffers."""
    new_bufs = {}
    for name, p in named:
        g = grads[name]
        if lars_excluded(name, method, exclude_rule):
            u = lr * g
        else:
            pn = torch.linalg.vector_norm(p).item()
            gn = torch.linalg.vector_norm(g).item()
            tau = 0.0 if pn == 0.0 else eta * pn / (gn + wd * pn)
            u = lr * tau * (g + wd * p)
        b = bufs.get(name)
        b = u.clone() if b is None else mu * b + u
        p.sub_(b)
        new_bufs[name] = b
    return new_bufs


@torch.no_grad()
def ema_update(model, method, m):
    if method == "lewel-b-eman":
        on = model.online_net.state_dict()
        tg = model.target_net.state_dict()
        assert list(on.keys()) == list(tg.keys())
        for k, o in on.items():
            t = tg[k]
            if t.is_floating_point():
                t.copy_(m * t + (1.0 - m) * o)
            else:  # num_batches_tracked
                t.copy_(o)
    else:
        for (kt, t), (ko, o) in zip(model.target_net.named_parameters(),
                                    model.online_net.named_parameters()):
            assert kt == ko
            t.copy_(m * t + (1.0 - m) * o)


# ---------------------------------------------------------------------------------------
# State handling
# ---------------------------------------------------------------------------------------


def infer_arch(state):
    """(depth, div, hid, dim) from the names and shapes of a state dict."""
    pre = "online_net.backbone."
    counts = []
    for li in range(1, 5):
        idx = set()
        for k in state:
            mt = re.match(re.escape(pre) + rf"layer{li}\.(\d+)\.", k)
            if mt:
                idx.add(int(mt.group(1)))
        counts.append(len(idx))
    bottleneck = (pre + "layer1.0.conv3.weight") in state
    depth = None
    for d, (blk, layers) in RESNET_CFG.items():
        if layers == counts and (blk is Bottleneck) == bottleneck:
            depth = d
    if depth is None:
        raise ValueError(f"cannot infer depth from block counts {counts}")
    stem = state[pre + "conv1.weight"].shape[0]
    if 64 % stem != 0:
        raise ValueError(f"stem width {stem} does not divide 64")
    div = 64 // stem
    hid = state["online_net.neck.proj.mlp.0.weight"].shape[0]
    dim = state["online_net.neck.proj.mlp.3.weight"].shape[0]
    return depth, div, hid, dim


def build_from_state(state, heads, scale, dtype=torch.float64):
    depth, div, hid, dim = infer_arch(state)
    model = LEWEL(depth, div, hid, dim, heads, scale).to(dtype)
    model_state = {k: v for k, v in state.items() if not k.startswith("momentum.")}
    loaded = {}
    for k, v in model_state.items():
        loaded[k] = v.to(dtype) if v.is_floating_point() else v.to(torch.int64)
    model.load_state_dict(loaded, strict=True)
    return model


def export_state(model, bufs, in_state):
    """Model state + momentum buffers, as float32 (int64 for num_batches_tracked)."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.detach().to(torch.float32) if v.is_floating_point() else v.detach().to(torch.int64)
    for n, b in bufs.items():
        out["momentum." + n] = b.detach().to(torch.float32)
    for k, v in in_state.items():
        if k not in out:
            raise KeyError(f"IN entry {k} has no counterpart after the step")
        if out[k].shape != v.shape or out[k].dtype != v.dtype:
            raise ValueError(f"{k}: IN has {v.dtype} {tuple(v.shape)}, "
                             f"step produced {out[k].dtype} {tuple(out[k].shape)}")
    return {k: t.contiguous() for k, t in out.items()}


def step(state, view1, view2, method, lr, wd, eta=0.001, momentum=0.9, ema_m=0.99,
         heads=4, loss_weight=0.5, scale=1.0, exclude_rule="current", dtype=torch.float64):
    """Exactly one LEWEL iteration (in float64 unless dtype says otherwise; float32 is only
    for estimating what a correct float32 engine can reach). Returns (loss: float,
    grads: {name: tensor}, new_state: {name: tensor} as float32/int64 incl. momentum.<name>)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    if exclude_rule not in EXCLUDE_RULES:
        raise ValueError(f"exclude rule must be one of {EXCLUDE_RULES}")
    model = build_from_state(state, heads, scale, dtype)
    v1 = view1.to(dtype)
    v2 = view2.to(dtype)
    named = model.trainable()
    for _, p in named:
        p.grad = None
    loss = forward_loss(model, v1, v2, method, loss_weight)
    loss.backward()
    grads = {}
    for n, p in named:
        if p.grad is None:
            raise RuntimeError(f"no gradient for {n}")
        grads[n] = p.grad.detach().clone()
    bufs = {}
    for n, _ in named:
        b = state.get("momentum." + n)
        bufs[n] = None if b is None else b.to(dtype).clone()
    new_bufs = lars_step(named, grads, bufs, lr, wd, eta, momentum, method, exclude_rule)
    ema_update(model, method, ema_m)
    new_state = export_state(model, new_bufs, state)
    return loss.item(), grads, new_state


# ---------------------------------------------------------------------------------------
# Init
# ---------------------------------------------------------------------------------------


def init_state(depth, div, seed, momentum_buffers=False, perturb=True, heads=4,
               residual_gamma=1.0):
    """Kaiming-normal fan_out (ReLU gain) for every conv, BN gamma 1 beta 0; then (perturb)
    BN params/stats jittered, target = copy of online (params + buffers) + 1e-3*N on params,
    optional small random LARS buffers. Returns a float32/int64 state dict.

    residual_gamma scales the gamma of the last BN of every residual branch (bn3 of a
    Bottleneck, bn2 of a BasicBlock; not downsample.1), online and target alike.  1.0 is the
    plain init; the committed fixtures use 0.1, which keeps these tiny, deep, small-batch BN
    networks well enough conditioned that a float32 engine can match the float64 reference
    (see README.md, "Conditioning")."""
    gen = torch.Generator().manual_seed(seed)
    model = LEWEL(depth, div, heads=heads)

    def randn_like(t):
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
                fan_out = mod.weight.shape[0] * math.prod(mod.weight.shape[2:])
                std = math.sqrt(2.0 / fan_out)
                mod.weight.copy_(randn_like(mod.weight) * std)
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
                mod.running_mean.zero_()
                mod.running_var.fill_(1.0)
                mod.num_batches_tracked.zero_()
                if perturb:
                    mod.weight.add_(0.1 * randn_like(mod.weight))
                    mod.bias.copy_(0.1 * randn_like(mod.bias))
                    mod.running_mean.copy_(0.1 * randn_like(mod.running_mean))
                    mod.running_var.copy_(
                        0.5 + torch.rand(mod.running_var.shape, generator=gen))
                    mod.num_batches_tracked.fill_(3)
        if residual_gamma != 1.0:
            for blk in model.online_net.backbone.modules():
                if isinstance(blk, Bottleneck):
                    blk.bn3.weight.mul_(residual_gamma)
                elif isinstance(blk, BasicBlock):
                    blk.bn2.weight.mul_(residual_gamma)
        # target = online (params and buffers)
        model.target_net.load_state_dict(copy.deepcopy(model.online_net.state_dict()))
        if perturb:
            for p in model.target_net.parameters():
                p.add_(1e-3 * randn_like(p))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if momentum_buffers:
        for n, p in model.trainable():
            state["momentum." + n] = (1e-4 * randn_like(p)).contiguous()
    return state


def make_views(batch, size, seed):
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    v1 = torch.randn((batch, 3, size, size), generator=gen, dtype=torch.float32)
    v2 = torch.randn((batch, 3, size, size), generator=gen, dtype=torch.float32)
    return v1.contiguous(), v2.contiguous()


# ---------------------------------------------------------------------------------------
# Compare
# ---------------------------------------------------------------------------------------


def _rel_l2(x, y):
    """(||x-y|| / ||y||, ||y||) in float64; rel is nan when ||y|| == 0."""
    x, y = x.double(), y.double()
    ny = torch.linalg.vector_norm(y).item()
    nd = torch.linalg.vector_norm(x - y).item()
    if not math.isfinite(nd):
        return float("inf"), ny
    return (nd / ny if ny > 0 else float("nan")), ny


def _max_abs(x, y):
    if x.numel() == 0:
        return 0.0
    return (x.double() - y.double()).abs().max().item()


def noise_levels(ref, approxes):
    """Per-entry discrepancy of the `approxes` (e.g. this step run in float32, with different
    thread counts, hence different summation orders) against `ref` (the float64 run),
    measured as compare() measures (loss relative error, rel L2 for tensors, max abs where the
    reference is all zero, 0 for integers), the maximum over the approxes."""
    if isinstance(approxes, dict):
        approxes = [approxes]
    levels = [_noise_one(ref, a) for a in approxes]
    return {k: max(lv[k] for lv in levels) for k in ref}


def _noise_one(ref, approx):
    out = {}
    for k, b in ref.items():
        a = approx[k]
        if k == "loss":
            la, lb = a.double().item(), b.double().item()
            v = abs(la - lb) / max(abs(lb), 1e-300)
        elif not b.is_floating_point():
            v = 0.0 if torch.equal(a, b) else float("inf")
        else:
            r, ny = _rel_l2(a, b)
            v = _max_abs(a, b) if ny == 0.0 else r
        out[k] = torch.tensor(v, dtype=torch.float64)
    return out


def compare(a, b, loss_tol=1e-5, grad_tol=1e-4, state_tol=1e-5, zero_abs_tol=1e-6,
            momentum_tol=None, noise=None, noise_factor=10.0, out=sys.stdout):
    """a = candidate, b = reference. Returns True when within tolerance.

    Defaults: loss rel <= 1e-5, every grad.* rel L2 <= 1e-4, every state.* rel L2 <= 1e-5
    (max abs <= 1e-6 where the reference tensor is 0), integers equal.  momentum_tol, when
    given, replaces state_tol for state.momentum.*.  noise (a dict from noise_levels) raises
    each entry's tolerance to max(tolerance, noise_factor * noise[entry])."""
    ok = True
    ka, kb = set(a), set(b)
    if ka != kb:
        ok = False
        miss = sorted(kb - ka)
        extra = sorted(ka - kb)
        print(f"KEY MISMATCH: {len(miss)} missing in A (e.g. {miss[:5]}), "
              f"{len(extra)} extra in A (e.g. {extra[:5]})", file=out)
    for k in sorted(ka & kb):
        if a[k].shape != b[k].shape:
            ok = False
            print(f"SHAPE MISMATCH {k}: {tuple(a[k].shape)} vs {tuple(b[k].shape)}", file=out)
        elif a[k].dtype != b[k].dtype:
            ok = False
            print(f"DTYPE MISMATCH {k}: {a[k].dtype} vs {b[k].dtype}", file=out)
    common = sorted(k for k in ka & kb if a[k].shape == b[k].shape)

    def tol_for(k, base):
        if noise is None:
            return base
        cands = [k]
        if k.startswith("state.momentum."):
            # a LARS buffer inherits the relative error of its gradient (u = lr*g, or
            # lr*eta*|p|*g/|g| up to the small wd term), whichever run measured more
            cands.append("grad." + k[len("state.momentum."):])
        nv = [float(noise[c]) for c in cands if c in noise]
        nv = [v for v in nv if math.isfinite(v)]
        return max([base] + [noise_factor * v for v in nv])

    if "loss" in common:
        la, lb = a["loss"].double().item(), b["loss"].double().item()
        rel = abs(la - lb) / max(abs(lb), 1e-300)
        tol = tol_for("loss", loss_tol)
        good = rel <= tol and math.isfinite(la)
        ok &= good
        print(f"loss: A={la:.9g} B={lb:.9g} rel={rel:.3e} tol {tol:.3g} "
              f"{'ok' if good else 'FAIL'}", file=out)
    else:
        ok = False
        print("no loss entry", file=out)

    groups = (("grad.", grad_tol), ("state.momentum.", momentum_tol or state_tol),
              ("state.", state_tol))
    for prefix, base in groups:
        keys = [k for k in common if k.startswith(prefix)
                and not (prefix == "state." and k.startswith("state.momentum."))]
        if not keys:
            continue
        worst = (-1.0, None, 0.0)  # (rel, key, tol)
        worst_ratio = (-1.0, None)
        worst_abs = (-1.0, None)
        nfail = 0
        for k in keys:
            x, y = a[k], b[k]
            if not y.is_floating_point():
                if not torch.equal(x, y):
                    nfail += 1
                    print(f"  {k}: integer mismatch {x.tolist()} vs {y.tolist()} FAIL", file=out)
                continue
            r, ny = _rel_l2(x, y)
            if ny == 0.0:
                mabs = _max_abs(x, y)
                tol = tol_for(k, zero_abs_tol)
                if not (mabs <= tol):
                    nfail += 1
                    print(f"  {k}: reference is zero, max|A-B|={mabs:.3e} > {tol:.3g} FAIL",
                          file=out)
                if mabs > worst_abs[0]:
                    worst_abs = (mabs, k)
                continue
            tol = tol_for(k, base)
            if not (r <= tol):
                nfail += 1
                if nfail <= 10:
                    print(f"  {k}: rel L2 {r:.3e} > tol {tol:.3g}", file=out)
            if r > worst[0] or not math.isfinite(r):
                worst = (r, k, tol)
            ratio = r / tol if tol > 0 else float("inf")
            if ratio > worst_ratio[0] or not math.isfinite(ratio):
                worst_ratio = (ratio, k)
        label = prefix + "*" + (" (momentum buffers excluded)" if prefix == "state." else "")
        line = (f"{label}: {len(keys)} tensors, worst rel L2 {worst[0]:.3e} ({worst[1]}, "
                f"tol {worst[2]:.3g})")
        if noise is not None:
            line += f"; worst error/tolerance {worst_ratio[0]:.3f} ({worst_ratio[1]})"
        if worst_abs[1] is not None:
            line += f"; zero-reference max abs {worst_abs[0]:.3e} ({worst_abs[1]})"
        line += f"; {nfail} over tolerance " + ("FAIL" if nfail else "ok")
        print(line, file=out)
        ok &= nfail == 0
    print("PASS" if ok else "FAIL", file=out)
    return ok


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def save(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def cmd_make(args):
    state = init_state(args.depth, args.div, args.seed, momentum_buffers=args.momentum_buffers,
                       perturb=not args.no_perturb, residual_gamma=args.residual_gamma)
    v1, v2 = make_views(args.batch, args.size, args.seed)
    save(args.state, state)
    save(args.views, {"view1": v1, "view2": v2})
    n_params = sum(v.numel() for k, v in state.items() if v.is_floating_point())
    print(f"wrote {args.state} ({len(state)} tensors, {n_params} floats) and {args.views}")


def cmd_step(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    state = load_file(args.state)
    views = load_file(args.views)
    loss, grads, new_state = step(
        state, views["view1"], views["view2"], args.method, args.lr, args.wd,
        eta=args.lars_eta, momentum=args.momentum, ema_m=args.ema_m,
        heads=args.lewel_num_heads, loss_weight=args.lewel_loss_weight,
        scale=args.lewel_scale, exclude_rule=args.lars_exclude,
        dtype=torch.float32 if args.compute_dtype == "float32" else torch.float64)
    out = {"loss": torch.tensor(loss, dtype=torch.float32)}
    for n, g in grads.items():
        out["grad." + n] = g.to(torch.float32)
    for n, t in new_state.items():
        out["state." + n] = t
    save(args.out, out)
    depth, div, hid, dim = infer_arch(state)
    print(f"depth {depth} div {div} hid {hid} dim {dim} batch {views['view1'].shape[0]} "
          f"size {views['view1'].shape[2]}: loss {loss:.10f} -> {args.out}")


def cmd_compare(args):
    a = load_file(args.a)
    b = load_file(args.b)
    noise = load_file(args.noise) if args.noise else None
    ok = compare(a, b, args.loss_tol, args.grad_tol, args.state_tol, args.zero_abs_tol,
                 momentum_tol=args.momentum_tol, noise=noise, noise_factor=args.noise_factor)
    sys.exit(0 if ok else 1)


def cmd_noise(args):
    ref = load_file(args.ref)
    lv = noise_levels(ref, [load_file(p) for p in args.approx])
    save(args.out, {k: v.to(torch.float32) for k, v in lv.items()})
    g = max((float(v), k) for k, v in lv.items() if k.startswith("grad."))
    st = max((float(v), k) for k, v in lv.items()
             if k.startswith("state.") and not k.startswith("state.momentum."))
    print(f"noise: loss {float(lv['loss']):.2e}, worst grad {g[0]:.2e} ({g[1]}), "
          f"worst state {st[0]:.2e} ({st[1]}) -> {args.out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("make", help="write an initial state and two random views")
    m.add_argument("--depth", type=int, default=50, choices=sorted(RESNET_CFG))
    m.add_argument("--div", type=int, default=32)
    m.add_argument("--batch", type=int, default=4)
    m.add_argument("--size", type=int, default=64)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--momentum-buffers", action="store_true",
                   help="include small random LARS buffers momentum.<name>")
    m.add_argument("--no-perturb", action="store_true",
                   help="plain init: no BN/stat jitter, target == online, no perturbation")
    m.add_argument("--residual-gamma", type=float, default=1.0,
                   help="scale of the last BN gamma of each residual branch (fixtures: 0.1)")
    m.add_argument("--state", required=True)
    m.add_argument("--views", required=True)
    m.set_defaults(fn=cmd_make)

    s = sub.add_parser("step", help="run one iteration and write OUT")
    s.add_argument("--state", required=True)
    s.add_argument("--views", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--method", required=True, choices=METHODS)
    s.add_argument("--lr", type=float, required=True)
    s.add_argument("--wd", type=float, required=True)
    s.add_argument("--ema-m", type=float, required=True)
    s.add_argument("--lewel-num-heads", type=int, default=4)
    s.add_argument("--lewel-loss-weight", type=float, default=0.5)
    s.add_argument("--lewel-scale", type=float, default=1.0)
    s.add_argument("--lars-exclude", default="current", choices=EXCLUDE_RULES)
    s.add_argument("--lars-eta", type=float, default=0.001)
    s.add_argument("--momentum", type=float, default=0.9)
    s.add_argument("--compute-dtype", default="float64", choices=("float64", "float32"),
                   help="float64 is the reference; float32 only estimates float32 drift")
    s.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); changes float32 rounding")
    s.set_defaults(fn=cmd_step)

    c = sub.add_parser("compare", help="compare OUT files: A (candidate) vs B (reference)")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--loss-tol", type=float, default=1e-5)
    c.add_argument("--grad-tol", type=float, default=1e-4)
    c.add_argument("--state-tol", type=float, default=1e-5)
    c.add_argument("--zero-abs-tol", type=float, default=1e-6)
    c.add_argument("--momentum-tol", type=float, default=None,
                   help="tolerance for state.momentum.* (default: the --state-tol)")
    c.add_argument("--noise", default=None,
                   help="noise file (from the `noise` subcommand): per-entry tolerance "
                        "becomes max(tolerance, --noise-factor * noise)")
    c.add_argument("--noise-factor", type=float, default=10.0)
    c.set_defaults(fn=cmd_compare)

    n = sub.add_parser("noise", help="per-entry float32-vs-float64 discrepancy of two OUT files")
    n.add_argument("ref", help="OUT computed in float64 (the reference)")
    n.add_argument("approx", nargs="+",
                   help="OUT(s) of the same step computed with --compute-dtype float32 "
                        "(e.g. with --threads 1 and with the default thread count)")
    n.add_argument("--out", required=True)
    n.set_defaults(fn=cmd_noise)

    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
