//! Shape, DType and the Tensor handle. A Tensor names memory (an arena slot) and says what is in it;
//! it owns nothing and does no math.

use std::fmt;

/// Up to four dimensions, row-major, last dimension fastest. Activations are NHWC: (N, H, W, C);
/// rows of the MLP heads are (N, L, C), the 1x1 Conv1d of PyTorch seen position by position.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    dims: [usize; 4],
    rank: u8,
}

impl Shape {
    pub fn new(dims: &[usize]) -> Shape {
        assert!(
            !dims.is_empty() && dims.len() <= 4,
            "Shape::new: rank {} (1..=4)",
            dims.len()
        );
        let mut d = [1usize; 4];
        d[..dims.len()].copy_from_slice(dims);
        Shape {
            dims: d,
            rank: dims.len() as u8,
        }
    }
    pub fn scalar() -> Shape {
        Shape::new(&[1])
    }
    pub fn dims(&self) -> &[usize] {
        &self.dims[..self.rank as usize]
    }
    pub fn rank(&self) -> usize {
        self.rank as usize
    }
    pub fn numel(&self) -> usize {
        self.dims().iter().product()
    }
    /// Dimension `i`; negative counts from the end.
    pub fn dim(&self, i: isize) -> usize {
        let r = self.rank as isize;
        let j = if i < 0 { r + i } else { i };
        assert!((0..r).contains(&j), "Shape::dim: index {i} out of rank {r}");
        self.dims[j as usize]
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.dims())
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.dims())
    }
}

/// Storage type of activations. Parameters, gradients, optimizer state and statistics are always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
}

impl DType {
    pub fn size_of(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }
}

/// A handle to an activation: arena slot and shape. Copy it freely; the graph owns the memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tensor {
    pub slot: u32,
    pub shape: Shape,
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_basics() {
        let s = Shape::new(&[2, 7, 7, 64]);
        assert_eq!(s.numel(), 2 * 7 * 7 * 64);
        assert_eq!(s.dim(-1), 64);
        assert_eq!(s.dim(0), 2);
        assert_eq!(format!("{s}"), "[2, 7, 7, 64]");
        assert_ne!(Shape::new(&[2, 3]), Shape::new(&[2, 3, 1]));
    }
}
