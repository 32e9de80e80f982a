//! ResNet-18 and ResNet-50 as torchvision builds them (v1.5: the stride of a downsampling bottleneck on
//! its 3x3 conv), with torchvision's parameter names and init, without avgpool and fc: the forward
//! returns the layer4 map after its final ReLU, (B, H/32, W/32, C). A small configuration keeps the
//! same topology at a fraction of the width for tests and the CPU demo.
//! Init: every conv Kaiming-normal fan_out (std = sqrt(2 / (out * k * k))); BN gamma 1, beta 0; the
//! last BN of each block is not zeroed (LEWEL_SPEC 1).

use super::{bn_layer, conv_weight};
use crate::graph::Kernels;
use crate::graph::{BnLayer, BnMode, Graph};
use crate::memory::{ParamId, ParamStore};
use crate::ops::Real;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// A torchvision ResNet topology at 1/div of the standard widths: stem 64/div, stage widths
/// 64/div .. 512/div. ResNet-50's bottlenecks expand by 4, ResNet-18's basic blocks by 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arch {
    /// 18 or 50.
    pub depth: usize,
    /// Width divisor (1 for the standard networks).
    pub div: usize,
}

impl Arch {
    pub const RESNET18: Arch = Arch { depth: 18, div: 1 };
    pub const RESNET50: Arch = Arch { depth: 50, div: 1 };
    /// ResNet-50 topology at 1/8 width (stem 8, stage widths 8/16/32/64, output 256): tests and the
    /// CPU demo.
    pub const TINY: Arch = Arch { depth: 50, div: 8 };

    /// (blocks per stage, bottleneck?)
    fn layout(self) -> ([usize; 4], bool) {
        match self.depth {
            18 => ([2, 2, 2, 2], false),
            50 => ([3, 4, 6, 3], true),
            d => panic!("Arch: depth {d} (18 or 50)"),
        }
    }
    /// Channels of the returned map.
    pub fn out_channels(self) -> usize {
        let (_, bottleneck) = self.layout();
        512 / self.div * if bottleneck { 4 } else { 1 }
    }
    /// Reads the topology off a state's names and shapes under `prefix` (e.g. "online_net.backbone."):
    /// depth from the bottleneck's conv3, width from conv1. `what` names the file in errors.
    pub fn infer(t: &crate::checkpoint::Tensors, prefix: &str, what: &str) -> crate::Result<Arch> {
        let name = format!("{prefix}conv1.weight");
        let stem = t.get(&name).map(|o| &o.shape).ok_or_else(|| {
            crate::Error::user(format!("{what}: no tensor {name}: not a ResNet state"))
        })?;
        if stem.len() != 4 || stem[0] == 0 || 64 % stem[0] != 0 || stem[1] != 3 {
            return Err(crate::Error::user(format!(
                "{what}: {name} has shape {stem:?}, expected [64/k, 3, 7, 7]"
            )));
        }
        let depth = if t.contains_key(&format!("{prefix}layer1.0.conv3.weight")) {
            50
        } else {
            18
        };
        Ok(Arch {
            depth,
            div: 64 / stem[0],
        })
    }

    pub fn name(self) -> String {
        match (self.depth, self.div) {
            (50, 8) => "tiny".into(),
            (d, 1) => format!("resnet{d}"),
            (d, k) => format!("resnet{d}/{k}"),
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Arch> {
        match s {
            "resnet18" => Ok(Arch::RESNET18),
            "resnet50" => Ok(Arch::RESNET50),
            "tiny" => Ok(Arch::TINY),
            _ => Err(crate::Error::user(format!(
                "--arch: expected resnet50, resnet18 or tiny, got '{s}'"
            ))),
        }
    }
}

/// One residual block: its convs with their BN and stride, and the projection shortcut.
pub struct Block {
    conv: Vec<(ParamId, BnLayer, usize)>,
    downsample: Option<(ParamId, BnLayer)>,
    stride: usize,
}

pub struct ResNet {
    pub arch: Arch,
    stem: (ParamId, BnLayer),
    blocks: Vec<Block>,
}

impl ResNet {
    /// Adds the backbone's tensors to `s`, every name prefixed by `prefix` (e.g. "online_net.backbone.").
    pub fn build<T: Real>(s: &mut ParamStore<T>, prefix: &str, arch: Arch, r: &mut Rng) -> ResNet {
        let (depths, bottleneck) = arch.layout();
        let div = arch.div;
        let stem_c = 64 / div;
        let stem = (
            conv_weight(s, &format!("{prefix}conv1.weight"), stem_c, 7, 3, r),
            bn_layer(s, &format!("{prefix}bn1"), stem_c),
        );
        let expansion = if bottleneck { 4 } else { 1 };
        let mut c_in = stem_c;
        let mut blocks = Vec::new();
        for (li, &n) in depths.iter().enumerate() {
            let width = (64 << li) / div;
            for bi in 0..n {
                let stride = if li > 0 && bi == 0 { 2 } else { 1 };
                let p = format!("{prefix}layer{}.{bi}.", li + 1);
                let c_out = width * expansion;
                let mut conv = Vec::new();
                let mut add =
                    |s: &mut ParamStore<T>, j: usize, o: usize, k: usize, i: usize, st: usize| {
                        let w = conv_weight(s, &format!("{p}conv{j}.weight"), o, k, i, r);
                        (w, bn_layer(s, &format!("{p}bn{j}"), o), st)
                    };
                // The stride sits on the 3x3 conv: conv2 of a bottleneck (v1.5), conv1 of a basic block.
                if bottleneck {
                    conv.push(add(s, 1, width, 1, c_in, 1));
                    conv.push(add(s, 2, width, 3, width, stride));
                    conv.push(add(s, 3, c_out, 1, width, 1));
                } else {
                    conv.push(add(s, 1, width, 3, c_in, stride));
                    conv.push(add(s, 2, width, 3, width, 1));
                }
                let downsample = (stride != 1 || c_in != c_out).then(|| {
                    let w = conv_weight(s, &format!("{p}downsample.0.weight"), c_out, 1, c_in, r);
                    (w, bn_layer(s, &format!("{p}downsample.1"), c_out))
                });
                blocks.push(Block {
                    conv,
                    downsample,
                    stride,
                });
                c_in = c_out;
            }
        }
        ResNet { arch, stem, blocks }
    }

    /// x (B, H, W, 3) -> (B, H/32, W/32, C) after the final ReLU.
    pub fn forward<B: Kernels>(&self, g: &mut Graph<B>, x: Tensor, mode: BnMode) -> Tensor {
        let h = g.conv2d(x, self.stem.0, 2, 3);
        let h = g.bn_act(h, self.stem.1, mode, None, true);
        let mut h = g.maxpool(h, 3, 2, 1);
        for b in &self.blocks {
            // The skip first, so the block's last batch norm can take it as its fused residual.
            let skip = match b.downsample {
                Some((w, bn)) => {
                    let d = g.conv2d(h, w, b.stride, 0);
                    g.bn_act(d, bn, mode, None, false)
                }
                None => h,
            };
            let mut r = h;
            let last = b.conv.len() - 1;
            for (j, &(w, bn, stride)) in b.conv.iter().enumerate() {
                let k = g.param_shape(w).dim(1);
                r = g.conv2d(r, w, stride, k / 2);
                r = if j < last {
                    g.bn_act(r, bn, mode, None, true)
                } else {
                    g.bn_act(r, bn, mode, Some(skip), true)
                };
            }
            h = r;
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Graph;
    use crate::tensor::Shape;

    #[test]
    fn resnet50_counts_and_names_match_torchvision() {
        let mut s = ParamStore::<f32>::new();
        let net = ResNet::build(&mut s, "", Arch::RESNET50, &mut Rng::new(0));
        // LEWEL_SPEC 1 and 10: 23,454,912 conv + 53,120 BN affine.
        assert_eq!(s.num_params(), 23_508_032);
        let convs = s
            .table
            .entries
            .iter()
            .filter(|e| e.shape.rank() == 4)
            .count();
        assert_eq!(convs, 53);
        assert_eq!(s.counters.len(), 53);
        for name in [
            "conv1.weight",
            "bn1.weight",
            "layer1.0.downsample.0.weight",
            "layer4.2.bn3.bias",
            "layer3.5.conv2.weight",
        ] {
            assert!(s.table.find(name).is_some(), "{name}");
        }
        assert!(s
            .buffer_table
            .find("layer2.0.downsample.1.running_var")
            .is_some());
        assert_eq!(net.blocks.len(), 16);
        // Kaiming fan_out: conv1 std = sqrt(2 / (64 * 49)) = 0.02526.
        let w = s.param(ParamId(0));
        let std = (w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        assert!((std - 0.02526).abs() < 0.001, "conv1 std {std}");
    }

    #[test]
    fn resnet18_has_no_layer1_downsample() {
        let mut s = ParamStore::<f32>::new();
        ResNet::build(&mut s, "", Arch::RESNET18, &mut Rng::new(0));
        assert!(s.table.find("layer1.0.downsample.0.weight").is_none());
        assert!(s.table.find("layer2.0.downsample.0.weight").is_some());
        // torchvision resnet18 without fc: 11,689,512 - 513,000.
        assert_eq!(s.num_params(), 11_176_512);
    }

    #[test]
    fn resnet18_forward_shape() {
        let mut s = ParamStore::<f32>::new();
        let net = ResNet::build(&mut s, "", Arch::RESNET18, &mut Rng::new(0));
        let mut g = Graph::cpu(s);
        let x = g.input(Shape::new(&[2, 64, 64, 3]), &vec![0.5f32; 2 * 64 * 64 * 3]);
        let y = net.forward(&mut g, x, BnMode::Train);
        assert_eq!(y.shape, Shape::new(&[2, 2, 2, 512]));
    }

    #[test]
    fn tiny_forward_shape_and_strides() {
        let mut s = ParamStore::<f32>::new();
        let net = ResNet::build(&mut s, "", Arch::TINY, &mut Rng::new(0));
        let mut g = Graph::cpu(s);
        let x = vec![0.5f32; 2 * 64 * 64 * 3];
        let x = g.input(Shape::new(&[2, 64, 64, 3]), &x);
        let y = net.forward(&mut g, x, BnMode::Train);
        assert_eq!(y.shape, Shape::new(&[2, 2, 2, 256]));
        assert!(g.value(y).iter().all(|v| *v >= 0.0));
    }
}
