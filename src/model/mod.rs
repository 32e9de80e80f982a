//! Models written once against the one [`crate::graph::Graph`], generic over its backend (CPU or
//! GPU): ResNet-18/50 and the small residual net of the demo (`resnet`, torchvision's
//! names and initialization), and LEWEL's online/target networks with the neck, the predictors and
//! the loss (`lewel`).

pub mod lewel;
pub mod resnet;

use crate::graph::BnLayer;
use crate::memory::ParamStore;
use crate::ops::Real;
use crate::rng::Rng;
use crate::tensor::Shape;

/// A conv weight [out, k, k, in] with Kaiming-normal fan_out init (std = sqrt(2 / (out * k * k))),
/// torchvision's init for ResNet convolutions.
pub fn conv_weight<T: Real>(
    s: &mut ParamStore<T>,
    name: &str,
    c_out: usize,
    k: usize,
    c_in: usize,
    r: &mut Rng,
) -> crate::memory::ParamId {
    let std = (2.0 / (c_out * k * k) as f64).sqrt();
    s.add_param(name, Shape::new(&[c_out, k, k, c_in]), |_| {
        T::from_f64(r.normal() * std)
    })
}

/// A linear weight [out, in] with Kaiming-normal fan_out init (std = sqrt(2 / out)), the init of the
/// MLP heads' 1x1 Conv1d.
pub fn linear_weight<T: Real>(
    s: &mut ParamStore<T>,
    name: &str,
    c_out: usize,
    c_in: usize,
    r: &mut Rng,
) -> crate::memory::ParamId {
    let std = (2.0 / c_out as f64).sqrt();
    s.add_param(name, Shape::new(&[c_out, c_in]), |_| {
        T::from_f64(r.normal() * std)
    })
}

/// A batch-norm layer named as PyTorch does: weight = 1, bias = 0, running_mean = 0, running_var = 1.
pub fn bn_layer<T: Real>(s: &mut ParamStore<T>, name: &str, c: usize) -> BnLayer {
    let sh = Shape::new(&[c]);
    BnLayer {
        gamma: s.add_param(&format!("{name}.weight"), sh, |_| T::one()),
        beta: s.add_param(&format!("{name}.bias"), sh, |_| T::zero()),
        running_mean: s.add_buffer(&format!("{name}.running_mean"), sh, T::zero()),
        running_var: s.add_buffer(&format!("{name}.running_var"), sh, T::one()),
        num_batches_tracked: s.add_counter(&format!("{name}.num_batches_tracked")),
    }
}
