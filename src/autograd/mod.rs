//! The tape. Forward calls on a [`Graph`] compute an op, write its output into the activation arena and
//! record a [`Node`]; `backward` replays the nodes in reverse, adding into activation gradients (zeroed
//! first) and parameter gradients. No op math lives here: every node calls its op's CPU reference.
//! Forward without recording (`set_recording(false)`) serves the EMA target and evaluation.

pub mod cuda;

use crate::memory::{pair_mut, Arena, BufferId, CounterId, ParamId, ParamStore};
use crate::ops::{self, Real};
use crate::tensor::{Shape, Tensor};

use ops::aggregate::AggregateParams;
use ops::batchnorm::BnParams;
use ops::concat::ConcatParams;
use ops::conv::ConvParams;
use ops::l2norm::L2NormParams;
use ops::linear::LinearParams;
use ops::loss::LossParams;
use ops::pool::PoolParams;
use ops::softmax::SoftmaxParams;

/// A batch-norm layer's handles: affine parameters, running statistics, batch counter.
#[derive(Clone, Copy, Debug)]
pub struct BnLayer {
    pub gamma: ParamId,
    pub beta: ParamId,
    pub running_mean: BufferId,
    pub running_var: BufferId,
    pub num_batches_tracked: CounterId,
}

/// Batch statistics (train) or running statistics (eval).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BnMode {
    Train,
    /// Train with statistics per group of this many samples ("ghost" batch norm).
    TrainGhost(usize),
    Eval,
}

/// One recorded op: its inputs, outputs, saved tensors and params.
#[derive(Clone, Debug)]
pub enum Node {
    Conv {
        x: Tensor,
        w: ParamId,
        y: Tensor,
        p: ConvParams,
    },
    BnTrain {
        x: Tensor,
        y: Tensor,
        bn: BnLayer,
        saved: Tensor,
        p: BnParams,
    },
    BnEval {
        x: Tensor,
        y: Tensor,
        bn: BnLayer,
        p: BnParams,
    },
    Relu {
        x: Tensor,
        y: Tensor,
    },
    Add {
        a: Tensor,
        b: Tensor,
        y: Tensor,
    },
    Scale {
        x: Tensor,
        y: Tensor,
        alpha: f64,
    },
    MaxPool {
        x: Tensor,
        y: Tensor,
        argmax: Tensor,
        p: PoolParams,
    },
    AvgPool {
        x: Tensor,
        y: Tensor,
        p: PoolParams,
    },
    Linear {
        x: Tensor,
        w: ParamId,
        y: Tensor,
        p: LinearParams,
    },
    Concat {
        g: Tensor,
        x: Tensor,
        u: Tensor,
        p: ConcatParams,
    },
    Split {
        z: Tensor,
        zg: Tensor,
        a: Tensor,
        p: ConcatParams,
    },
    L2Norm {
        x: Tensor,
        y: Tensor,
        p: L2NormParams,
    },
    Softmax {
        x: Tensor,
        y: Tensor,
        p: SoftmaxParams,
    },
    Aggregate {
        x: Tensor,
        w: Tensor,
        v: Tensor,
        p: AggregateParams,
    },
    Loss {
        pred: Tensor,
        target: Tensor,
        y: Tensor,
        p: LossParams,
    },
}

/// Parameters, activations and the tape of one model on the CPU.
pub struct Graph<T: Real> {
    pub store: ParamStore<T>,
    arena: Arena<T>,
    tape: Vec<Node>,
    needs_grad: Vec<bool>,
    recording: bool,
}

impl<T: Real> Graph<T> {
    pub fn new(store: ParamStore<T>) -> Self {
        Graph {
            store,
            arena: Arena::new(),
            tape: Vec::new(),
            needs_grad: Vec::new(),
            recording: true,
        }
    }

    /// Forgets all activations and the tape (memory is kept for the next step).
    pub fn reset(&mut self) {
        self.arena.reset();
        self.tape.clear();
        self.needs_grad.clear();
    }

    /// With recording off, ops compute without taping and their outputs take no gradient.
    pub fn set_recording(&mut self, on: bool) {
        self.recording = on;
    }

    pub fn tape(&self) -> &[Node] {
        &self.tape
    }

    /// Most activation elements held at once.
    pub fn peak_activation_elems(&self) -> usize {
        self.arena.peak_elems()
    }

    pub fn value(&self, t: Tensor) -> &[T] {
        self.arena.val(t.slot)
    }

    /// Gradient of an activation after `backward` (empty if it took none).
    pub fn grad(&self, t: Tensor) -> &[T] {
        self.arena.grad(t.slot)
    }

    fn alloc(&mut self, shape: Shape, needs_grad: bool) -> Tensor {
        let slot = self.arena.alloc(shape.numel());
        self.needs_grad.push(needs_grad && self.recording);
        debug_assert_eq!(self.needs_grad.len(), self.arena.live());
        Tensor { slot, shape }
    }

    fn ng(&self, t: Tensor) -> bool {
        self.needs_grad[t.slot as usize]
    }

    fn record(&mut self, n: Node) {
        if self.recording {
            self.tape.push(n);
        }
    }

    /// A constant input (images, targets): no gradient.
    pub fn input(&mut self, shape: Shape, data: &[T]) -> Tensor {
        assert_eq!(
            data.len(),
            shape.numel(),
            "input: {} values for shape {shape}",
            data.len()
        );
        let t = self.alloc(shape, false);
        self.arena.val_mut(t.slot).copy_from_slice(data);
        t
    }

    /// The same memory seen with another shape of equal size.
    pub fn reshape(&self, t: Tensor, shape: Shape) -> Tensor {
        assert_eq!(t.numel(), shape.numel(), "reshape: {} to {shape}", t.shape);
        Tensor {
            slot: t.slot,
            shape,
        }
    }

    // ------------------------------------------------------------------------
    // Ops

    /// x (N, H, W, C) conv w (O, k, k, C), stride, pad -> (N, Ho, Wo, O).
    pub fn conv2d(&mut self, x: Tensor, w: ParamId, stride: usize, pad: usize) -> Tensor {
        let ws = self.store.shape(w);
        let [n, h, wd, c] = dims4("conv2d", x.shape);
        assert!(
            ws.rank() == 4 && ws.dim(3) == c && ws.dim(1) == ws.dim(2),
            "conv2d: weight {ws} for input {}",
            x.shape
        );
        let p = ConvParams::new(n, h, wd, c, ws.dim(0), ws.dim(1), stride, pad);
        let y = self.alloc(
            Shape::new(&[n, p.h_out as usize, p.w_out as usize, ws.dim(0)]),
            true,
        );
        let mut yv = self.arena.take(y.slot);
        ops::conv::forward_cpu(self.arena.val(x.slot), self.store.param(w), &mut yv, &p);
        self.arena.put(y.slot, yv);
        self.record(Node::Conv { x, w, y, p });
        y
    }

    /// Batch norm over every axis but the last (channels).
    pub fn batchnorm(&mut self, x: Tensor, bn: BnLayer, mode: BnMode) -> Tensor {
        let c = x.shape.dim(-1);
        let rows = x.numel() / c;
        let per_sample = rows / x.shape.dim(0);
        let mut p = BnParams::new(rows, c);
        let y = self.alloc(x.shape, true);
        let mut yv = self.arena.take(y.slot);
        let st = &mut self.store;
        let (gamma, beta) = (st.table.range(bn.gamma.0), st.table.range(bn.beta.0));
        match mode {
            BnMode::Eval => {
                let (rm, rv) = (st.buffer(bn.running_mean), st.buffer(bn.running_var));
                let (g, b) = (&st.params[gamma], &st.params[beta]);
                ops::batchnorm::forward_eval_cpu(self.arena.val(x.slot), g, b, rm, rv, &mut yv, &p);
                self.arena.put(y.slot, yv);
                self.record(Node::BnEval { x, y, bn, p });
            }
            BnMode::Train | BnMode::TrainGhost(_) => {
                if let BnMode::TrainGhost(samples) = mode {
                    p = p.ghost(samples * per_sample);
                }
                let saved = self.alloc(Shape::new(&[2, p.groups(), c]), false);
                let mut sv = self.arena.take(saved.slot);
                let (mean, rstd) = sv.split_at_mut(p.groups() * c);
                let st = &mut self.store;
                let (rm, rv) = (
                    st.buffer_table.range(bn.running_mean.0),
                    st.buffer_table.range(bn.running_var.0),
                );
                let (rm_s, rv_s) = pair_mut(&mut st.buffers, rm, rv);
                let (g, be) = (&st.params[gamma], &st.params[beta]);
                ops::batchnorm::forward_train_cpu(
                    self.arena.val(x.slot),
                    g,
                    be,
                    &mut yv,
                    mean,
                    rstd,
                    rm_s,
                    rv_s,
                    &p,
                );
                st.counters[bn.num_batches_tracked.0].1 += 1;
                self.arena.put(y.slot, yv);
                self.arena.put(saved.slot, sv);
                self.record(Node::BnTrain { x, y, bn, saved, p });
            }
        }
        y
    }

    pub fn relu(&mut self, x: Tensor) -> Tensor {
        let y = self.alloc(x.shape, self.ng(x));
        let mut yv = self.arena.take(y.slot);
        ops::relu::forward_cpu(self.arena.val(x.slot), &mut yv);
        self.arena.put(y.slot, yv);
        self.record(Node::Relu { x, y });
        y
    }

    pub fn add(&mut self, a: Tensor, b: Tensor) -> Tensor {
        assert_eq!(a.shape, b.shape, "add: {} + {}", a.shape, b.shape);
        let y = self.alloc(a.shape, self.ng(a) || self.ng(b));
        let mut yv = self.arena.take(y.slot);
        ops::add::forward_cpu(self.arena.val(a.slot), self.arena.val(b.slot), &mut yv);
        self.arena.put(y.slot, yv);
        self.record(Node::Add { a, b, y });
        y
    }

    /// alpha * x.
    pub fn scale(&mut self, x: Tensor, alpha: f64) -> Tensor {
        let y = self.alloc(x.shape, self.ng(x));
        let mut yv = self.arena.take(y.slot);
        ops::add::scale_forward_cpu(self.arena.val(x.slot), T::from_f64(alpha), &mut yv);
        self.arena.put(y.slot, yv);
        self.record(Node::Scale { x, y, alpha });
        y
    }

    /// Max pooling k x k, stride, pad on (N, H, W, C).
    pub fn maxpool(&mut self, x: Tensor, k: usize, stride: usize, pad: usize) -> Tensor {
        let [n, h, w, c] = dims4("maxpool", x.shape);
        let p = PoolParams::max(n, h, w, c, k, stride, pad);
        let shape = Shape::new(&[n, p.h_out as usize, p.w_out as usize, c]);
        let y = self.alloc(shape, self.ng(x));
        let argmax = self.alloc(shape, false);
        let (mut yv, mut av) = (self.arena.take(y.slot), self.arena.take(argmax.slot));
        ops::pool::maxpool_forward_cpu(self.arena.val(x.slot), &mut yv, &mut av, &p);
        self.arena.put(y.slot, yv);
        self.arena.put(argmax.slot, av);
        self.record(Node::MaxPool { x, y, argmax, p });
        y
    }

    /// Global average pool: (N, H, W, C) -> (N, C).
    pub fn avgpool(&mut self, x: Tensor) -> Tensor {
        let [n, h, w, c] = dims4("avgpool", x.shape);
        let p = PoolParams::global_avg(n, h, w, c);
        let y = self.alloc(Shape::new(&[n, c]), self.ng(x));
        let mut yv = self.arena.take(y.slot);
        ops::pool::avgpool_forward_cpu(self.arena.val(x.slot), &mut yv, &p);
        self.arena.put(y.slot, yv);
        self.record(Node::AvgPool { x, y, p });
        y
    }

    /// Linear map of the last axis: (..., I) -> (..., O) with w (O, I).
    pub fn linear(&mut self, x: Tensor, w: ParamId) -> Tensor {
        let ws = self.store.shape(w);
        let ci = x.shape.dim(-1);
        assert!(
            ws.rank() == 2 && ws.dim(1) == ci,
            "linear: weight {ws} for input {}",
            x.shape
        );
        let rows = x.numel() / ci;
        let p = LinearParams::new(rows, ci, ws.dim(0));
        let mut d = x.shape.dims().to_vec();
        *d.last_mut().unwrap() = ws.dim(0);
        let y = self.alloc(Shape::new(&d), true);
        let mut yv = self.arena.take(y.slot);
        ops::linear::forward_cpu(self.arena.val(x.slot), self.store.param(w), &mut yv, &p);
        self.arena.put(y.slot, yv);
        self.record(Node::Linear { x, w, y, p });
        y
    }

    /// [g (B, C); x (B, L, C)] along positions -> (B, 1+L, C).
    pub fn concat_positions(&mut self, g: Tensor, x: Tensor) -> Tensor {
        let (b, c) = (g.shape.dim(0), g.shape.dim(-1));
        assert!(
            g.numel() == b * c && x.shape.dim(0) == b && x.shape.dim(-1) == c,
            "concat: {} and {}",
            g.shape,
            x.shape
        );
        let l = x.numel() / (b * c);
        let p = ConcatParams::new(b, l, c);
        let u = self.alloc(Shape::new(&[b, 1 + l, c]), self.ng(g) || self.ng(x));
        let mut uv = self.arena.take(u.slot);
        ops::concat::concat_cpu(self.arena.val(g.slot), self.arena.val(x.slot), &mut uv, &p);
        self.arena.put(u.slot, uv);
        self.record(Node::Concat { g, x, u, p });
        u
    }

    /// z (B, 1+L, D) -> (z_g (B, D), a (B, L, D)).
    pub fn split_positions(&mut self, z: Tensor) -> (Tensor, Tensor) {
        let [b, l1, d] = dims3("split", z.shape);
        let p = ConcatParams::new(b, l1 - 1, d);
        let zg = self.alloc(Shape::new(&[b, d]), self.ng(z));
        let a = self.alloc(Shape::new(&[b, l1 - 1, d]), self.ng(z));
        let (mut gv, mut av) = (self.arena.take(zg.slot), self.arena.take(a.slot));
        ops::concat::split_cpu(self.arena.val(z.slot), &mut gv, &mut av, &p);
        self.arena.put(zg.slot, gv);
        self.arena.put(a.slot, av);
        self.record(Node::Split { z, zg, a, p });
        (zg, a)
    }

    /// Each row (last axis) divided by its L2 norm and by `scale`.
    pub fn l2norm(&mut self, x: Tensor, scale: f32) -> Tensor {
        let d = x.shape.dim(-1);
        let p = L2NormParams::new(x.numel() / d, d, scale);
        let y = self.alloc(x.shape, self.ng(x));
        let mut yv = self.arena.take(y.slot);
        ops::l2norm::forward_cpu(self.arena.val(x.slot), &mut yv, &p);
        self.arena.put(y.slot, yv);
        self.record(Node::L2Norm { x, y, p });
        y
    }

    /// Softmax over positions of (B, L, D), per sample and channel.
    pub fn softmax_positions(&mut self, x: Tensor) -> Tensor {
        let [b, l, d] = dims3("softmax", x.shape);
        let p = SoftmaxParams::new(b, l, d);
        let y = self.alloc(x.shape, self.ng(x));
        let mut yv = self.arena.take(y.slot);
        ops::softmax::forward_cpu(self.arena.val(x.slot), &mut yv, &p);
        self.arena.put(y.slot, yv);
        self.record(Node::Softmax { x, y, p });
        y
    }

    /// Head-split aggregation of x (B, L, C) by maps w (B, L, D) -> (B, D/heads, C).
    pub fn aggregate(&mut self, x: Tensor, w: Tensor, heads: usize) -> Tensor {
        let [b, l, c] = dims3("aggregate", x.shape);
        let [b2, l2, d] = dims3("aggregate", w.shape);
        assert!(
            b == b2 && l == l2,
            "aggregate: x {} vs maps {}",
            x.shape,
            w.shape
        );
        let p = AggregateParams::new(b, l, c, d, heads);
        let v = self.alloc(Shape::new(&[b, d / heads, c]), self.ng(x) || self.ng(w));
        let mut vv = self.arena.take(v.slot);
        ops::aggregate::forward_cpu(self.arena.val(x.slot), self.arena.val(w.slot), &mut vv, &p);
        self.arena.put(v.slot, vv);
        self.record(Node::Aggregate { x, w, v, p });
        v
    }

    /// Normalized MSE of pred rows against target rows (last axis = features) -> scalar.
    /// The target takes no gradient.
    pub fn loss(&mut self, pred: Tensor, target: Tensor) -> Tensor {
        assert_eq!(
            pred.numel(),
            target.numel(),
            "loss: pred {} vs target {}",
            pred.shape,
            target.shape
        );
        let d = pred.shape.dim(-1);
        let p = LossParams::new(pred.numel() / d, d);
        let y = self.alloc(Shape::scalar(), self.ng(pred));
        let v = ops::loss::forward_cpu(self.arena.val(pred.slot), self.arena.val(target.slot), &p);
        self.arena.val_mut(y.slot)[0] = v;
        self.record(Node::Loss { pred, target, y, p });
        y
    }

    // ------------------------------------------------------------------------
    // Backward

    /// d(out)/d(everything): zeroes activation gradients, seeds d out = 1, replays the tape in
    /// reverse. Parameter gradients accumulate (+=) into `store.grads`.
    pub fn backward(&mut self, out: Tensor) {
        assert_eq!(
            out.numel(),
            1,
            "backward: output must be a scalar, got {}",
            out.shape
        );
        self.arena.zero_grads();
        self.arena.seed_grad(out.slot);
        let tape = std::mem::take(&mut self.tape);
        for node in tape.iter().rev() {
            self.backward_node(node);
        }
        self.tape = tape;
    }

    fn backward_node(&mut self, node: &Node) {
        let ar = &mut self.arena;
        let st = &mut self.store;
        let ng = &self.needs_grad;
        let need = |t: &Tensor| ng[t.slot as usize];
        match *node {
            Node::Conv { x, w, y, p } => {
                let r = st.table.range(w.0);
                ops::conv::backward_weight_cpu(
                    ar.val(x.slot),
                    ar.grad(y.slot),
                    &mut st.grads[r.clone()],
                    &p,
                );
                if need(&x) {
                    let mut dx = ar.take_grad(x.slot);
                    ops::conv::backward_data_cpu(ar.grad(y.slot), &st.params[r], &mut dx, &p);
                    ar.put_grad(x.slot, dx);
                }
            }
            Node::BnTrain { x, y, bn, saved, p } => {
                // dx is computed even when x takes no gradient: gamma and beta need the same pass.
                let mut dx = ar.take_grad(x.slot);
                let (mean, rstd) = ar.val(saved.slot).split_at(p.groups() * p.c as usize);
                let (gr, br) = (st.table.range(bn.gamma.0), st.table.range(bn.beta.0));
                let (dg, db) = pair_mut(&mut st.grads, gr.clone(), br);
                let (x_v, dy) = (ar.val(x.slot), ar.grad(y.slot));
                ops::batchnorm::backward_train_cpu(
                    x_v,
                    dy,
                    &st.params[gr],
                    mean,
                    rstd,
                    &mut dx,
                    dg,
                    db,
                    &p,
                );
                ar.put_grad(x.slot, dx);
            }
            Node::BnEval { x, y, bn, p } => {
                let mut dx = ar.take_grad(x.slot);
                let (gr, br) = (st.table.range(bn.gamma.0), st.table.range(bn.beta.0));
                let (rm, rv) = (
                    st.buffer_table.range(bn.running_mean.0),
                    st.buffer_table.range(bn.running_var.0),
                );
                let (dg, db) = pair_mut(&mut st.grads, gr.clone(), br);
                let (x_v, dy) = (ar.val(x.slot), ar.grad(y.slot));
                let (rm, rv) = (&st.buffers[rm], &st.buffers[rv]);
                ops::batchnorm::backward_eval_cpu(
                    x_v,
                    dy,
                    &st.params[gr],
                    rm,
                    rv,
                    &mut dx,
                    dg,
                    db,
                    &p,
                );
                ar.put_grad(x.slot, dx);
            }
            Node::Relu { x, y } => {
                if need(&x) {
                    let mut dx = ar.take_grad(x.slot);
                    ops::relu::backward_cpu(ar.val(y.slot), ar.grad(y.slot), &mut dx);
                    ar.put_grad(x.slot, dx);
                }
            }
            Node::Add { a, b, y } => {
                for t in [a, b] {
                    if need(&t) {
                        let mut dt = ar.take_grad(t.slot);
                        ops::add::backward_cpu(ar.grad(y.slot), &mut dt);
                        ar.put_grad(t.slot, dt);
                    }
                }
            }
            Node::Scale { x, y, alpha } => {
                if need(&x) {
                    let mut dx = ar.take_grad(x.slot);
                    ops::add::scale_backward_cpu(ar.grad(y.slot), T::from_f64(alpha), &mut dx);
                    ar.put_grad(x.slot, dx);
                }
            }
            Node::MaxPool { x, y, argmax, p } => {
                if need(&x) {
                    let mut dx = ar.take_grad(x.slot);
                    ops::pool::maxpool_backward_cpu(
                        ar.grad(y.slot),
                        ar.val(argmax.slot),
                        &mut dx,
                        &p,
                    );
                    ar.put_grad(x.slot, dx);
                }
            }
            Node::AvgPool { x, y, p } => {
                if need(&x) {
                    let mut dx = ar.take_grad(x.slot);
                    ops::pool::avgpool_backward_cpu(ar.grad(y.slot), &mut dx, &p);
                    ar.put_grad(x.slot, dx);
                }
            }
            Node::Linear { x, w, y, p } => {
                let r = st.table.range(w.0);
                ops::linear::backward_weight_cpu(
                    ar.val(x.slot),
                    ar.grad(y.slot),
                    &mut st.grads[r.clone()],
                    &p,
                );
                if need(&x) {
                    let mut dx = ar.take_grad(x.slot);
                    ops::linear::backward_data_cpu(ar.grad(y.slot), &st.params[r], &mut dx, &p);
                    ar.put_grad(x.slot, dx);
                }
            }
            Node::Concat { g, x, u, p } => {
                let (mut dg, mut dx) = (ar.take_grad(g.slot), ar.take_grad(x.slot));
                ops::concat::concat_backward_cpu(ar.grad(u.slot), &mut dg, &mut dx, &p);
                ar.put_grad(g.slot, dg);
                ar.put_grad(x.slot, dx);
            }
            Node::Split { z, zg, a, p } => {
                if need(&z) {
                    let mut dz = ar.take_grad(z.slot);
                    ops::concat::split_backward_cpu(ar.grad(zg.slot), ar.grad(a.slot), &mut dz, &p);
                    ar.put_grad(z.slot, dz);
                }
            }
            Node::L2Norm { x, y, p } => {
                if need(&x) {
                    let mut dx = ar.take_grad(x.slot);
                    ops::l2norm::backward_cpu(ar.val(x.slot), ar.grad(y.slot), &mut dx, &p);
                    ar.put_grad(x.slot, dx);
                }
            }
            Node::Softmax { x, y, p } => {
                if need(&x) {
                    let mut dx = ar.take_grad(x.slot);
                    ops::softmax::backward_cpu(ar.val(y.slot), ar.grad(y.slot), &mut dx, &p);
                    ar.put_grad(x.slot, dx);
                }
            }
            Node::Aggregate { x, w, v, p } => {
                let (mut dx, mut dw) = (ar.take_grad(x.slot), ar.take_grad(w.slot));
                ops::aggregate::backward_cpu(
                    ar.val(x.slot),
                    ar.val(w.slot),
                    ar.grad(v.slot),
                    &mut dx,
                    &mut dw,
                    &p,
                );
                ar.put_grad(x.slot, dx);
                ar.put_grad(w.slot, dw);
            }
            Node::Loss { pred, target, y, p } => {
                if need(&pred) {
                    let mut dp = ar.take_grad(pred.slot);
                    let g = ar.grad(y.slot)[0];
                    ops::loss::backward_cpu(ar.val(pred.slot), ar.val(target.slot), g, &mut dp, &p);
                    ar.put_grad(pred.slot, dp);
                }
            }
        }
    }
}

/// The ops the models are written against. The CPU [`Graph`] and the GPU graph
/// (`autograd::cuda::DevGraph`) both implement it, so one model definition serves both; the GPU fuses
/// what the trait groups (batch norm with its residual add and ReLU, the alignment map), the CPU
/// records the same math as separate nodes.
pub trait Tape {
    fn param_shape(&self, w: ParamId) -> Shape;
    /// The same tensor seen with another shape of equal size.
    fn reshape(&self, t: Tensor, shape: Shape) -> Tensor;
    fn conv2d(&mut self, x: Tensor, w: ParamId, stride: usize, pad: usize) -> Tensor;
    /// relu?(batchnorm(x) + res?).
    fn bn_act(
        &mut self,
        x: Tensor,
        bn: BnLayer,
        mode: BnMode,
        res: Option<Tensor>,
        relu: bool,
    ) -> Tensor;
    fn maxpool(&mut self, x: Tensor, k: usize, stride: usize, pad: usize) -> Tensor;
    fn avgpool(&mut self, x: Tensor) -> Tensor;
    fn linear(&mut self, x: Tensor, w: ParamId) -> Tensor;
    fn concat_positions(&mut self, g: Tensor, x: Tensor) -> Tensor;
    fn split_positions(&mut self, z: Tensor) -> (Tensor, Tensor);
    /// LEWEL's alignment maps of a (B, L, D): softmax over positions of each row divided by its L2
    /// norm and by `scale`.
    fn align_maps(&mut self, a: Tensor, scale: f32) -> Tensor;
    fn aggregate(&mut self, x: Tensor, w: Tensor, heads: usize) -> Tensor;
    fn loss(&mut self, pred: Tensor, target: Tensor) -> Tensor;
    fn scale(&mut self, x: Tensor, alpha: f64) -> Tensor;
    fn add(&mut self, a: Tensor, b: Tensor) -> Tensor;
}

impl<T: Real> Tape for Graph<T> {
    fn param_shape(&self, w: ParamId) -> Shape {
        self.store.shape(w)
    }
    fn reshape(&self, t: Tensor, shape: Shape) -> Tensor {
        Graph::reshape(self, t, shape)
    }
    fn conv2d(&mut self, x: Tensor, w: ParamId, stride: usize, pad: usize) -> Tensor {
        Graph::conv2d(self, x, w, stride, pad)
    }
    fn bn_act(
        &mut self,
        x: Tensor,
        bn: BnLayer,
        mode: BnMode,
        res: Option<Tensor>,
        relu: bool,
    ) -> Tensor {
        let mut y = self.batchnorm(x, bn, mode);
        if let Some(r) = res {
            y = Graph::add(self, y, r);
        }
        if relu {
            y = self.relu(y);
        }
        y
    }
    fn maxpool(&mut self, x: Tensor, k: usize, stride: usize, pad: usize) -> Tensor {
        Graph::maxpool(self, x, k, stride, pad)
    }
    fn avgpool(&mut self, x: Tensor) -> Tensor {
        Graph::avgpool(self, x)
    }
    fn linear(&mut self, x: Tensor, w: ParamId) -> Tensor {
        Graph::linear(self, x, w)
    }
    fn concat_positions(&mut self, g: Tensor, x: Tensor) -> Tensor {
        Graph::concat_positions(self, g, x)
    }
    fn split_positions(&mut self, z: Tensor) -> (Tensor, Tensor) {
        Graph::split_positions(self, z)
    }
    fn align_maps(&mut self, a: Tensor, scale: f32) -> Tensor {
        let a = self.l2norm(a, scale);
        self.softmax_positions(a)
    }
    fn aggregate(&mut self, x: Tensor, w: Tensor, heads: usize) -> Tensor {
        Graph::aggregate(self, x, w, heads)
    }
    fn loss(&mut self, pred: Tensor, target: Tensor) -> Tensor {
        Graph::loss(self, pred, target)
    }
    fn scale(&mut self, x: Tensor, alpha: f64) -> Tensor {
        Graph::scale(self, x, alpha)
    }
    fn add(&mut self, a: Tensor, b: Tensor) -> Tensor {
        Graph::add(self, a, b)
    }
}

pub(crate) fn dims4(op: &str, s: Shape) -> [usize; 4] {
    assert_eq!(s.rank(), 4, "{op}: expected (N, H, W, C), got {s}");
    [s.dim(0), s.dim(1), s.dim(2), s.dim(3)]
}

pub(crate) fn dims3(op: &str, s: Shape) -> [usize; 3] {
    assert_eq!(s.rank(), 3, "{op}: expected (B, L, C), got {s}");
    [s.dim(0), s.dim(1), s.dim(2)]
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_ok, check, uniform};
    use crate::rng::Rng;

    struct Net {
        w1: ParamId,
        bn1: BnLayer,
        w2: ParamId,
        bn2: BnLayer,
        proj: ParamId,
        bn3: BnLayer,
        head: ParamId,
    }

    fn bn_layer(s: &mut ParamStore<f64>, name: &str, c: usize) -> BnLayer {
        BnLayer {
            gamma: s.add_param(&format!("{name}.weight"), Shape::new(&[c]), |i| {
                1.0 + 0.1 * i as f64
            }),
            beta: s.add_param(&format!("{name}.bias"), Shape::new(&[c]), |i| {
                0.05 * i as f64
            }),
            running_mean: s.add_buffer(&format!("{name}.running_mean"), Shape::new(&[c]), 0.0),
            running_var: s.add_buffer(&format!("{name}.running_var"), Shape::new(&[c]), 1.0),
            num_batches_tracked: s.add_counter(&format!("{name}.num_batches_tracked")),
        }
    }

    fn build() -> (ParamStore<f64>, Net) {
        let mut s = ParamStore::new();
        let mut r = Rng::new(5);
        let mut init = move |_: usize| r.normal() * 0.5;
        let w1 = s.add_param("conv1.weight", Shape::new(&[4, 3, 3, 2]), &mut init);
        let bn1 = bn_layer(&mut s, "bn1", 4);
        let w2 = s.add_param("conv2.weight", Shape::new(&[4, 1, 1, 4]), &mut init);
        let bn2 = bn_layer(&mut s, "bn2", 4);
        let proj = s.add_param("proj.weight", Shape::new(&[4, 4]), &mut init);
        let bn3 = bn_layer(&mut s, "bn3", 4);
        let head = s.add_param("head.weight", Shape::new(&[3, 4]), &mut init);
        (
            s,
            Net {
                w1,
                bn1,
                w2,
                bn2,
                proj,
                bn3,
                head,
            },
        )
    }

    /// Every kind of node on the tape: a small residual trunk, then a LEWEL-style neck.
    fn forward(g: &mut Graph<f64>, net: &Net, x: &[f64], target: &[f64]) -> Tensor {
        g.reset();
        let b = 2;
        let x = g.input(Shape::new(&[b, 7, 6, 2]), x);
        let h = g.conv2d(x, net.w1, 2, 1); // (2, 4, 3, 4)
        let h = g.batchnorm(h, net.bn1, BnMode::TrainGhost(1));
        let h = g.relu(h);
        let h = g.maxpool(h, 3, 1, 1); // (2, 4, 3, 4)
        let r = g.conv2d(h, net.w2, 1, 0);
        let r = g.batchnorm(r, net.bn2, BnMode::Eval);
        let h = g.add(h, r);
        let fmap = g.relu(h);
        let pooled = g.avgpool(fmap); // (2, 4)
        let pix = g.reshape(fmap, Shape::new(&[b, 12, 4]));
        let u = g.concat_positions(pooled, pix); // (2, 13, 4)
        let z = g.linear(u, net.proj);
        let z = g.batchnorm(z, net.bn3, BnMode::Train);
        let (zg, a) = g.split_positions(z);
        let a = g.l2norm(a, 0.5);
        let maps = g.softmax_positions(a);
        let v = g.aggregate(pix, maps, 2); // (2, 2, 4)
        let o = g.linear(v, net.head); // (2, 2, 3)
        let t = g.input(Shape::new(&[b, 2, 3]), target);
        let l1 = g.loss(o, t);
        let zt = g.input(Shape::new(&[b, 4]), &target[..8]);
        let l2 = g.loss(zg, zt);
        let l2 = g.scale(l2, 0.7);
        g.add(l1, l2)
    }

    #[test]
    fn gradcheck_graph() {
        let (store, net) = build();
        let x = uniform(1, 2 * 7 * 6 * 2, -1.0, 1.0);
        let target = uniform(2, 12, -1.0, 1.0);
        let g = std::cell::RefCell::new(Graph::new(store));
        let params = vec![g.borrow().store.params.clone()];
        let fwd = |ps: &[Vec<f64>]| {
            let mut g = g.borrow_mut();
            g.store.params.copy_from_slice(&ps[0]);
            let out = forward(&mut g, &net, &x, &target);
            g.value(out).to_vec()
        };
        let bwd = |ps: &[Vec<f64>], dy: &[f64]| {
            let mut g = g.borrow_mut();
            g.store.params.copy_from_slice(&ps[0]);
            let out = forward(&mut g, &net, &x, &target);
            g.store.zero_grads();
            g.backward(out);
            vec![Some(g.store.grads.iter().map(|v| v * dy[0]).collect())]
        };
        assert_ok(check("graph", &["params"], &params, &fwd, &bwd));
        let g = g.borrow();
        assert_eq!(g.tape().len(), 21);
        assert!(g
            .store
            .counters
            .iter()
            .any(|(n, c)| n == "bn1.num_batches_tracked" && *c > 0));
        assert!(g
            .store
            .counters
            .iter()
            .any(|(n, c)| n == "bn2.num_batches_tracked" && *c == 0));
    }

    #[test]
    fn no_recording_means_no_tape_and_no_grad() {
        let (store, net) = build();
        let mut g = Graph::new(store);
        g.set_recording(false);
        let x = uniform(1, 2 * 7 * 6 * 2, -1.0, 1.0);
        let target = uniform(2, 12, -1.0, 1.0);
        let out = forward(&mut g, &net, &x, &target);
        assert!(g.tape().is_empty());
        assert!(g.value(out)[0].is_finite());
    }

    #[test]
    fn steps_reuse_activation_memory() {
        let (store, net) = build();
        let mut g = Graph::new(store);
        let x = uniform(1, 2 * 7 * 6 * 2, -1.0, 1.0);
        let target = uniform(2, 12, -1.0, 1.0);
        let out = forward(&mut g, &net, &x, &target);
        g.backward(out);
        let peak = g.peak_activation_elems();
        let first = g.value(out)[0];
        let out = forward(&mut g, &net, &x, &target);
        g.backward(out);
        assert_eq!(g.peak_activation_elems(), peak);
        assert_eq!(g.value(out)[0], first, "same inputs, same loss");
    }
}
