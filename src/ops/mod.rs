//! One op family per file, each in the same section order: math header, `#[repr(C)]` params, CPU
//! reference (forward, backward), CUDA launchers (kernels/<op>.cu, same stem; cuDNN and cuBLAS for
//! conv and linear, with `conv_find` choosing cuDNN algorithms), tests (a gradient check named
//! `gradcheck_<op>`).
//!
//! Layout is NHWC for images and (rows, channels) for the MLP heads. CPU references are generic over
//! [`Real`] so the same code runs in f32 for training and in f64 for gradient checks.
//! Backward adds (`+=`) into every gradient it produces, parameters and activations alike; the graph
//! zeroes activation gradients before a backward pass, so fan-out (residual branches, the neck reading
//! the backbone map three times) sums correctly.

pub mod add;
pub mod aggregate;
pub mod batchnorm;
pub mod concat;
pub mod conv;
pub mod conv_find;
pub mod l2norm;
pub mod linear;
pub mod loss;
pub mod pool;
pub mod relu;
pub mod softmax;
pub mod xent;

use num_traits::Float;

/// Element type of the CPU reference: f32 for training, f64 for gradient checks.
pub trait Real: Float + Default + Send + Sync + std::fmt::Debug + std::iter::Sum + 'static {
    fn from_f64(x: f64) -> Self;
    fn as_f64(self) -> f64;
    /// C (m x n) = alpha * A (m x k) * B (k x n) + beta * C, with element strides
    /// (row stride, column stride) for each matrix.
    ///
    /// # Safety
    /// Each pointer with its strides must address valid memory for the whole matrix, and C must not
    /// overlap A or B.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl Real for f32 {
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

impl Real for f64 {
    fn from_f64(x: f64) -> f64 {
        x
    }
    fn as_f64(self) -> f64 {
        self
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

/// A strided matrix view for [`gemm`]: `data[off + r * rs + c * cs]` for r < rows, c < cols.
#[derive(Clone, Copy, Debug)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

impl Mat {
    /// A dense row-major matrix starting at `off`.
    pub fn rows(rows: usize, cols: usize, off: usize) -> Mat {
        Mat {
            rows,
            cols,
            off,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of this view (no data moves).
    pub fn t(self) -> Mat {
        Mat {
            rows: self.cols,
            cols: self.rows,
            off: self.off,
            rs: self.cs,
            cs: self.rs,
        }
    }
    /// The same view with a different row stride (a column block of a wider matrix).
    pub fn with_rs(self, rs: usize) -> Mat {
        Mat { rs, ..self }
    }
    fn last(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return self.off;
        }
        self.off + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs
    }
}

/// Bounds-checked GEMM over strided views: c = alpha * a * b + beta * c.
/// `name` is the calling op, for the assertion message.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Real>(
    name: &str,
    alpha: T,
    a: &[T],
    va: Mat,
    b: &[T],
    vb: Mat,
    beta: T,
    c: &mut [T],
    vc: Mat,
) {
    assert!(
        va.cols == vb.rows && va.rows == vc.rows && vb.cols == vc.cols,
        "{name}: gemm shapes ({}x{}) * ({}x{}) -> ({}x{})",
        va.rows,
        va.cols,
        vb.rows,
        vb.cols,
        vc.rows,
        vc.cols
    );
    assert!(
        va.last() < a.len().max(1) && vb.last() < b.len().max(1) && vc.last() < c.len().max(1),
        "{name}: gemm view out of bounds (a {} of {}, b {} of {}, c {} of {})",
        va.last(),
        a.len(),
        vb.last(),
        b.len(),
        vc.last(),
        c.len()
    );
    if vc.rows == 0 || vc.cols == 0 {
        return;
    }
    // SAFETY: every view was checked to lie inside its slice; `c` is a distinct &mut borrow, so it
    // cannot overlap `a` or `b`.
    unsafe {
        T::gemm_raw(
            va.rows,
            va.cols,
            vb.cols,
            alpha,
            a.as_ptr().add(va.off),
            va.rs as isize,
            va.cs as isize,
            b.as_ptr().add(vb.off),
            vb.rs as isize,
            vb.cs as isize,
            beta,
            c.as_mut_ptr().add(vc.off),
            vc.rs as isize,
            vc.cs as isize,
        )
    }
}

/// Rows per chunk for parallel reductions. Fixed, never derived from the thread count, so a reduction
/// sums the same partials in the same order on any machine.
pub const REDUCE_CHUNK: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_strided_views() {
        // a (2x3) row-major, b = a^T through a view, c = a a^T
        let a = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut c = [0.0f64; 4];
        let va = Mat::rows(2, 3, 0);
        gemm(
            "test",
            1.0,
            &a,
            va,
            &a,
            va.t(),
            0.0,
            &mut c,
            Mat::rows(2, 2, 0),
        );
        assert_eq!(c, [14.0, 32.0, 32.0, 77.0]);
    }

    #[test]
    #[should_panic(expected = "gemm shapes")]
    fn gemm_shape_mismatch_names_the_op() {
        let a = [0.0f32; 6];
        let mut c = [0.0f32; 4];
        gemm(
            "myop",
            1.0,
            &a,
            Mat::rows(2, 3, 0),
            &a,
            Mat::rows(2, 3, 0),
            0.0,
            &mut c,
            Mat::rows(2, 2, 0),
        );
    }
}
