//! The engine demo's network: a small residual conv net (stem, one basic block, a strided stage,
//! global pooling, a linear embedding). It exercises every backbone op of the engine on the CPU in
//! seconds; the LEWEL model replaces it as the main job with the LEWEL issue.

use super::{bn_layer, conv_weight, linear_weight};
use crate::autograd::{BnLayer, BnMode, Graph};
use crate::memory::{ParamId, ParamStore};
use crate::rng::Rng;
use crate::tensor::{Shape, Tensor};

pub struct DemoNet {
    pub width: usize,
    pub embed: usize,
    stem: ParamId,
    bn_stem: BnLayer,
    b1_conv1: ParamId,
    b1_bn1: BnLayer,
    b1_conv2: ParamId,
    b1_bn2: BnLayer,
    down: ParamId,
    bn_down: BnLayer,
    head: ParamId,
}

impl DemoNet {
    /// Builds the parameters into a fresh store.
    pub fn new(width: usize, embed: usize, seed: u64) -> (DemoNet, ParamStore<f32>) {
        let mut s = ParamStore::new();
        let mut r = Rng::keyed(&[seed, 0x1417]);
        let w = width;
        let net = DemoNet {
            width,
            embed,
            stem: conv_weight(&mut s, "conv1.weight", w, 3, 3, &mut r),
            bn_stem: bn_layer(&mut s, "bn1", w),
            b1_conv1: conv_weight(&mut s, "layer1.0.conv1.weight", w, 3, w, &mut r),
            b1_bn1: bn_layer(&mut s, "layer1.0.bn1", w),
            b1_conv2: conv_weight(&mut s, "layer1.0.conv2.weight", w, 3, w, &mut r),
            b1_bn2: bn_layer(&mut s, "layer1.0.bn2", w),
            down: conv_weight(&mut s, "layer2.0.conv1.weight", 2 * w, 3, w, &mut r),
            bn_down: bn_layer(&mut s, "layer2.0.bn1", 2 * w),
            head: linear_weight(&mut s, "head.weight", embed, 2 * w, &mut r),
        };
        (net, s)
    }

    /// images (B, S, S, 3) -> (pooled features (B, 2w), embedding (B, embed)).
    pub fn forward(&self, g: &mut Graph<f32>, images: Tensor, mode: BnMode) -> (Tensor, Tensor) {
        let h = g.conv2d(images, self.stem, 1, 1);
        let h = g.batchnorm(h, self.bn_stem, mode);
        let h = g.relu(h);
        let h = g.maxpool(h, 3, 2, 1);
        // basic block
        let r = g.conv2d(h, self.b1_conv1, 1, 1);
        let r = g.batchnorm(r, self.b1_bn1, mode);
        let r = g.relu(r);
        let r = g.conv2d(r, self.b1_conv2, 1, 1);
        let r = g.batchnorm(r, self.b1_bn2, mode);
        let h = g.add(h, r);
        let h = g.relu(h);
        // strided stage
        let h = g.conv2d(h, self.down, 2, 1);
        let h = g.batchnorm(h, self.bn_down, mode);
        let h = g.relu(h);
        let pooled = g.avgpool(h);
        let emb = g.linear(pooled, self.head);
        (pooled, emb)
    }

    pub fn input_shape(batch: usize, size: usize) -> Shape {
        Shape::new(&[batch, size, size, 3])
    }
}
