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
use rayon::prelude::*;

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
    gemm_check(name, a, va, b, vb, c, vc);
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

/// The shape and bounds checks of [`gemm`] and [`par_gemm`].
fn gemm_check<T>(name: &str, a: &[T], va: Mat, b: &[T], vb: Mat, c: &[T], vc: Mat) {
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
}

/// A raw pointer that may cross threads: [`par_gemm`] hands each thread a disjoint tile of C.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: only used for tiles of C that do not overlap (par_gemm), each written by one thread.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the whole Send wrapper).
    fn get(self) -> *mut T {
        self.0
    }
}

/// Multiply-adds below which [`par_gemm`] runs one call on the calling thread.
const PAR_GEMM_MIN_WORK: usize = 1 << 20;

/// [`gemm`] with C cut into one tile per thread (along its longer side, in multiples of 16 rows or
/// columns), the tiles computed in parallel, each by one call over the whole of k. Every element
/// of C is then summed by the same kernel over the same k-blocks in the same order as one call
/// would sum it: the result is bit for bit that of [`gemm`], whatever the thread count (a test
/// holds this).
#[allow(clippy::too_many_arguments)]
pub fn par_gemm<T: Real>(
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
    let threads = rayon::current_num_threads();
    let (m, n, k) = (vc.rows, vc.cols, va.cols);
    let split_rows = m >= n;
    let long = if split_rows { m } else { n };
    let tile = long.div_ceil(threads.max(1)).next_multiple_of(16);
    if threads <= 1 || m * n * k < PAR_GEMM_MIN_WORK || tile >= long {
        return gemm(name, alpha, a, va, b, vb, beta, c, vc);
    }
    // The whole views are checked once here; each tile is a sub-view of them.
    gemm_check(name, a, va, b, vb, c, vc);
    let cp = SendPtr(c.as_mut_ptr());
    let tiles = long.div_ceil(tile);
    (0..tiles).into_par_iter().for_each(|t| {
        let (lo, len) = (t * tile, tile.min(long - t * tile));
        // SAFETY: the views lie inside their slices (gemm_check); tile t covers rows (or columns)
        // lo..lo + len of C, disjoint from every other tile's, and C does not overlap A or B (it is
        // a distinct &mut borrow).
        unsafe {
            let (ao, bo, co, mm, nn) = if split_rows {
                (va.off + lo * va.rs, vb.off, vc.off + lo * vc.rs, len, n)
            } else {
                (va.off, vb.off + lo * vb.cs, vc.off + lo * vc.cs, m, len)
            };
            T::gemm_raw(
                mm,
                k,
                nn,
                alpha,
                a.as_ptr().add(ao),
                va.rs as isize,
                va.cs as isize,
                b.as_ptr().add(bo),
                vb.rs as isize,
                vb.cs as isize,
                beta,
                cp.get().add(co),
                vc.rs as isize,
                vc.cs as isize,
            )
        }
    });
}

/// Runs `f` on a scratch slice of `len` elements that keeps its allocation between calls on the
/// same thread (no page faults from fresh buffers inside a training step). The contents are
/// whatever was left in it: `f` must write every element it reads. A nested call on the same
/// thread gets a fresh buffer.
pub fn with_scratch<T: Real, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    use std::cell::RefCell;
    thread_local! {
        // f64 storage: aligned for both f32 and f64.
        static SCRATCH: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
    }
    let mut buf = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let words = (len * std::mem::size_of::<T>()).div_ceil(8);
    if buf.len() < words {
        buf = Vec::new(); // drop the old one first
        buf.resize(words, 0.0);
    }
    // SAFETY: T is f32 or f64 (Real's only implementations; plain data, any bit pattern valid),
    // the buffer holds at least len * size_of::<T>() initialized bytes, aligned to 8.
    let view = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<T>(), len) };
    let r = f(view);
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < buf.len() {
            *s = buf;
        }
    });
    r
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
    fn par_gemm_is_gemm_bit_for_bit_at_any_thread_count() {
        // Tall (rows split), wide (columns split), transposed and strided views, beta 0 and 1.
        let mut r = crate::rng::Rng::keyed(&[7]);
        let cases = [
            (300usize, 70usize, 90usize, false),
            (40, 130, 500, false),
            (257, 33, 129, true),
        ];
        for (m, k, n, trans) in cases {
            let a: Vec<f32> = (0..m * k).map(|_| r.normal() as f32).collect();
            let b: Vec<f32> = (0..k * n).map(|_| r.normal() as f32).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| r.normal() as f32).collect();
            // trans: A read through the transpose of a (k x m) matrix, C written column-major.
            let (va, vc) = match trans {
                true => (Mat::rows(k, m, 0).t(), Mat::rows(n, m, 0).t()),
                false => (Mat::rows(m, k, 0), Mat::rows(m, n, 0)),
            };
            let vb = Mat::rows(k, n, 0);
            for beta in [0.0f32, 1.0] {
                let mut want = c0.clone();
                gemm("t", 0.5, &a, va, &b, vb, beta, &mut want, vc);
                for threads in [1, 2, 3, 8] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut got = c0.clone();
                    pool.install(|| par_gemm("t", 0.5, &a, va, &b, vb, beta, &mut got, vc));
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{m}x{k}x{n} trans {trans} beta {beta}: {threads} threads differ"
                    );
                }
            }
        }
    }

    #[test]
    fn scratch_is_reused_and_nests() {
        let p1 = with_scratch::<f32, _>(1000, |s| {
            s.fill(1.0);
            // A nested call gets its own buffer, not the one in use.
            let inner = with_scratch::<f64, _>(10, |t| {
                t.fill(2.0);
                t.as_ptr() as usize
            });
            assert_ne!(inner, s.as_ptr() as usize);
            assert!(s.iter().all(|&v| v == 1.0));
            s.as_ptr() as usize
        });
        let p2 = with_scratch::<f32, _>(500, |s| s.as_ptr() as usize);
        assert_eq!(p1, p2, "the larger buffer is kept for the next call");
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
