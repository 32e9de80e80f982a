#!/usr/bin/env python3
"""Self-checks of lewel_reference.py (run: python3 tests/parity/selfcheck.py [--full]).

 (i)   central finite differences (float64, h = 1e-8) of the loss vs autograd for a few
       elements (h = 1e-6 is too coarse: at these tiny widths the loss is piecewise smooth
       with ReLU kinks within ~1e-7 of the init in early-layer weights)
 (ii)  loss at a plain Kaiming init (no perturbation) is about 4
 (iii) parameter / state_dict counts at depth 50 div 1 match spec section 10
 (iv)  compare(OUT, OUT) passes and compare(perturbed OUT, OUT) fails
 plus  bookkeeping checks of one step (num_batches_tracked, EMA, LARS groups).
--full also runs (ii) at depth 50 div 1, 64 px (slower on CPU).
(vi) checks that the committed fixtures are reproduced bit for bit.
"""

import copy
import io
import sys
import os

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lewel_reference as R  # noqa: E402


def fd_check(method, depth=50, div=32, batch=4, size=64, seed=0, h=1e-8):
    state = R.init_state(depth, div, seed, momentum_buffers=True)
    v1, v2 = R.make_views(batch, size, seed)
    v1, v2 = v1.double(), v2.double()
    base = R.build_from_state(state, heads=4, scale=1.0)
    model = copy.deepcopy(base)
    loss = R.forward_loss(model, v1, v2, method, 0.5)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.trainable()}
    picks = [
        "online_net.backbone.conv1.weight",
        "online_net.backbone.bn1.weight",
        "online_net.backbone.layer1.0.downsample.0.weight",
        "online_net.backbone.layer4.2.conv3.weight",
        "online_net.backbone.layer4.2.bn3.bias",
        "online_net.neck.proj.mlp.0.weight",
        "online_net.neck.proj.mlp.1.weight",
        "online_net.neck.proj.mlp.3.weight",
        "online_net.neck.proj_obj.mlp.0.weight",
        "online_net.neck.proj_obj.mlp.3.weight",
        "predictor.mlp.0.weight",
        "predictor.mlp.1.bias",
        "predictor_obj.mlp.3.weight",
    ]
    gen = torch.Generator().manual_seed(123)
    worst = 0.0
    rows = []
    for name in picks:
        g = grads[name].reshape(-1)
        # element with the largest |grad| and one random element
        idxs = [int(g.abs().argmax()), int(torch.randint(g.numel(), (1,), generator=gen))]
        for i in idxs:
            vals = []
            for sgn in (+1, -1):
                m = copy.deepcopy(base)
                p = dict(m.named_parameters())[name]
                with torch.no_grad():
                    p.view(-1)[i] += sgn * h
                with torch.no_grad():
                    vals.append(R.forward_loss(m, v1, v2, method, 0.5).item())
            fd = (vals[0] - vals[1]) / (2 * h)
            ad = g[i].item()
            err = abs(fd - ad) / max(abs(ad), 1e-8)
            rows.append((name, i, ad, fd, err))
            # float64 central differences at h = 1e-8: truncation ~1e-7 relative, round-off
            # ~eps*|loss|/h ~ 1e-7 absolute; pass when |fd - ad| <= 1e-5*|ad| + 1e-7
            worst = max(worst, abs(fd - ad) / (1e-5 * abs(ad) + 1e-7))
    return loss.item(), rows, worst


def count_check():
    m = R.LEWEL(50, 1)
    online = sum(p.numel() for p in m.online_net.parameters())
    preds = sum(p.numel() for p in m.predictor.parameters()) + \
        sum(p.numel() for p in m.predictor_obj.parameters())
    bb = sum(p.numel() for p in m.online_net.backbone.parameters())
    nsd = len(m.online_net.state_dict())
    nall = len(m.state_dict())
    nconv = sum(isinstance(x, nn.Conv2d) for x in m.online_net.backbone.modules())
    nbn = sum(isinstance(x, nn.BatchNorm2d) for x in m.online_net.backbone.modules())
    bnch = sum(x.num_features for x in m.online_net.backbone.modules()
               if isinstance(x, nn.BatchNorm2d))
    return dict(online=online, predictors=preds, backbone=bb, online_sd=nsd, all_sd=nall,
                conv2d=nconv, bn2d=nbn, bn_channels=bnch)


def init_loss(depth, div, batch, size, seed=0):
    state = R.init_state(depth, div, seed, perturb=False)
    v1, v2 = R.make_views(batch, size, seed)
    out = {}
    for method in R.METHODS:
        model = R.build_from_state(state, 4, 1.0)
        with torch.no_grad():
            out[method] = R.forward_loss(model, v1.double(), v2.double(), method, 0.5).item()
    return out


def bookkeeping_check():
    state = R.init_state(50, 32, 0, momentum_buffers=True)
    v1, v2 = R.make_views(4, 64, 0)
    msgs = []
    ok = True
    for method in R.METHODS:
        loss, grads, new = R.step(state, v1, v2, method, 0.3, 1.5e-6, ema_m=0.99)
        nbt = {k: int(v) for k, v in new.items() if k.endswith("num_batches_tracked")}
        bad = {k: v for k, v in nbt.items() if v != 5}
        ok &= not bad
        msgs.append(f"{method}: num_batches_tracked all 5 (3 + 2 forwards / copied): {not bad}")
        # EMAN: target running_mean = 0.99*old_target + 0.01*new_online
        k = "backbone.layer2.0.bn1.running_mean"
        exp = 0.99 * state["target_net." + k].double() + 0.01 * new["online_net." + k].double()
        d = (new["target_net." + k].double() - exp).abs().max().item()
        if method == "lewel-b-eman":
            ok &= d < 1e-6
            msgs.append(f"{method}: target running_mean is the EMA of online's (max dev {d:.1e})")
        else:
            ok &= d > 1e-4
            msgs.append(f"{method}: target running_mean from its own train forwards "
                        f"(differs from EMA by {d:.1e})")
        # params EMA: target_new = m*target_old + (1-m)*online_new
        k = "neck.proj.mlp.0.weight"
        exp = 0.99 * state["target_net." + k].double() + 0.01 * new["online_net." + k].double()
        d = (new["target_net." + k].double() - exp).abs().max().item()
        ok &= d < 1e-6
        msgs.append(f"{method}: target params are the EMA of updated online params "
                    f"(max dev {d:.1e})")
        # LARS group of mlp.1.weight
        n = "online_net.neck.proj.mlp.1.weight"
        g = grads[n]
        u_excl = 0.9 * state["momentum." + n].double() + 0.3 * g
        d_excl = (new["momentum." + n].double() - u_excl).abs().max().item()
        excluded = d_excl < 1e-7
        want = method == "lewel-b-eman"
        ok &= excluded == want
        msgs.append(f"{method}: {n} excluded from LARS: {excluded} (expected {want})")
    return ok, msgs


def compare_check():
    state = R.init_state(18, 16, 0, momentum_buffers=True)
    v1, v2 = R.make_views(4, 40, 0)
    loss, grads, new = R.step(state, v1, v2, "lewel-b-eman", 0.3, 1.5e-6, ema_m=0.99)
    out = {"loss": torch.tensor(loss, dtype=torch.float32)}
    out.update({"grad." + n: g.float() for n, g in grads.items()})
    out.update({"state." + n: t for n, t in new.items()})
    sink = io.StringIO()
    same = R.compare(out, out, out=sink)
    results = [("identical", same, True)]
    gen = torch.Generator().manual_seed(7)
    for key, scale in (("grad.online_net.backbone.layer3.0.conv2.weight", 1e-3),
                       ("state.online_net.neck.proj.mlp.0.weight", 1e-4),
                       ("loss", 1e-4)):
        pert = dict(out)
        t = out[key]
        pert[key] = t + scale * t.abs().max() * torch.randn(t.shape, generator=gen)
        results.append((f"perturbed {key}", R.compare(pert, out, out=sink), False))
    pert = dict(out)
    k = "state.online_net.backbone.bn1.num_batches_tracked"
    pert[k] = out[k] + 1
    results.append((f"perturbed {k}", R.compare(pert, out, out=sink), False))
    pert = dict(out)
    del pert["grad.predictor.mlp.0.weight"]
    results.append(("missing grad tensor", R.compare(pert, out, out=sink), False))
    return results


def main():
    full = "--full" in sys.argv
    all_ok = True
    torch.manual_seed(0)

    print("(i) central finite differences (h = 1e-8), float64, depth 50 div 32, B=4, 64 px")
    for method in R.METHODS:
        loss, rows, worst = fd_check(method)
        print(f"  {method}: loss {loss:.6f}")
        for name, i, ad, fd, err in rows:
            print(f"    {name}[{i}]: autograd {ad:+.9e} fd {fd:+.9e} rel {err:.1e}")
        print(f"  worst |fd - ad| / (1e-5*|ad| + 1e-7): {worst:.3f} (pass if <= 1)")
        all_ok &= worst <= 1.0

    print("(ii) loss at plain Kaiming init (target == online, unperturbed BN)")
    cfgs = [(50, 32, 4, 64), (18, 16, 4, 40)]
    if full:
        cfgs.append((50, 1, 4, 64))
    for cfg in cfgs:
        print(f"  depth {cfg[0]} div {cfg[1]} B={cfg[2]} {cfg[3]} px: {init_loss(*cfg)}")

    print("(iii) parameter counts, depth 50 div 1")
    c = count_check()
    print(f"  {c}")
    exp = dict(online=42_398_784, predictors=4_210_688, backbone=23_508_032, online_sd=332,
               all_sd=678, conv2d=53, bn2d=53, bn_channels=26_560)
    for k, v in exp.items():
        good = c[k] == v
        all_ok &= good
        print(f"  {k}: {c[k]:,} (spec {v:,}) {'ok' if good else 'MISMATCH'}")

    print("(iv) compare")
    for what, got, want in compare_check():
        good = got == want
        all_ok &= good
        print(f"  {what}: compare -> {'pass' if got else 'fail'} "
              f"(expected {'pass' if want else 'fail'}) {'ok' if good else 'WRONG'}")

    print("(v) one-step bookkeeping")
    ok, msgs = bookkeeping_check()
    for m in msgs:
        print("  " + m)
    all_ok &= ok

    print("(vi) committed fixtures reproduce")
    fix = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
    for name in ("r18_div16", "r50_div32"):
        inp = os.path.join(fix, f"{name}.in.safetensors")
        if not os.path.exists(inp):
            print(f"  {name}: not generated (run make_fixtures.sh)")
            continue
        state = R.load_file(inp)
        views = R.load_file(os.path.join(fix, f"{name}.views.safetensors"))
        for method in R.METHODS:
            ref = R.load_file(os.path.join(fix, f"{name}.{method}.out.safetensors"))
            loss, grads, new = R.step(state, views["view1"], views["view2"], method, 0.3,
                                      1.5e-6, ema_m=0.99)
            out = {"loss": torch.tensor(loss, dtype=torch.float32)}
            out.update({"grad." + n: g.float() for n, g in grads.items()})
            out.update({"state." + n: t for n, t in new.items()})
            same = set(out) == set(ref) and all(torch.equal(out[k], ref[k]) for k in ref)
            all_ok &= same
            print(f"  {name} {method}: bitwise identical to the committed OUT: {same}")

    print("ALL OK" if all_ok else "SOME CHECKS FAILED")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
