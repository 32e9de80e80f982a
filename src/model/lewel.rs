//! The LEWEL model of LEWEL_SPEC sections 2-3: EncoderObj (backbone + ObjectNeck), the two predictors
//! and the loss. Module names are the official ones (`online_net.backbone.*`, `online_net.neck.proj.
//! mlp.{0,1,3}.*`, `online_net.neck.proj_obj.*`, `predictor.*`, `predictor_obj.*`, `target_net.*`).
//!
//! ObjectNeck on the backbone map X (B, L, C), L = H*W:
//!   U = [avgpool(X); X] (B, 1+L, C) -> Z = proj(U) (B, 1+L, D); BN over B*(1+L) rows
//!   z_g = Z[:, 0] (B, D);  A = Z[:, 1:] (B, L, D)
//!   maps = softmax over positions of (A / max(|A|_channels, 1e-12) / scale)
//!   V = head-split aggregation of X by the maps (B, K, C), K = D / heads
//!   O = proj_obj(V) (B, K, D); BN over B*K rows
//! Loss (both directions summed): w * nmse(predictor(z_a), z_b^t) + (1 - w) * nmse(predictor_obj(O_a), O_b^t).

use super::resnet::{Arch, ResNet};
use super::{bn_layer, linear_weight};
use crate::graph::Kernels;
use crate::graph::{BnLayer, BnMode, Graph};
use crate::memory::{ParamId, ParamStore};
use crate::ops::Real;
use crate::rng::Rng;
use crate::tensor::{Shape, Tensor};

/// Neck and head sizes and the LEWEL flags.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LewelConfig {
    pub arch: Arch,
    /// Hidden width of every MLP (4096).
    pub hid: usize,
    /// Output width D (256).
    pub dim: usize,
    pub heads: usize,
    pub scale: f32,
    pub loss_weight: f64,
}

impl LewelConfig {
    /// The official sizes (hid 4096, dim 256), divided by the architecture's width divisor.
    pub fn new(arch: Arch, heads: usize, scale: f32, loss_weight: f64) -> LewelConfig {
        LewelConfig {
            arch,
            hid: 4096 / arch.div,
            dim: 256 / arch.div,
            heads,
            scale,
            loss_weight,
        }
    }
    /// Reads the architecture off a state's names and shapes (depth from the bottleneck's conv3, width
    /// from conv1, hid and dim from the neck); `what` names the file in errors.
    pub fn infer(
        t: &crate::checkpoint::Tensors,
        heads: usize,
        scale: f32,
        loss_weight: f64,
        what: &str,
    ) -> crate::Result<LewelConfig> {
        let shape = |n: &str| -> crate::Result<&Vec<usize>> {
            t.get(n).map(|o| &o.shape).ok_or_else(|| {
                crate::Error::user(format!("{what}: no tensor {n}: not a LEWEL state"))
            })
        };
        let arch = Arch::infer(t, "online_net.backbone.", what).map_err(|_| {
            crate::Error::user(format!(
                "{what}: no usable online_net.backbone.conv1.weight: not a LEWEL state"
            ))
        })?;
        // The neck's two linears, [hid, C, 1] and [dim, hid, 1] (Conv1d): checked whole, so that
        // hid and dim are sizes the file holds data for, not just numbers in its header.
        let linear = |n: &str, i: usize| -> crate::Result<usize> {
            match shape(n)?[..] {
                [o, c, 1] if o > 0 && c == i => Ok(o),
                ref s => Err(crate::Error::user(format!(
                    "{what}: {n} has shape {s:?}, expected [out, {i}, 1]: not a LEWEL state of {}",
                    arch.name()
                ))),
            }
        };
        let hid = linear("online_net.neck.proj.mlp.0.weight", arch.out_channels())?;
        let dim = linear("online_net.neck.proj.mlp.3.weight", hid)?;
        let c = LewelConfig {
            arch,
            hid,
            dim,
            heads,
            scale,
            loss_weight,
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the flags a user can set.
    pub fn validate(&self) -> crate::Result<()> {
        let c = self.arch.out_channels();
        if self.heads == 0 || !c.is_multiple_of(self.heads) || !self.dim.is_multiple_of(self.heads)
        {
            return Err(crate::Error::user(format!(
                "--lewel-num-heads: {} must divide the backbone channels {c} and the projection dim {}",
                self.heads, self.dim
            )));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(crate::Error::user(format!(
                "--lewel-scale: must be positive, got {}",
                self.scale
            )));
        }
        if !(0.0..=1.0).contains(&self.loss_weight) {
            return Err(crate::Error::user(format!(
                "--lewel-loss-weight: must lie in [0, 1], got {}",
                self.loss_weight
            )));
        }
        Ok(())
    }
}

/// linear (no bias), BN1d, ReLU, linear (no bias): the official MLP1D with num_mlp = 2.
pub struct Mlp1d {
    l0: ParamId,
    bn: BnLayer,
    l3: ParamId,
}

impl Mlp1d {
    pub fn build<T: Real>(
        s: &mut ParamStore<T>,
        prefix: &str,
        c_in: usize,
        hid: usize,
        out: usize,
        r: &mut Rng,
    ) -> Mlp1d {
        let l0 = linear_weight(s, &format!("{prefix}mlp.0.weight"), hid, c_in, r);
        let bn = bn_layer(s, &format!("{prefix}mlp.1"), hid);
        let l3 = linear_weight(s, &format!("{prefix}mlp.3.weight"), out, hid, r);
        Mlp1d { l0, bn, l3 }
    }
    /// x (..., C_in) -> (..., out); BN over every row.
    pub fn forward<B: Kernels>(&self, g: &mut Graph<B>, x: Tensor, mode: BnMode) -> Tensor {
        let h = g.linear(x, self.l0);
        let h = g.bn_act(h, self.bn, mode, None, true);
        g.linear(h, self.l3)
    }
}

/// Backbone + ObjectNeck.
pub struct EncoderObj {
    pub backbone: ResNet,
    proj: Mlp1d,
    proj_obj: Mlp1d,
    heads: usize,
    scale: f32,
}

impl EncoderObj {
    /// Adds the encoder's tensors under `prefix` ("online_net." or "target_net.").
    pub fn build<T: Real>(
        s: &mut ParamStore<T>,
        prefix: &str,
        c: &LewelConfig,
        r: &mut Rng,
    ) -> EncoderObj {
        let backbone = ResNet::build(s, &format!("{prefix}backbone."), c.arch, r);
        let ch = c.arch.out_channels();
        let proj = Mlp1d::build(s, &format!("{prefix}neck.proj."), ch, c.hid, c.dim, r);
        let proj_obj = Mlp1d::build(s, &format!("{prefix}neck.proj_obj."), ch, c.hid, c.dim, r);
        EncoderObj {
            backbone,
            proj,
            proj_obj,
            heads: c.heads,
            scale: c.scale,
        }
    }

    /// images (B, S, S, 3) -> (z_g (B, D), O (B, K, D)).
    pub fn forward<B: Kernels>(
        &self,
        g: &mut Graph<B>,
        x: Tensor,
        mode: BnMode,
    ) -> (Tensor, Tensor) {
        let f = self.backbone.forward(g, x, mode);
        let d = f.shape.dims().to_vec();
        let (b, l, c) = (d[0], d[1] * d[2], d[3]);
        let pooled = g.avgpool(f);
        let pix = g.reshape(f, Shape::new(&[b, l, c]));
        let u = g.concat_positions(pooled, pix);
        let z = self.proj.forward(g, u, mode);
        let (zg, a) = g.split_positions(z);
        let maps = g.align_maps(a, self.scale);
        let v = g.aggregate(pix, maps, self.heads);
        let o = self.proj_obj.forward(g, v, mode);
        (zg, o)
    }
}

/// Maps a view of the online graph to the target encoder's (z_g, O), computed without gradient
/// elsewhere and placed into the online graph as constants.
pub type TargetFn<'a, G> = dyn FnMut(Tensor, &mut G) -> (Tensor, Tensor) + 'a;

/// The online side: encoder and both predictors, in one store.
pub struct LewelOnline {
    pub cfg: LewelConfig,
    pub encoder: EncoderObj,
    predictor: Mlp1d,
    predictor_obj: Mlp1d,
}

impl LewelOnline {
    pub fn build<T: Real>(s: &mut ParamStore<T>, cfg: &LewelConfig, r: &mut Rng) -> LewelOnline {
        let encoder = EncoderObj::build(s, "online_net.", cfg, r);
        let predictor = Mlp1d::build(s, "predictor.", cfg.dim, cfg.hid, cfg.dim, r);
        let predictor_obj = Mlp1d::build(s, "predictor_obj.", cfg.dim, cfg.hid, cfg.dim, r);
        LewelOnline {
            cfg: *cfg,
            encoder,
            predictor,
            predictor_obj,
        }
    }

    /// One direction: online outputs of view a against the target outputs of view b (constants).
    fn direction<B: Kernels>(
        &self,
        g: &mut Graph<B>,
        z: Tensor,
        o: Tensor,
        tz: Tensor,
        to: Tensor,
        mode: BnMode,
    ) -> Tensor {
        let p = self.predictor.forward(g, z, mode);
        let inst = g.loss(p, tz);
        let q = self.predictor_obj.forward(g, o, mode);
        let obj = g.loss(q, to);
        let w = self.cfg.loss_weight;
        let inst = g.scale(inst, w);
        let obj = g.scale(obj, 1.0 - w);
        g.add(inst, obj)
    }

    /// The LEWEL loss of two views. `target` maps a view to the target encoder's (z_g, O) values,
    /// computed elsewhere without gradient; the order of calls is the official one: online(v1),
    /// online(v2), target(v1), target(v2), then the two directions.
    pub fn loss<B: Kernels>(
        &self,
        g: &mut Graph<B>,
        v1: Tensor,
        v2: Tensor,
        mode: BnMode,
        target: &mut TargetFn<'_, Graph<B>>,
    ) -> Tensor {
        let (z1, o1) = self.encoder.forward(g, v1, mode);
        let (z2, o2) = self.encoder.forward(g, v2, mode);
        let (t1z, t1o) = target(v1, g);
        let (t2z, t2o) = target(v2, g);
        let a = self.direction(g, z1, o1, t2z, t2o, mode);
        let b = self.direction(g, z2, o2, t1z, t1o, mode);
        g.add(a, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::graph::Graph;

    fn count(s: &ParamStore<f32>, prefix: &str) -> usize {
        s.table
            .entries
            .iter()
            .filter(|e| e.name.starts_with(prefix))
            .map(|e| e.shape.numel())
            .sum()
    }

    /// Found by fuzzing (fuzz/seeds/checkpoint/bad-lewel-*.safetensors): a neck weight stored as a
    /// scalar panicked (its shape indexed at 0), and one of shape [2^40, 0, 1] (no data, so a valid
    /// file of a few hundred bytes) set hid to 2^40 and the model built from it tried to allocate
    /// terabytes. Both are one-line errors now, and a real state still infers.
    #[test]
    fn infer_refuses_neck_shapes_the_file_does_not_hold() {
        use crate::checkpoint::{Owned, Tensors};
        let arch = Arch { depth: 18, div: 64 };
        let mut s = ParamStore::<f32>::new();
        let c = LewelConfig::new(arch, 1, 1.0, 0.5);
        EncoderObj::build(&mut s, "online_net.", &c, &mut Rng::new(0));
        let good = crate::checkpoint::store_tensors(&s);
        assert_eq!(LewelConfig::infer(&good, 1, 1.0, 0.5, "s").unwrap(), c);
        let with = |name: &str, shape: Vec<usize>| -> Tensors {
            let mut t = good.clone();
            let n = shape.iter().product::<usize>();
            t.insert(name.into(), Owned::f32(shape, &vec![0.0; n]));
            t
        };
        let (l0, l3) = (
            "online_net.neck.proj.mlp.0.weight",
            "online_net.neck.proj.mlp.3.weight",
        );
        for (t, want) in [
            (
                with(l0, vec![]),
                format!("s: {l0} has shape [], expected [out, 8, 1]"),
            ),
            (
                with(l0, vec![1 << 40, 0, 1]),
                format!("s: {l0} has shape [1099511627776, 0, 1], expected [out, 8, 1]"),
            ),
            (
                with(l0, vec![0, 8, 1]),
                format!("s: {l0} has shape [0, 8, 1]"),
            ),
            (
                with(l3, vec![4, 64]),
                format!("s: {l3} has shape [4, 64], expected [out, 64, 1]"),
            ),
            (
                with(l3, vec![1 << 40, 0, 1]),
                format!("s: {l3} has shape [1099511627776, 0, 1], expected [out, 64, 1]"),
            ),
        ] {
            let e = LewelConfig::infer(&t, 1, 1.0, 0.5, "s").unwrap_err();
            let m = e.to_string();
            assert!(
                m.starts_with(&want) && m.ends_with("not a LEWEL state of resnet18/64"),
                "{m}"
            );
            assert_eq!(e.exit_code(), 2);
        }
    }

    #[test]
    fn resnet50_lewel_parameter_counts_match_the_spec() {
        let cfg = LewelConfig::new(Arch::RESNET50, 4, 1.0, 0.5);
        let mut s = ParamStore::<f32>::new();
        LewelOnline::build(&mut s, &cfg, &mut Rng::new(1));
        // LEWEL_SPEC section 10.
        assert_eq!(count(&s, "online_net."), 42_398_784);
        assert_eq!(count(&s, "predictor"), 4_210_688);
        assert_eq!(s.num_params(), 46_609_472);
        // state-dict entries of online_net: params + buffers + counters = 332.
        let bufs = s
            .buffer_table
            .entries
            .iter()
            .filter(|e| e.name.starts_with("online_net."))
            .count();
        let cnt = s
            .counters
            .iter()
            .filter(|(n, _)| n.starts_with("online_net."))
            .count();
        let params = s
            .table
            .entries
            .iter()
            .filter(|e| e.name.starts_with("online_net."))
            .count();
        assert_eq!(params + bufs + cnt, 332);
        // Kaiming fan_out of the neck: 2048 -> 4096 has std sqrt(2/4096).
        let i = s.table.find("online_net.neck.proj.mlp.0.weight").unwrap();
        let w = &s.params[s.table.range(i)];
        let std = (w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        assert!((std - (2.0f64 / 4096.0).sqrt()).abs() < 2e-4, "{std}");
    }

    #[test]
    fn initial_loss_is_about_four() {
        let cfg = LewelConfig::new(Arch::TINY, 4, 1.0, 0.5);
        let mut s = ParamStore::<f32>::new();
        let online = LewelOnline::build(&mut s, &cfg, &mut Rng::new(2));
        let mut ts = ParamStore::<f32>::new();
        let target = EncoderObj::build(&mut ts, "target_net.", &cfg, &mut Rng::new(3));
        let mut tg = Graph::cpu(ts);
        tg.set_recording(false);
        let mut g = Graph::cpu(s);
        let mut r = Rng::new(4);
        let b = 4;
        let img: Vec<f32> = (0..2 * b * 32 * 32 * 3)
            .map(|_| r.normal() as f32)
            .collect();
        let (h1, h2) = img.split_at(b * 32 * 32 * 3);
        let sh = Shape::new(&[b, 32, 32, 3]);
        let v1 = g.input(sh, h1);
        let v2 = g.input(sh, h2);
        let mut run_target = |v: Tensor, og: &mut Graph<Cpu<f32>>| {
            tg.reset();
            let x = tg.input(v.shape, og.value(v));
            let (z, o) = target.forward(&mut tg, x, BnMode::Eval);
            (
                og.input(z.shape, tg.value(z)),
                og.input(o.shape, tg.value(o)),
            )
        };
        let loss = online.loss(&mut g, v1, v2, BnMode::Train, &mut run_target);
        let l = g.value(loss)[0];
        assert!((l - 4.0).abs() < 0.6, "initial loss {l}");
        g.backward(loss).unwrap();
        let gi = g
            .store
            .table
            .find("online_net.backbone.conv1.weight")
            .unwrap();
        assert!(g.store.grads[g.store.table.range(gi)]
            .iter()
            .any(|v| *v != 0.0));
    }

    #[test]
    fn bad_heads_are_user_errors() {
        let e = LewelConfig::new(Arch::RESNET50, 3, 1.0, 0.5)
            .validate()
            .unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().starts_with("--lewel-num-heads"));
        assert!(LewelConfig::new(Arch::RESNET50, 4, 1.0, 0.5)
            .validate()
            .is_ok());
    }
}
