//! The kNN monitor of LEWEL_SPEC section 6: features L2-normalized (eps 1e-12), exact squared-L2
//! search for the k nearest memory items, unweighted majority vote, ties to the smallest label.

use rayon::prelude::*;

/// L2-normalizes each row of `feats` (rows of `dim`) in place.
pub fn normalize_rows(feats: &mut [f32], dim: usize) {
    for r in feats.chunks_mut(dim) {
        let n = r
            .iter()
            .map(|v| (*v as f64) * (*v as f64))
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        for v in r {
            *v = (*v as f64 / n) as f32;
        }
    }
}

/// Top-1 accuracy in percent of a k-NN majority vote. `memory`/`query` are row-major (n, dim) and
/// already normalized; labels are class indices below `classes`.
pub fn knn_accuracy(
    memory: &[f32],
    memory_labels: &[usize],
    query: &[f32],
    query_labels: &[usize],
    dim: usize,
    k: usize,
    classes: usize,
) -> f64 {
    assert_eq!(
        memory.len(),
        memory_labels.len() * dim,
        "knn: memory rows vs labels"
    );
    assert_eq!(
        query.len(),
        query_labels.len() * dim,
        "knn: query rows vs labels"
    );
    let k = k.min(memory_labels.len());
    let correct: usize = query
        .par_chunks(dim)
        .zip(query_labels.par_iter())
        .map(|(q, &label)| {
            let mut d: Vec<(f64, usize)> = memory
                .chunks(dim)
                .enumerate()
                .map(|(i, m)| {
                    (
                        q.iter()
                            .zip(m)
                            .map(|(a, b)| ((a - b) as f64).powi(2))
                            .sum::<f64>(),
                        i,
                    )
                })
                .collect();
            // Ties in distance go to the earlier memory item, as a stable exact search would.
            d.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut votes = vec![0usize; classes];
            for &(_, i) in &d[..k] {
                votes[memory_labels[i]] += 1;
            }
            let best = votes
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))
                .unwrap()
                .0;
            usize::from(best == label)
        })
        .sum();
    100.0 * correct as f64 / query_labels.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn votes_and_ties() {
        // Memory: two points of class 1 near (1, 0), one of class 0 at (0, 1).
        let mem = [1.0, 0.0, 0.9, 0.1, 0.0, 1.0];
        let labels = [1, 1, 0];
        let q = [0.95, 0.05, 0.1, 0.9];
        assert_eq!(knn_accuracy(&mem, &labels, &q, &[1, 0], 2, 1, 2), 100.0);
        // k = 2 on the second query finds items 2 and 1: one vote each for classes 0 and 1, and the
        // tie goes to class 0.
        assert_eq!(
            knn_accuracy(&mem, &[0, 1, 0], &q[2..], &[0], 2, 2, 2),
            100.0
        );
        assert_eq!(knn_accuracy(&mem, &[0, 1, 0], &q[2..], &[1], 2, 2, 2), 0.0);
        assert_eq!(
            knn_accuracy(&mem, &[0, 0, 1], &q[2..], &[0], 2, 2, 2),
            100.0
        );
    }
}
