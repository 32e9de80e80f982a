//! Batch norm over rows, per channel. x is (R, C) row-major: R = N*H*W for BatchNorm2d on NHWC maps,
//! R = N*L for the BatchNorm1d of the MLP heads on (N, C, L) inputs (our rows are positions), which
//! PyTorch also reduces over batch and length together.
//!   train: mean, var_b = biased moments over the rows of a group; rstd = 1 / sqrt(var_b + eps)
//!          y = gamma * (x - mean) * rstd + beta
//!          running_mean <- (1 - momentum) * running_mean + momentum * mean
//!          running_var  <- (1 - momentum) * running_var  + momentum * var_b * m / (m - 1)
//!   eval:  y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta
//! Ghost groups: rows split into consecutive groups of `group_rows` rows (a fixed number of samples
//! each), normalized with their own statistics, reproducing per-GPU statistics on one device. The
//! running statistics follow group 0, as DDP's broadcast of rank 0's buffers makes them do on N GPUs.
//! `num_batches_tracked` is counted by the caller.
//! Saved for backward (train): mean and rstd per group and channel (G, C).
//! Backward (train), per group with xhat = (x - mean) * rstd and m rows:
//!   dx += gamma * rstd * (dy - mean(dy) - xhat * mean(dy * xhat))
//!   dgamma += sum(dy * xhat),  dbeta += sum(dy)
//! Sums run in f64 over fixed chunks of rows, combined in order: deterministic at any thread count.
//! SyncBN (`world` > 1, one group): every rank normalizes with the statistics of all the ranks'
//! rows (m = rows * world), one collective ([`StatSync`]) per pass. Forward: each rank's mean and
//! squared deviations about it over its own rows are gathered and merged in rank order (for equal
//! counts n: mean = the average of the means, M2 = sum of M2_r + n * (mean_r - mean)^2, Chan et
//! al.'s pairwise update), the two-pass accuracy without a second round trip. Backward: the sums
//! of dy and dy * xhat are added over the ranks (dgamma and dbeta keep this rank's own sums: the
//! gradient all-reduce adds them).

use super::{Real, REDUCE_CHUNK};
use rayon::prelude::*;

// ----------------------------------------------------------------------------
// Params

/// Mirrored by `struct BnParams` in kernels/batchnorm.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BnParams {
    pub rows: i32,
    pub c: i32,
    /// Rows per statistics group; equal to `rows` for plain batch norm.
    pub group_rows: i32,
    pub eps: f32,
    pub momentum: f32,
    /// Ranks whose rows the statistics cover (SyncBN); 1 otherwise.
    pub world: i32,
}

/// The ranks that share train-mode batch statistics (SyncBN).
pub trait SyncGroup {
    fn world(&self) -> usize;
    /// This rank's place among them.
    fn rank(&self) -> usize;
}

/// Collectives over the ranks sharing statistics, in place: every rank calls them with buffers
/// of one length, in the same order. `S` is `[f64]` on the CPU, an f32 device window on a GPU.
pub trait StatSync<S: ?Sized>: SyncGroup {
    /// Each element becomes its sum over the ranks.
    fn sum(&self, sums: &mut S) -> crate::Result<()>;
    /// `all` holds `world` equal parts, this rank's (part `rank`) written by the caller; every
    /// other part becomes that rank's.
    fn gather(&self, all: &mut S) -> crate::Result<()>;
}

/// The CPU's statistics sync.
pub type HostSync = dyn StatSync<[f64]>;
/// A GPU's statistics sync (on the GPU's stream).
pub type DevSync = dyn for<'a> StatSync<CudaViewMut<'a, f32>>;

impl BnParams {
    /// PyTorch's defaults: eps 1e-5, momentum 0.1, one group.
    pub fn new(rows: usize, c: usize) -> BnParams {
        BnParams {
            rows: rows as i32,
            c: c as i32,
            group_rows: rows as i32,
            eps: 1e-5,
            momentum: 0.1,
            world: 1,
        }
    }
    /// Statistics over the rows of `world` ranks (SyncBN).
    pub fn synced(self, world: usize) -> BnParams {
        assert!(
            world >= 1 && (world == 1 || self.groups() == 1),
            "batchnorm: SyncBN over {world} ranks with {} groups",
            self.groups()
        );
        BnParams {
            world: world as i32,
            ..self
        }
    }
    /// Values each group's statistics are taken over: its rows on every rank.
    pub fn count(&self) -> usize {
        self.group_rows as usize * self.world as usize
    }
    /// Statistics over groups of `group_rows` consecutive rows.
    pub fn ghost(self, group_rows: usize) -> BnParams {
        assert!(
            group_rows > 0 && (self.rows as usize).is_multiple_of(group_rows),
            "batchnorm: {} rows do not split into groups of {group_rows}",
            self.rows
        );
        BnParams {
            group_rows: group_rows as i32,
            ..self
        }
    }
    pub fn groups(&self) -> usize {
        (self.rows / self.group_rows) as usize
    }
    fn check(&self, op: &str, x: usize, y: usize, gamma: usize, beta: usize) {
        let (r, c) = (self.rows as usize, self.c as usize);
        assert!(
            x == r * c && y == r * c && gamma == c && beta == c,
            "{op}: lengths x {x} y {y} gamma {gamma} beta {beta}, expected {r}x{c}, {c}, {c}"
        );
        assert!(
            self.rows % self.group_rows == 0,
            "{op}: group_rows {} vs rows {}",
            self.group_rows,
            self.rows
        );
    }
}

// ----------------------------------------------------------------------------
// CPU reference

/// Per-channel sums over rows [r0, r1) of f(row, acc) in f64: fixed chunks, combined in order.
fn channel_sums<F>(r0: usize, r1: usize, c: usize, f: F) -> Vec<f64>
where
    F: Fn(usize, &mut [f64]) + Sync,
{
    let chunks: Vec<(usize, usize)> = (r0..r1)
        .step_by(REDUCE_CHUNK)
        .map(|a| (a, (a + REDUCE_CHUNK).min(r1)))
        .collect();
    let parts: Vec<Vec<f64>> = chunks
        .par_iter()
        .map(|&(a, b)| {
            let mut acc = vec![0.0f64; c];
            for r in a..b {
                f(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![0.0f64; c];
    for p in &parts {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// Train-mode statistics, step 1: per-channel sums of group `g`'s rows of x (R, C), in f64.
pub fn stats_sum_cpu<T: Real>(x: &[T], p: &BnParams, g: usize) -> Vec<f64> {
    let (c, m) = (p.c as usize, p.group_rows as usize);
    channel_sums(g * m, (g + 1) * m, c, |r, acc| {
        for (a, v) in acc.iter_mut().zip(&x[r * c..][..c]) {
            *a += v.as_f64();
        }
    })
}

/// Step 2: per-channel sums of squared deviations of group `g`'s rows from `mu` (C), in f64.
pub fn stats_sq_cpu<T: Real>(x: &[T], p: &BnParams, g: usize, mu: &[f64]) -> Vec<f64> {
    let (c, m) = (p.c as usize, p.group_rows as usize);
    channel_sums(g * m, (g + 1) * m, c, |r, acc| {
        for ((a, v), mu) in acc.iter_mut().zip(&x[r * c..][..c]).zip(mu) {
            let d = v.as_f64() - mu;
            *a += d * d;
        }
    })
}

/// Step 3: group `g`'s mean and 1/std for backward, from the mean and the summed squared
/// deviations over `m` values per channel; group 0 also updates the running statistics (PyTorch's
/// momentum form, unbiased variance).
pub fn finalize_cpu<T: Real>(
    p: &BnParams,
    g: usize,
    (mu, sq, m): (&[f64], &[f64], usize),
    (mean, rstd): (&mut [T], &mut [T]),
    (running_mean, running_var): (&mut [T], &mut [T]),
) {
    let c = p.c as usize;
    for ch in 0..c {
        let var_b = sq[ch] / m as f64;
        mean[g * c + ch] = T::from_f64(mu[ch]);
        rstd[g * c + ch] = T::from_f64(1.0 / (var_b + p.eps as f64).sqrt());
        if g == 0 {
            let mo = T::from_f64(p.momentum as f64);
            let one = T::one();
            running_mean[ch] = (one - mo) * running_mean[ch] + mo * T::from_f64(mu[ch]);
            running_var[ch] =
                (one - mo) * running_var[ch] + mo * T::from_f64(var_b * m as f64 / (m - 1) as f64);
        }
    }
}

/// Train-mode forward. x, y (R, C); gamma, beta, running_mean, running_var (C);
/// mean, rstd (G, C) are written for backward. Composed of the four steps above, in the order the
/// GPU runs its kernels (bn_stats_partial, bn_finalize_mean, bn_stats_partial, bn_finalize_var,
/// bn_apply); SyncBN (`sync`, p.world ranks) takes steps 1 and 2 over this rank's rows about its
/// own mean, gathers them and merges them (bn_merge_ranks).
#[allow(clippy::too_many_arguments)]
pub fn forward_train_cpu<T: Real>(
    x: &[T],
    gamma: &[T],
    beta: &[T],
    y: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    running_mean: &mut [T],
    running_var: &mut [T],
    p: &BnParams,
    sync: Option<&HostSync>,
) -> crate::Result<()> {
    let post = (None, false);
    forward_train_fused_cpu(
        x,
        (gamma, beta),
        y,
        (mean, rstd),
        (running_mean, running_var),
        p,
        sync,
        post,
    )
}

/// The train-mode forward with the residual add and the ReLU (`post`) in its last pass.
#[allow(clippy::too_many_arguments)]
fn forward_train_fused_cpu<T: Real>(
    x: &[T],
    (gamma, beta): (&[T], &[T]),
    y: &mut [T],
    (mean, rstd): (&mut [T], &mut [T]),
    (running_mean, running_var): (&mut [T], &mut [T]),
    p: &BnParams,
    sync: Option<&HostSync>,
    post: (Option<&[T]>, bool),
) -> crate::Result<()> {
    p.check(
        "batchnorm_forward_train",
        x.len(),
        y.len(),
        gamma.len(),
        beta.len(),
    );
    let (c, m) = (p.c as usize, p.group_rows as usize);
    assert!(
        m > 1,
        "batchnorm_forward_train: need more than 1 value per channel, got {m} rows per group"
    );
    assert!(
        mean.len() == p.groups() * c && rstd.len() == p.groups() * c,
        "batchnorm_forward_train: saved stats length"
    );
    let sync = check_sync(p, sync);
    let n = p.count();
    for g in 0..p.groups() {
        // The sums over the rows, then the squared deviations from the mean so found; under
        // SyncBN each rank's own, gathered and merged.
        let (mu, sq) = match sync {
            None => {
                let mu: Vec<f64> = stats_sum_cpu(x, p, g)
                    .iter()
                    .map(|s| s / n as f64)
                    .collect();
                let sq = stats_sq_cpu(x, p, g, &mu);
                (mu, sq)
            }
            Some(s) => {
                // This rank's (a, d, q) into its part (merge_moments), gathered, merged.
                let (w, at) = (p.world as usize, s.rank() * 3 * c);
                let mut all = vec![0.0; w * 3 * c];
                let a: Vec<f64> = stats_sum_cpu(x, p, 0)
                    .iter()
                    .map(|v| v / m as f64)
                    .collect();
                let d = channel_sums(0, m, c, |r, acc| {
                    for ((s, v), a) in acc.iter_mut().zip(&x[r * c..][..c]).zip(&a) {
                        *s += v.as_f64() - a;
                    }
                });
                all[at + 2 * c..at + 3 * c].copy_from_slice(&stats_sq_cpu(x, p, 0, &a));
                all[at + c..at + 2 * c].copy_from_slice(&d);
                all[at..at + c].copy_from_slice(&a);
                s.gather(&mut all)?;
                merge_moments(&all, c, m)
            }
        };
        finalize_cpu(
            p,
            g,
            (&mu, &sq, n),
            (mean, rstd),
            (running_mean, running_var),
        );
    }
    let cm = (p.c as usize, p.group_rows as usize);
    apply_fused_cpu(x, (mean, rstd), (gamma, beta), post, y, cm);
    Ok(())
}

/// SyncBN's merge of the ranks' moments, gathered per rank over `rows` rows each as (a, d, q) of C
/// each: its mean as computed (rounded), the sums of x - a and of (x - a)^2. Each rank's mean is
/// a + d / rows and its squared deviations about it q - d^2 / rows (the corrected two-pass form:
/// the rounding of a enters to second order only, as in one device's two passes); merged in rank
/// order: the mean of the means, and the sum of each rank's squared deviations plus
/// rows * (its mean - the mean)^2 (Chan et al.'s update for equal counts). kernels/batchnorm.cu's
/// bn_merge_ranks is the same in f64.
pub fn merge_moments(all: &[f64], c: usize, rows: usize) -> (Vec<f64>, Vec<f64>) {
    let n = rows as f64;
    let parts: Vec<&[f64]> = all.chunks_exact(3 * c).collect();
    let mu: Vec<f64> = (0..c)
        .map(|ch| parts.iter().map(|q| q[ch] + q[c + ch] / n).sum::<f64>() / parts.len() as f64)
        .collect();
    let sq = (0..c)
        .map(|ch| {
            parts
                .iter()
                .map(|q| {
                    let (d, m) = (q[c + ch], q[ch] + q[c + ch] / n - mu[ch]);
                    q[2 * c + ch] - d * d / n + n * m * m
                })
                .sum()
        })
        .collect();
    (mu, sq)
}

/// The sync a train-mode pass uses: `sync` when `p` spans several ranks (one group), else none.
fn check_sync<'a, S: ?Sized + SyncGroup>(p: &BnParams, sync: Option<&'a S>) -> Option<&'a S> {
    if p.world == 1 {
        return None;
    }
    let s =
        sync.unwrap_or_else(|| panic!("batchnorm: SyncBN over {} ranks without a sync", p.world));
    assert!(
        s.world() == p.world as usize && p.groups() == 1,
        "batchnorm: statistics over {} ranks ({} groups) through a sync of {}",
        p.world,
        p.groups(),
        s.world()
    );
    Some(s)
}

/// Step 4: y = (x - mean) * rstd * gamma + beta, each row with its group's statistics (G, C).
pub fn apply_cpu<T: Real>(
    x: &[T],
    (mean, rstd): (&[T], &[T]),
    gamma: &[T],
    beta: &[T],
    y: &mut [T],
    p: &BnParams,
) {
    let cm = (p.c as usize, p.group_rows as usize);
    apply_fused_cpu(x, (mean, rstd), (gamma, beta), (None, false), y, cm);
}

/// Rows per parallel task of the element-wise passes.
const ROW_BLOCK: usize = 64;

/// Step 4 with the residual add and the ReLU in the same pass, y = relu?((x - mean) * rstd *
/// gamma + beta + res?), rounded exactly as the three passes one after the other (`ops::add`,
/// `ops::relu`) round it. `c` channels, `m` rows per group of statistics.
fn apply_fused_cpu<T: Real>(
    x: &[T],
    (mean, rstd): (&[T], &[T]),
    (gamma, beta): (&[T], &[T]),
    (res, relu): (Option<&[T]>, bool),
    y: &mut [T],
    (c, m): (usize, usize),
) {
    y.par_chunks_mut(ROW_BLOCK * c)
        .enumerate()
        .for_each(|(b, y_b)| {
            for (i, y_r) in y_b.chunks_mut(c).enumerate() {
                let r = b * ROW_BLOCK + i;
                let g = r / m;
                let (mu, rs) = (&mean[g * c..][..c], &rstd[g * c..][..c]);
                let x_r = &x[r * c..][..c];
                for ch in 0..c {
                    y_r[ch] = (x_r[ch] - mu[ch]) * rs[ch] * gamma[ch] + beta[ch];
                }
                if let Some(res) = res {
                    for (o, &v) in y_r.iter_mut().zip(&res[r * c..][..c]) {
                        *o = *o + v;
                    }
                }
                if relu {
                    for o in y_r.iter_mut() {
                        *o = if *o > T::zero() { *o } else { T::zero() };
                    }
                }
            }
        });
}

/// Calls `f(x, d, lane)` for each channel of one row, where d is the gradient reaching the BN
/// output through the ReLU that followed it (`y`, its output): dy where y > 0, else 0, as
/// `ops::relu::backward_cpu` gives it; dy itself without a ReLU. Two plain loops, so that each
/// vectorizes.
#[inline(always)]
fn each_channel<T: Real, L>(
    (x, dy, y): (&[T], &[T], Option<&[T]>),
    lanes: impl Iterator<Item = L>,
    mut f: impl FnMut(T, T, L),
) {
    match y {
        Some(y) => {
            for (((&xv, &g), &yv), l) in x.iter().zip(dy).zip(y).zip(lanes) {
                f(xv, if yv > T::zero() { g } else { T::zero() }, l);
            }
        }
        None => {
            for ((&xv, &g), l) in x.iter().zip(dy).zip(lanes) {
                f(xv, g, l);
            }
        }
    }
}

/// Train-mode backward. dx (R, C) +=; dgamma, dbeta (C) += (this rank's sums, under SyncBN too).
#[allow(clippy::too_many_arguments)]
pub fn backward_train_cpu<T: Real>(
    x: &[T],
    dy: &[T],
    gamma: &[T],
    mean: &[T],
    rstd: &[T],
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
    p: &BnParams,
    sync: Option<&HostSync>,
) -> crate::Result<()> {
    backward_train_fused_cpu(
        (x, dy, None),
        gamma,
        (mean, rstd),
        (dx, None),
        (dgamma, dbeta),
        p,
        sync,
    )
}

/// Train-mode backward through the ReLU that followed the BN (`y`, its output, when there was
/// one) and into the residual branch's gradient (`dres` += the gradient after the ReLU), in two
/// passes over the rows: the channel sums (fixed chunks, combined in order), then dx and dres.
/// The same values as the ReLU's backward into a temporary, the residual add and the plain
/// backward one after the other.
#[allow(clippy::too_many_arguments)]
fn backward_train_fused_cpu<T: Real>(
    (x, dy, y): (&[T], &[T], Option<&[T]>),
    gamma: &[T],
    (mean, rstd): (&[T], &[T]),
    (dx, dres): (&mut [T], Option<&mut [T]>),
    (dgamma, dbeta): (&mut [T], &mut [T]),
    p: &BnParams,
    sync: Option<&HostSync>,
) -> crate::Result<()> {
    p.check(
        "batchnorm_backward_train",
        x.len(),
        dy.len(),
        gamma.len(),
        dbeta.len(),
    );
    assert!(
        dx.len() == x.len()
            && dgamma.len() == gamma.len()
            && y.is_none_or(|y| y.len() == x.len())
            && dres.as_ref().is_none_or(|d| d.len() == x.len()),
        "batchnorm_backward_train: grad lengths"
    );
    let (c, m) = (p.c as usize, p.group_rows as usize);
    let sync = check_sync(p, sync);
    let n = p.count() as f64;
    let mut coef = vec![(T::zero(), T::zero()); p.groups() * c]; // (mean(dy), mean(dy * xhat))
    for g in 0..p.groups() {
        let (mu, rs) = (&mean[g * c..][..c], &rstd[g * c..][..c]);
        let mut sums = channel_sums(g * m, (g + 1) * m, 2 * c, |r, acc| {
            let (s0, s1) = acc.split_at_mut(c);
            let (x_r, dy_r) = (&x[r * c..][..c], &dy[r * c..][..c]);
            let y_r = y.map(|y| &y[r * c..][..c]);
            let row = (x_r, dy_r, y_r);
            let lanes = s0.iter_mut().zip(s1.iter_mut()).zip(mu.iter().zip(rs));
            each_channel(row, lanes, |xv, d, ((a0, a1), (&mu, &rs))| {
                let d = d.as_f64();
                *a0 += d;
                *a1 += d * ((xv - mu) * rs).as_f64();
            });
        });
        for ch in 0..c {
            dbeta[ch] = dbeta[ch] + T::from_f64(sums[ch]);
            dgamma[ch] = dgamma[ch] + T::from_f64(sums[c + ch]);
        }
        if let Some(s) = sync {
            s.sum(&mut sums)?;
        }
        for ch in 0..c {
            coef[g * c + ch] = (T::from_f64(sums[ch] / n), T::from_f64(sums[c + ch] / n));
        }
    }
    let rows = |b: usize, dx_b: &mut [T], mut dres_b: Option<&mut [T]>| {
        for (i, dx_r) in dx_b.chunks_mut(c).enumerate() {
            let r = b * ROW_BLOCK + i;
            let g = r / m;
            let (x_r, dy_r) = (&x[r * c..][..c], &dy[r * c..][..c]);
            let row = (x_r, dy_r, y.map(|y| &y[r * c..][..c]));
            let stats = mean[g * c..][..c].iter().zip(&rstd[g * c..][..c]);
            let lanes = dx_r
                .iter_mut()
                .zip(stats.zip(&coef[g * c..][..c]))
                .zip(gamma);
            each_channel(
                row,
                lanes,
                |xv, d, ((o, ((&mu, &rs), &(mdy, mdyx))), &ga)| {
                    let xh = (xv - mu) * rs;
                    *o = *o + ga * rs * (d - mdy - xh * mdyx);
                },
            );
            if let Some(dr) = dres_b.as_deref_mut() {
                let dr = &mut dr[i * c..][..c];
                each_channel(row, dr.iter_mut(), |_, d, o| *o = *o + d);
            }
        }
    };
    match dres {
        Some(dres) => dx
            .par_chunks_mut(ROW_BLOCK * c)
            .zip(dres.par_chunks_mut(ROW_BLOCK * c))
            .enumerate()
            .for_each(|(b, (dx_b, dr_b))| rows(b, dx_b, Some(dr_b))),
        None => dx
            .par_chunks_mut(ROW_BLOCK * c)
            .enumerate()
            .for_each(|(b, dx_b)| rows(b, dx_b, None)),
    }
    Ok(())
}

/// Eval-mode forward with running statistics. x, y (R, C).
pub fn forward_eval_cpu<T: Real>(
    x: &[T],
    gamma: &[T],
    beta: &[T],
    running_mean: &[T],
    running_var: &[T],
    y: &mut [T],
    p: &BnParams,
) {
    forward_eval_fused_cpu(
        x,
        (gamma, beta),
        (running_mean, running_var),
        None,
        false,
        y,
        p,
    );
}

/// Eval-mode forward with the residual add and the ReLU in the same pass (rounded as the separate
/// passes round it).
fn forward_eval_fused_cpu<T: Real>(
    x: &[T],
    (gamma, beta): (&[T], &[T]),
    (running_mean, running_var): (&[T], &[T]),
    res: Option<&[T]>,
    relu: bool,
    y: &mut [T],
    p: &BnParams,
) {
    p.check(
        "batchnorm_forward_eval",
        x.len(),
        y.len(),
        gamma.len(),
        beta.len(),
    );
    let c = p.c as usize;
    let eps = T::from_f64(p.eps as f64);
    let rstd: Vec<T> = running_var
        .iter()
        .map(|&v| T::one() / (v + eps).sqrt())
        .collect();
    // One group over all rows, the running statistics as its mean and 1/std.
    let stats = (running_mean, &rstd[..]);
    apply_fused_cpu(x, stats, (gamma, beta), (res, relu), y, (c, usize::MAX));
}

/// Eval-mode backward: statistics are constants. dx (R, C) +=; dgamma, dbeta (C) +=.
#[allow(clippy::too_many_arguments)]
pub fn backward_eval_cpu<T: Real>(
    x: &[T],
    dy: &[T],
    gamma: &[T],
    running_mean: &[T],
    running_var: &[T],
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
    p: &BnParams,
) {
    p.check(
        "batchnorm_backward_eval",
        x.len(),
        dy.len(),
        gamma.len(),
        dbeta.len(),
    );
    let c = p.c as usize;
    let eps = p.eps as f64;
    let rstd: Vec<T> = running_var
        .iter()
        .map(|v| T::from_f64(1.0 / (v.as_f64() + eps).sqrt()))
        .collect();
    let sums = channel_sums(0, p.rows as usize, 2 * c, |r, acc| {
        for ch in 0..c {
            let d = dy[r * c + ch].as_f64();
            acc[ch] += d;
            acc[c + ch] += d * ((x[r * c + ch] - running_mean[ch]) * rstd[ch]).as_f64();
        }
    });
    for ch in 0..c {
        dbeta[ch] = dbeta[ch] + T::from_f64(sums[ch]);
        dgamma[ch] = dgamma[ch] + T::from_f64(sums[c + ch]);
    }
    dx.par_chunks_mut(c).enumerate().for_each(|(r, dx_r)| {
        for ch in 0..c {
            dx_r[ch] = dx_r[ch] + dy[r * c + ch] * gamma[ch] * rstd[ch];
        }
    });
}

// ----------------------------------------------------------------------------
// CUDA launchers (kernels/batchnorm.cu)

use crate::gpu::{grid_1d, need, opt, opt_mut, run, Dev, DevMut, Gpu, GpuFloat, NULL};
use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

/// Chunks per statistics group: enough blocks to fill a GPU, at least 64 rows per chunk.
fn chunks(p: &BnParams) -> i32 {
    let gx = (p.c as usize).div_ceil(32);
    let want = (2048 / (gx * p.groups())).max(1);
    want.min((p.group_rows as usize).div_ceil(64)).max(1) as i32
}

fn stats_cfg(p: &BnParams, chunks: i32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            (p.c as u32).div_ceil(32),
            p.groups() as u32 * chunks as u32,
            1,
        ),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}

/// (R*C, C, G*C) of p.
fn sizes(p: &BnParams) -> (usize, usize, usize) {
    let c = p.c as usize;
    (p.rows as usize * c, c, p.groups() * c)
}

/// Train-mode forward: statistics of every group into `mean`/`rstd` (G, C), running stats of
/// group 0 updated, y = relu?(gamma * xhat + beta + res?). Under SyncBN (p.world > 1) the sums
/// are added over the ranks through `sync`.
#[allow(clippy::too_many_arguments)]
pub fn forward_train_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &BnParams,
    x: &impl Dev<T>,
    (gamma, beta): (&impl Dev<f32>, &impl Dev<f32>),
    (running_mean, running_var): (&mut impl DevMut<f32>, &mut impl DevMut<f32>),
    res: Option<CudaView<'_, T>>,
    relu: bool,
    y: &mut impl DevMut<T>,
    (mean, rstd): (&mut impl DevMut<f32>, &mut impl DevMut<f32>),
    sync: Option<&DevSync>,
) -> crate::Result<()> {
    let (n, c, gc) = sizes(p);
    let sync = check_sync(p, sync);
    // As on the CPU: a group of one row has no variance (PyTorch refuses it too).
    if p.group_rows <= 1 {
        return Err(crate::Error::Other(format!(
            "batchnorm::forward_train_cuda: need more than 1 value per channel, got {} rows per group",
            p.group_rows
        )));
    }
    need(
        "batchnorm::forward_train_cuda",
        &[
            ("x", x.len(), n),
            ("gamma", gamma.len(), c),
            ("beta", beta.len(), c),
            ("running_mean", running_mean.len(), c),
            ("running_var", running_var.len(), c),
            ("res", res.as_ref().map_or(n, |r| r.len()), n),
            ("y", y.len(), n),
            ("mean", mean.len(), gc),
            ("rstd", rstd.len(), gc),
        ],
    )?;
    let ch = chunks(p);
    let np = gc * ch as usize;
    // SyncBN (one group, gc = c): a second set of partial sums, then the ranks' gathered moments
    // (world x 3 x C) and the merged squared deviations (C).
    let extra = sync.map_or(0, |_| np + (3 * p.world as usize + 1) * c);
    let mut scratch = g.scratch(np + extra)?;
    // Every element read is written first (by bn_stats_partial, the finalize kernels, the
    // gather, bn_merge_ranks): no zeroing. Exactly the window used: the gather takes all of it.
    let mut window = scratch.slice_mut(..np + extra);
    let (mut partial, mut rest) = window.split_at_mut(np);
    let x = x.view();
    let (mut mean, mut rstd) = (mean.view_mut(), rstd.view_mut());
    let (mut rm, mut rv) = (running_mean.view_mut(), running_var.view_mut());
    // The CPU's steps (stats_sum, stats_sq around the mean, finalize, apply), in launches.
    match sync {
        None => {
            stats_partial_cuda(g, p, &x, None, ch, &mut partial, None)?;
            finalize_mean_cuda(g, p, ch, &partial.as_view(), &mut mean)?;
            let mv = mean.as_view();
            stats_partial_cuda(g, p, &x, Some(&mv), ch, &mut partial, None)?;
            let pv = partial.as_view();
            finalize_var_cuda(g, p, ch, &pv, &mv, &mut rstd, (&mut rm, &mut rv))?;
        }
        Some(s) => {
            // This rank's (a, d, q) (ops::batchnorm::merge_moments) into its part, gathered,
            // merged.
            let own = BnParams { world: 1, ..*p };
            let (mut devs, mut rest) = rest.split_at_mut(np);
            let (mut all, mut sq) = rest.split_at_mut(3 * p.world as usize * c);
            {
                let at = s.rank() * 3 * c;
                let mut part = all.slice_mut(at..at + 3 * c);
                let (mut a, mut dq) = part.split_at_mut(c);
                let (mut d, mut q) = dq.split_at_mut(c);
                stats_partial_cuda(g, &own, &x, None, ch, &mut partial, None)?;
                finalize_mean_cuda(g, &own, ch, &partial.as_view(), &mut a)?;
                let av = a.as_view();
                stats_partial_cuda(g, &own, &x, Some(&av), ch, &mut partial, Some(&mut devs))?;
                for (from, to) in [(&partial, &mut q), (&devs, &mut d)] {
                    let mut b = g.stream.launch_builder(&g.k.bn_sum_chunks);
                    let fv = from.as_view();
                    b.arg(&fv).arg(&own).arg(&ch).arg(to);
                    run(g, b, grid_1d(c), "bn_sum_chunks")?;
                }
            }
            s.gather(&mut all)?;
            let mut b = g.stream.launch_builder(&g.k.bn_merge_ranks);
            let av = all.as_view();
            b.arg(&av).arg(p).arg(&mut mean).arg(&mut sq);
            run(g, b, grid_1d(c), "bn_merge_ranks")?;
            let (mv, sv) = (mean.as_view(), sq.as_view());
            finalize_var_cuda(g, p, 1, &sv, &mv, &mut rstd, (&mut rm, &mut rv))?;
        }
    }
    let mv = mean.as_view();
    apply(
        g,
        p,
        &x,
        (&mv, &rstd.as_view()),
        (gamma, beta),
        res,
        relu,
        y,
    )
}

/// The train forward's statistics passes: per chunk of each group's rows, partial sums of x
/// (`mean` None; the CPU's stats_sum_cpu) or of (x - mean)^2 (stats_sq_cpu), (G, chunks, C); with
/// `mean`, `dev` (when given) receives the partial sums of x - mean.
fn stats_partial_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &BnParams,
    x: &CudaView<'_, T>,
    mean: Option<&CudaView<'_, f32>>,
    ch: i32,
    partial: &mut CudaViewMut<'_, f32>,
    dev: Option<&mut CudaViewMut<'_, f32>>,
) -> crate::Result<()> {
    let mut b = g.stream.launch_builder(g.k.bn_stats_partial.get::<T>());
    b.arg(x).arg(p).arg(&ch);
    match mean {
        Some(m) => b.arg(m),
        None => b.arg(&NULL),
    };
    b.arg(partial);
    opt_mut(&mut b, dev);
    run(g, b, stats_cfg(p, ch), "bn_stats_partial")
}

/// Every group's mean from its partial sums (the first half of the CPU's finalize_cpu).
fn finalize_mean_cuda(
    g: &Gpu,
    p: &BnParams,
    ch: i32,
    partial: &CudaView<'_, f32>,
    mean: &mut CudaViewMut<'_, f32>,
) -> crate::Result<()> {
    let mut b = g.stream.launch_builder(&g.k.bn_finalize_mean);
    b.arg(partial).arg(p).arg(&ch).arg(mean);
    run(g, b, grid_1d(p.groups() * p.c as usize), "bn_finalize_mean")
}

/// Every group's rstd from its partial squared deviations, and group 0's running statistics
/// updated (the second half of finalize_cpu).
fn finalize_var_cuda(
    g: &Gpu,
    p: &BnParams,
    ch: i32,
    partial: &CudaView<'_, f32>,
    mean: &CudaView<'_, f32>,
    rstd: &mut CudaViewMut<'_, f32>,
    (rm, rv): (&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>),
) -> crate::Result<()> {
    let mut b = g.stream.launch_builder(&g.k.bn_finalize_var);
    b.arg(partial).arg(p).arg(&ch).arg(mean).arg(rstd);
    b.arg(rm).arg(rv);
    run(g, b, grid_1d(p.groups() * p.c as usize), "bn_finalize_var")
}

/// Eval-mode forward with the running statistics; `mean`/`rstd` (C) receive them for backward.
#[allow(clippy::too_many_arguments)]
pub fn forward_eval_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &BnParams,
    x: &impl Dev<T>,
    (gamma, beta): (&impl Dev<f32>, &impl Dev<f32>),
    (running_mean, running_var): (&impl Dev<f32>, &impl Dev<f32>),
    res: Option<CudaView<'_, T>>,
    relu: bool,
    y: &mut impl DevMut<T>,
    (mean, rstd): (&mut impl DevMut<f32>, &mut impl DevMut<f32>),
) -> crate::Result<()> {
    let pe = BnParams {
        group_rows: p.rows,
        world: 1,
        ..*p
    };
    let (n, c, _) = sizes(&pe);
    need(
        "batchnorm::forward_eval_cuda",
        &[
            ("x", x.len(), n),
            ("gamma", gamma.len(), c),
            ("beta", beta.len(), c),
            ("running_mean", running_mean.len(), c),
            ("running_var", running_var.len(), c),
            ("res", res.as_ref().map_or(n, |r| r.len()), n),
            ("y", y.len(), n),
            ("mean", mean.len(), c),
            ("rstd", rstd.len(), c),
        ],
    )?;
    let (rm, rv) = (running_mean.view(), running_var.view());
    let (mut mean, mut rstd) = (mean.view_mut(), rstd.view_mut());
    let mut b = g.stream.launch_builder(&g.k.bn_eval_stats);
    b.arg(&rm).arg(&rv).arg(&pe).arg(&mut mean).arg(&mut rstd);
    run(g, b, grid_1d(c), "bn_eval_stats")?;
    let (mean, rstd) = (mean.as_view(), rstd.as_view());
    apply(g, &pe, x, (&mean, &rstd), (gamma, beta), res, relu, y)
}

/// y = relu?(gamma * xhat + beta + res?); the callers checked every length.
#[allow(clippy::too_many_arguments)]
fn apply<T: GpuFloat>(
    g: &Gpu,
    p: &BnParams,
    x: &impl Dev<T>,
    (mean, rstd): (&CudaView<'_, f32>, &CudaView<'_, f32>),
    (gamma, beta): (&impl Dev<f32>, &impl Dev<f32>),
    res: Option<CudaView<'_, T>>,
    relu: bool,
    y: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let relu = relu as i32;
    let (x, gamma, beta, mut y) = (x.view(), gamma.view(), beta.view(), y.view_mut());
    let mut b = g.stream.launch_builder(g.k.bn_apply.get::<T>());
    b.arg(&x).arg(p).arg(mean).arg(rstd).arg(&gamma).arg(&beta);
    opt(&mut b, res.as_ref());
    b.arg(&relu).arg(&mut y);
    run(g, b, grid_1d(p.rows as usize * p.c as usize), "bn_apply")
}

/// Backward of either mode (`train` picks the formula; eval uses group_rows = rows). `y` is the
/// saved output when the ReLU was fused; `dres` receives the fused residual's gradient.
/// dx, dgamma, dbeta, dres are added to. Under SyncBN (train, p.world > 1) the sums of dy and
/// dy * xhat are added over the ranks through `sync` after dgamma and dbeta took this rank's.
#[allow(clippy::too_many_arguments)]
pub fn backward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &BnParams,
    train: bool,
    x: &impl Dev<T>,
    dy: &impl Dev<T>,
    y: Option<CudaView<'_, T>>,
    (mean, rstd): (&impl Dev<f32>, &impl Dev<f32>),
    gamma: &impl Dev<f32>,
    (dgamma, dbeta): (&mut impl DevMut<f32>, &mut impl DevMut<f32>),
    dx: &mut impl DevMut<T>,
    mut dres: Option<CudaViewMut<'_, T>>,
    sync: Option<&DevSync>,
) -> crate::Result<()> {
    let p = if train {
        *p
    } else {
        BnParams {
            group_rows: p.rows,
            world: 1,
            ..*p
        }
    };
    let sync = check_sync(&p, sync);
    let (n, c, gc) = sizes(&p);
    need(
        "batchnorm::backward_cuda",
        &[
            ("x", x.len(), n),
            ("dy", dy.len(), n),
            ("y", y.as_ref().map_or(n, |v| v.len()), n),
            ("mean", mean.len(), gc),
            ("rstd", rstd.len(), gc),
            ("gamma", gamma.len(), c),
            ("dgamma", dgamma.len(), c),
            ("dbeta", dbeta.len(), c),
            ("dx", dx.len(), n),
            ("dres", dres.as_ref().map_or(n, |v| v.len()), n),
        ],
    )?;
    let ch = chunks(&p);
    let np = gc * ch as usize * 2;
    let mut scratch = g.scratch(np + 2 * gc)?;
    // bn_bwd_partial writes all of `partial`, bn_bwd_finalize all of `gsum`, before any read.
    let mut window = scratch.slice_mut(..np + 2 * gc);
    let (mut partial, mut gsum) = window.split_at_mut(np);
    let (x, dy, mean, rstd, gamma) = (x.view(), dy.view(), mean.view(), rstd.view(), gamma.view());
    let (mut dgamma, mut dbeta, mut dx) = (dgamma.view_mut(), dbeta.view_mut(), dx.view_mut());
    let mut b = g.stream.launch_builder(g.k.bn_bwd_partial.get::<T>());
    b.arg(&x).arg(&dy);
    opt(&mut b, y.as_ref());
    b.arg(&p).arg(&ch).arg(&mean).arg(&rstd).arg(&mut partial);
    run(g, b, stats_cfg(&p, ch), "bn_bwd_partial")?;
    let pv = partial.as_view();
    let mut b = g.stream.launch_builder(&g.k.bn_bwd_finalize);
    b.arg(&pv)
        .arg(&p)
        .arg(&ch)
        .arg(&mut gsum)
        .arg(&mut dgamma)
        .arg(&mut dbeta);
    run(g, b, grid_1d(c), "bn_bwd_finalize")?;
    if let Some(s) = sync {
        s.sum(&mut gsum)?;
    }
    let (gsum, train) = (gsum.as_view(), train as i32);
    let mut b = g.stream.launch_builder(g.k.bn_bwd_apply.get::<T>());
    b.arg(&x).arg(&dy);
    opt(&mut b, y.as_ref());
    b.arg(&p)
        .arg(&mean)
        .arg(&rstd)
        .arg(&gamma)
        .arg(&gsum)
        .arg(&train)
        .arg(&mut dx);
    opt_mut(&mut b, dres.as_mut());
    run(g, b, grid_1d(n), "bn_bwd_apply")
}

// SAFETY: #[repr(C)] of plain i32/f32 fields, the layout of the kernels' BnParams.
unsafe impl cudarc::driver::DeviceRepr for BnParams {}

// ----------------------------------------------------------------------------
// Kernels

use crate::backend::{Backend, Cpu, Cuda, Elem, Ve, VeMut, Vf, VfMut};

/// y = relu?(batchnorm(x) + res?) on a backend (the graph's fused BN node). On the CPU, the
/// reference functions composed: batch norm, then the residual add, then the ReLU.
pub trait BnKernels: Backend {
    /// How this device's ranks add statistics (SyncBN): [`HostSync`] or [`DevSync`].
    type Sync: ?Sized + SyncGroup;
    /// Train mode: batch statistics (per group, or over p.world ranks through `sync`), saved as
    /// mean then rstd; the running statistics (mean then var, one window) updated.
    #[allow(clippy::too_many_arguments)]
    fn bn_forward_train(
        &self,
        p: &BnParams,
        x: &Ve<Self>,
        affine: (&Vf<Self>, &Vf<Self>),
        running: &mut VfMut<Self>,
        res: Option<Ve<Self>>,
        relu: bool,
        y: &mut VeMut<Self>,
        saved: &mut VfMut<Self>,
        sync: Option<&Self::Sync>,
    ) -> crate::Result<()>;
    /// Eval mode: running statistics; `saved` is what the backend's backward wants of them.
    #[allow(clippy::too_many_arguments)]
    fn bn_forward_eval(
        &self,
        p: &BnParams,
        x: &Ve<Self>,
        affine: (&Vf<Self>, &Vf<Self>),
        running: (&Vf<Self>, &Vf<Self>),
        res: Option<Ve<Self>>,
        relu: bool,
        y: &mut VeMut<Self>,
        saved: &mut VfMut<Self>,
    ) -> crate::Result<()>;
    /// dx (and dres) += the input gradients, dgamma and dbeta (one window) += theirs; `y` is the
    /// output where a ReLU was fused.
    #[allow(clippy::too_many_arguments)]
    fn bn_backward(
        &self,
        p: &BnParams,
        train: bool,
        xdy: (&Ve<Self>, &Ve<Self>),
        y: Option<Ve<Self>>,
        saved: (&Vf<Self>, &Vf<Self>),
        running: (&Vf<Self>, &Vf<Self>),
        gamma: &Vf<Self>,
        dgb: &mut VfMut<Self>,
        dx: &mut VeMut<Self>,
        dres: Option<VeMut<Self>>,
        sync: Option<&Self::Sync>,
    ) -> crate::Result<()>;
}

impl<T: Real + Elem> BnKernels for Cpu<T> {
    type Sync = HostSync;
    fn bn_forward_train(
        &self,
        p: &BnParams,
        x: &&[T],
        (gamma, beta): (&&[T], &&[T]),
        running: &mut &mut [T],
        res: Option<&[T]>,
        relu: bool,
        y: &mut &mut [T],
        saved: &mut &mut [T],
        sync: Option<&HostSync>,
    ) -> crate::Result<()> {
        let (rm, rv) = running.split_at_mut(p.c as usize);
        let (mean, rstd) = saved.split_at_mut(saved.len() / 2);
        let post = (res, relu);
        forward_train_fused_cpu(x, (gamma, beta), y, (mean, rstd), (rm, rv), p, sync, post)
    }
    fn bn_forward_eval(
        &self,
        p: &BnParams,
        x: &&[T],
        (gamma, beta): (&&[T], &&[T]),
        (rm, rv): (&&[T], &&[T]),
        res: Option<&[T]>,
        relu: bool,
        y: &mut &mut [T],
        _saved: &mut &mut [T],
    ) -> crate::Result<()> {
        forward_eval_fused_cpu(x, (gamma, beta), (rm, rv), res, relu, y, p);
        Ok(())
    }
    fn bn_backward(
        &self,
        p: &BnParams,
        train: bool,
        (x, dy): (&&[T], &&[T]),
        y: Option<&[T]>,
        (mean, rstd): (&&[T], &&[T]),
        (rm, rv): (&&[T], &&[T]),
        gamma: &&[T],
        dgb: &mut &mut [T],
        dx: &mut &mut [T],
        dres: Option<&mut [T]>,
        sync: Option<&HostSync>,
    ) -> crate::Result<()> {
        let (dg, db) = dgb.split_at_mut(p.c as usize);
        if train {
            // The ReLU's and the residual add's backward inside the BN's own two passes.
            let (grads, stats) = ((&mut **dx, dres), (*mean, *rstd));
            return backward_train_fused_cpu((x, dy, y), gamma, stats, grads, (dg, db), p, sync);
        }
        let rest = |dy: &[T]| {
            if let Some(dr) = dres {
                crate::ops::add::backward_cpu(dy, dr);
            }
            backward_eval_cpu(x, dy, gamma, rm, rv, dx, dg, db, p);
            Ok(())
        };
        match y {
            // The ReLU's backward first, into a zeroed temporary.
            Some(y) => self.with_scratch(dy.len(), |m| {
                crate::ops::relu::backward_cpu(y, dy, m);
                rest(m)
            }),
            None => rest(dy),
        }
    }
}

impl<E: GpuFloat> BnKernels for Cuda<E>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<E>,
{
    type Sync = DevSync;
    fn bn_forward_train(
        &self,
        p: &BnParams,
        x: &Ve<Self>,
        affine: (&Vf<Self>, &Vf<Self>),
        running: &mut VfMut<Self>,
        res: Option<Ve<Self>>,
        relu: bool,
        y: &mut VeMut<Self>,
        saved: &mut VfMut<Self>,
        sync: Option<&DevSync>,
    ) -> crate::Result<()> {
        let (mut rm, mut rv) = running.split_at_mut(p.c as usize);
        let half = saved.len() / 2;
        let (mut mean, mut rstd) = saved.split_at_mut(half);
        let (running, saved) = ((&mut rm, &mut rv), (&mut mean, &mut rstd));
        forward_train_cuda(&self.gpu, p, x, affine, running, res, relu, y, saved, sync)
    }
    fn bn_forward_eval(
        &self,
        p: &BnParams,
        x: &Ve<Self>,
        affine: (&Vf<Self>, &Vf<Self>),
        running: (&Vf<Self>, &Vf<Self>),
        res: Option<Ve<Self>>,
        relu: bool,
        y: &mut VeMut<Self>,
        saved: &mut VfMut<Self>,
    ) -> crate::Result<()> {
        let half = saved.len() / 2;
        let (mut mean, mut rstd) = saved.split_at_mut(half);
        let saved = (&mut mean, &mut rstd);
        forward_eval_cuda(&self.gpu, p, x, affine, running, res, relu, y, saved)
    }
    fn bn_backward(
        &self,
        p: &BnParams,
        train: bool,
        (x, dy): (&Ve<Self>, &Ve<Self>),
        y: Option<Ve<Self>>,
        saved: (&Vf<Self>, &Vf<Self>),
        _running: (&Vf<Self>, &Vf<Self>),
        gamma: &Vf<Self>,
        dgb: &mut VfMut<Self>,
        dx: &mut VeMut<Self>,
        dres: Option<VeMut<Self>>,
        sync: Option<&DevSync>,
    ) -> crate::Result<()> {
        let (mut dg, mut db) = dgb.split_at_mut(p.c as usize);
        let dgb = (&mut dg, &mut db);
        backward_cuda(
            &self.gpu, p, train, x, dy, y, saved, gamma, dgb, dx, dres, sync,
        )
    }
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_ok, check, uniform};

    #[test]
    fn fused_residual_relu_passes_equal_the_separate_ops() {
        // Train (two groups: ghost BN) and eval forward with residual and ReLU, and the train
        // backward through the ReLU into the residual's gradient, against the ops one by one.
        let f = |seed, len, lo, hi| -> Vec<f32> {
            uniform(seed, len, lo, hi)
                .iter()
                .map(|&v| v as f32)
                .collect()
        };
        for p in [BnParams::new(300, 24), BnParams::new(256, 8).ghost(128)] {
            let (r, c, g) = (p.rows as usize, p.c as usize, p.groups());
            let (x, res, dy) = (
                f(1, r * c, -2.0, 2.0),
                f(2, r * c, -1.0, 1.0),
                f(3, r * c, -1.0, 1.0),
            );
            let (gamma, beta) = (f(4, c, 0.5, 1.5), f(5, c, -0.5, 0.5));
            let (rm0, rv0) = (f(6, c, -0.2, 0.2), f(7, c, 0.5, 1.5));
            // Separate: BN, add, ReLU.
            let (mut mu, mut rs) = (vec![0.0f32; g * c], vec![0.0f32; g * c]);
            let (mut rm, mut rv) = (rm0.clone(), rv0.clone());
            let mut bn = vec![0.0f32; r * c];
            forward_train_cpu(
                &x, &gamma, &beta, &mut bn, &mut mu, &mut rs, &mut rm, &mut rv, &p, None,
            )
            .unwrap();
            let mut sum = vec![0.0f32; r * c];
            crate::ops::add::forward_cpu(&bn, &res, &mut sum);
            let mut want = vec![0.0f32; r * c];
            crate::ops::relu::forward_cpu(&sum, &mut want);
            // Fused.
            let (mut mu2, mut rs2) = (vec![0.0f32; g * c], vec![0.0f32; g * c]);
            let (mut rm2, mut rv2) = (rm0.clone(), rv0.clone());
            let mut got = vec![0.0f32; r * c];
            forward_train_fused_cpu(
                &x,
                (&gamma, &beta),
                &mut got,
                (&mut mu2, &mut rs2),
                (&mut rm2, &mut rv2),
                &p,
                None,
                (Some(&res), true),
            )
            .unwrap();
            assert_eq!(got, want, "train forward");
            assert_eq!(
                (mu2.clone(), rs2.clone(), rm2, rv2),
                (mu.clone(), rs.clone(), rm, rv)
            );
            assert!(got.contains(&0.0) && got.iter().any(|&v| v > 0.0));
            // Eval forward.
            let mut bn = vec![0.0f32; r * c];
            forward_eval_cpu(&x, &gamma, &beta, &rm0, &rv0, &mut bn, &p);
            crate::ops::add::forward_cpu(&bn, &res, &mut sum);
            crate::ops::relu::forward_cpu(&sum, &mut want);
            forward_eval_fused_cpu(
                &x,
                (&gamma, &beta),
                (&rm0, &rv0),
                Some(&res),
                true,
                &mut got,
                &p,
            );
            assert_eq!(got, want, "eval forward");
            // Train backward: separate ReLU backward, residual add, BN backward...
            let y = want_train(&x, &res, &gamma, &beta, &p);
            let mut through = vec![0.0f32; r * c];
            crate::ops::relu::backward_cpu(&y, &dy, &mut through);
            let dres0 = f(8, r * c, -1.0, 1.0);
            let mut dres = dres0.clone();
            crate::ops::add::backward_cpu(&through, &mut dres);
            let dx0 = f(9, r * c, -1.0, 1.0);
            let (mut dx, mut dg, mut db) = (dx0.clone(), vec![0.1f32; c], vec![0.2f32; c]);
            backward_train_cpu(
                &x, &through, &gamma, &mu, &rs, &mut dx, &mut dg, &mut db, &p, None,
            )
            .unwrap();
            // ... against one fused backward.
            let (mut dx2, mut dres2) = (dx0.clone(), dres0.clone());
            let (mut dg2, mut db2) = (vec![0.1f32; c], vec![0.2f32; c]);
            backward_train_fused_cpu(
                (&x, &dy, Some(&y)),
                &gamma,
                (&mu, &rs),
                (&mut dx2, Some(&mut dres2)),
                (&mut dg2, &mut db2),
                &p,
                None,
            )
            .unwrap();
            assert_eq!((dx2, dres2, dg2, db2), (dx, dres, dg, db), "train backward");
        }
    }

    /// The train-mode output of BN + residual + ReLU (fused form) for the backward test.
    fn want_train(x: &[f32], res: &[f32], gamma: &[f32], beta: &[f32], p: &BnParams) -> Vec<f32> {
        let (r, c, g) = (p.rows as usize, p.c as usize, p.groups());
        let (mut mu, mut rs) = (vec![0.0f32; g * c], vec![0.0f32; g * c]);
        let (mut rm, mut rv) = (vec![0.0f32; c], vec![1.0f32; c]);
        let mut y = vec![0.0f32; r * c];
        let stats = (&mut mu[..], &mut rs[..]);
        let run = (&mut rm[..], &mut rv[..]);
        let post = (Some(res), true);
        forward_train_fused_cpu(x, (gamma, beta), &mut y, stats, run, p, None, post).unwrap();
        y
    }

    fn gradcheck_train(p: BnParams) {
        let (r, c) = (p.rows as usize, p.c as usize);
        let inputs = vec![
            uniform(1, r * c, -2.0, 3.0),
            uniform(2, c, 0.5, 1.5),
            uniform(3, c, -0.5, 0.5),
        ];
        let g = p.groups();
        let fwd = |xs: &[Vec<f64>]| {
            let mut y = vec![0.0; r * c];
            let (mut mu, mut rs) = (vec![0.0; g * c], vec![0.0; g * c]);
            let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
            forward_train_cpu(
                &xs[0], &xs[1], &xs[2], &mut y, &mut mu, &mut rs, &mut rm, &mut rv, &p, None,
            )
            .unwrap();
            y
        };
        let bwd = |xs: &[Vec<f64>], dy: &[f64]| {
            let mut y = vec![0.0; r * c];
            let (mut mu, mut rs) = (vec![0.0; g * c], vec![0.0; g * c]);
            let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
            forward_train_cpu(
                &xs[0], &xs[1], &xs[2], &mut y, &mut mu, &mut rs, &mut rm, &mut rv, &p, None,
            )
            .unwrap();
            let (mut dx, mut dg, mut db) = (vec![0.0; r * c], vec![0.0; c], vec![0.0; c]);
            backward_train_cpu(
                &xs[0], dy, &xs[1], &mu, &rs, &mut dx, &mut dg, &mut db, &p, None,
            )
            .unwrap();
            vec![Some(dx), Some(dg), Some(db)]
        };
        assert_ok(check(
            "batchnorm",
            &["x", "gamma", "beta"],
            &inputs,
            &fwd,
            &bwd,
        ));
    }

    #[test]
    fn gradcheck_batchnorm() {
        gradcheck_train(BnParams::new(7, 5)); // odd sizes
        gradcheck_train(BnParams::new(2 * 9, 3)); // BN2d: N=2, 3x3 maps
        gradcheck_train(BnParams::new(12, 4).ghost(4)); // three ghost groups
    }

    /// SyncBN: two ranks on threads, each with half the rows, normalize with the statistics of
    /// all of them: outputs, saved and running statistics and dx equal whole-batch BN's (f64, to
    /// rounding), and the ranks' dgamma and dbeta (each its own sums) add up to its.
    #[test]
    fn syncbn_over_two_ranks_equals_whole_batch_bn() {
        use crate::dist::local::{LocalGroup, LocalSync};
        let (r, c) = (2 * 9, 3); // per rank: N=2 of 3x3 maps
                                 // The second rank's rows shifted: the merge's between-rank term matters.
        let mut x = uniform(1, 2 * r * c, -2.0, 3.0);
        x[r * c..].iter_mut().for_each(|v| *v += 2.0);
        let dy = uniform(2, 2 * r * c, -1.0, 1.0);
        let (gamma, beta) = (uniform(3, c, 0.5, 1.5), uniform(4, c, -0.5, 0.5));
        let run = |p: &BnParams, x: &[f64], dy: &[f64], sync: Option<&HostSync>| {
            let n = p.rows as usize * c;
            let mut y = vec![0.0; n];
            let (mut mu, mut rs) = (vec![0.0; c], vec![0.0; c]);
            let (mut rm, mut rv) = (vec![0.1; c], vec![1.2; c]);
            forward_train_cpu(
                x, &gamma, &beta, &mut y, &mut mu, &mut rs, &mut rm, &mut rv, p, sync,
            )
            .unwrap();
            let (mut dx, mut dg, mut db) = (vec![0.0; n], vec![0.0; c], vec![0.0; c]);
            backward_train_cpu(x, dy, &gamma, &mu, &rs, &mut dx, &mut dg, &mut db, p, sync)
                .unwrap();
            [y, mu, rs, rm, rv, dx, dg, db]
        };
        let whole = run(&BnParams::new(2 * r, c), &x, &dy, None);
        let group = LocalGroup::new(2);
        let ranks: Vec<[Vec<f64>; 8]> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|rank| {
                    let sync = LocalSync {
                        group: group.clone(),
                        rank,
                    };
                    let (x, dy) = (&x[rank * r * c..][..r * c], &dy[rank * r * c..][..r * c]);
                    let run = &run;
                    s.spawn(move || run(&BnParams::new(r, c).synced(2), x, dy, Some(&sync)))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let close = |a: &[f64], b: &[f64], what: &str| {
            let d = a
                .iter()
                .zip(b)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(a.len() == b.len() && d < 1e-12, "{what}: differs by {d}");
        };
        let cat = |k: usize| [ranks[0][k].clone(), ranks[1][k].clone()].concat();
        close(&cat(0), &whole[0], "y");
        close(&cat(5), &whole[5], "dx");
        for (k, what) in [
            (1, "mean"),
            (2, "rstd"),
            (3, "running mean"),
            (4, "running var"),
        ] {
            close(&ranks[0][k], &whole[k], what);
            close(&ranks[1][k], &whole[k], what);
        }
        for (k, what) in [(6, "dgamma"), (7, "dbeta")] {
            let sum: Vec<f64> = ranks[0][k]
                .iter()
                .zip(&ranks[1][k])
                .map(|(a, b)| a + b)
                .collect();
            close(&sum, &whole[k], what);
        }
    }

    #[test]
    fn gradcheck_batchnorm_eval() {
        let (r, c) = (6, 3);
        let p = BnParams::new(r, c);
        let rm = uniform(4, c, -0.5, 0.5);
        let rv = uniform(5, c, 0.5, 2.0);
        let inputs = vec![
            uniform(1, r * c, -2.0, 3.0),
            uniform(2, c, 0.5, 1.5),
            uniform(3, c, -0.5, 0.5),
        ];
        let fwd = |xs: &[Vec<f64>]| {
            let mut y = vec![0.0; r * c];
            forward_eval_cpu(&xs[0], &xs[1], &xs[2], &rm, &rv, &mut y, &p);
            y
        };
        let bwd = |xs: &[Vec<f64>], dy: &[f64]| {
            let (mut dx, mut dg, mut db) = (vec![0.0; r * c], vec![0.0; c], vec![0.0; c]);
            backward_eval_cpu(&xs[0], dy, &xs[1], &rm, &rv, &mut dx, &mut dg, &mut db, &p);
            vec![Some(dx), Some(dg), Some(db)]
        };
        assert_ok(check(
            "batchnorm_eval",
            &["x", "gamma", "beta"],
            &inputs,
            &fwd,
            &bwd,
        ));
    }

    #[test]
    fn ghost_groups_equal_separate_batches_and_running_stats_follow_group_0() {
        let (c, m) = (3, 5);
        let x = uniform(9, 3 * m * c, -1.0, 2.0);
        let (gm, gb) = (uniform(10, c, 0.5, 1.5), uniform(11, c, -0.5, 0.5));
        let p = BnParams::new(3 * m, c).ghost(m);
        let mut y = vec![0.0; 3 * m * c];
        let (mut mu, mut rs) = (vec![0.0; 3 * c], vec![0.0; 3 * c]);
        let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
        forward_train_cpu(
            &x, &gm, &gb, &mut y, &mut mu, &mut rs, &mut rm, &mut rv, &p, None,
        )
        .unwrap();
        for g in 0..3 {
            let q = BnParams::new(m, c);
            let mut yg = vec![0.0; m * c];
            let (mut mu1, mut rs1) = (vec![0.0; c], vec![0.0; c]);
            let (mut rm1, mut rv1) = (vec![0.0; c], vec![1.0; c]);
            let xg = &x[g * m * c..][..m * c];
            forward_train_cpu(
                xg, &gm, &gb, &mut yg, &mut mu1, &mut rs1, &mut rm1, &mut rv1, &q, None,
            )
            .unwrap();
            for (a, b) in yg.iter().zip(&y[g * m * c..][..m * c]) {
                assert!((a - b).abs() < 1e-12);
            }
            if g == 0 {
                assert_eq!((rm1.clone(), rv1.clone()), (rm.clone(), rv.clone()));
            }
        }
    }
}
