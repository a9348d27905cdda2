//! Order statistics: NumPy "linear" percentiles by exact selection.
//!
//! One routine, [`percentiles`], serves every caller (angle percentiles and `maxC` of Macenko).
//! It is exact (the same value as sorting and indexing, for every input including ties and NaN):
//! for large inputs a strided sample brackets each needed rank, one tight pass counts the values
//! below the bracket and gathers those inside, and a selection on the few gathered values gives
//! the order statistics; when a bracket misses (or for small inputs, or NaN in the sample) the
//! selection runs on everything.

/// NumPy's `_lerp` (used by the "linear" percentile), including its `t >= 0.5` branch.
#[inline]
pub(crate) fn np_lerp(a: f64, b: f64, t: f64) -> f64 {
    let d = b - a;
    if t >= 0.5 {
        b - d * (1.0 - t)
    } else {
        a + d * t
    }
}

/// Position of the `pct` percentile in a sorted array of `n` values, as NumPy computes it:
/// `(k, gamma)` with `k` the lower index, or `Err(index)` when the result is a single element.
pub(crate) fn np_virtual_index(n: usize, pct: f64) -> std::result::Result<(usize, f64), usize> {
    let q = pct / 100.0;
    let vi = (n as f64 * q + (1.0 - q)) - 1.0;
    if vi >= (n - 1) as f64 {
        return Err(n - 1);
    }
    if vi < 0.0 {
        return Err(0);
    }
    let lo = vi.floor();
    Ok((lo as usize, vi - lo))
}

/// Size of the strided sample that brackets a rank.
const SAMPLE: usize = 512;
/// Sample places kept on each side of the estimated rank.
const MARGIN: usize = 8;

/// Bracket around position `pos` of a sorted sample: the values `margin` places below and above it
/// (open-ended at the sample's ends). The true order statistic lies inside with high probability.
fn sample_bracket(sample: &[f64], pos: usize, margin: usize) -> (f64, f64) {
    let lo = if pos >= margin {
        sample[pos - margin]
    } else {
        f64::NEG_INFINITY
    };
    let hi = if pos + margin + 1 < sample.len() {
        sample[pos + margin + 1]
    } else {
        f64::INFINITY
    };
    (lo, hi)
}

/// The `a`-th and `b`-th smallest values (`b` is `a` or `a + 1`) in `total_cmp` order, by
/// selection instead of a full sort (same values as sorting).
fn kth_two(v: &mut [f64], a: usize, b: usize) -> (f64, f64) {
    debug_assert!(b == a || b == a + 1);
    let (_, x, right) = v.select_nth_unstable_by(a, f64::total_cmp);
    let x = *x;
    if b == a {
        return (x, x);
    }
    let y = right.iter().copied().min_by(f64::total_cmp).expect("b < len");
    (x, y)
}

/// Where one percentile lies in `n` sorted values: ranks `k` and `k1` (`k1 = k` or `k + 1`) and
/// NumPy's interpolation weight (`None` when the result is the single element `k`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RankPlan {
    pub k: usize,
    pub k1: usize,
    pub g: Option<f64>,
}

impl RankPlan {
    pub(crate) fn new(n: usize, pct: f64) -> RankPlan {
        match np_virtual_index(n, pct) {
            Ok((k, g)) => RankPlan { k, k1: k + 1, g: Some(g) },
            Err(i) => RankPlan { k: i, k1: i, g: None },
        }
    }

    /// The percentile from the order statistics `a` (rank `k`) and `b` (rank `k1`), mapped by `f`.
    pub(crate) fn finish(&self, a: f64, b: f64, f: impl Fn(f64) -> f64) -> f64 {
        match self.g {
            Some(g) => np_lerp(f(a), f(b), g),
            None => f(a),
        }
    }

    /// The order statistics from a counting pass (`below` values under the bracket, `inside` the
    /// values in it); `None` when the bracket missed a rank.
    pub(crate) fn pair_from_counts(&self, below: usize, inside: &mut [f64]) -> Option<(f64, f64)> {
        // NaN is neither below nor inside (it sorts last, like "above" the bracket)
        if below > self.k || below + inside.len() <= self.k1 {
            return None;
        }
        Some(kth_two(inside, self.k - below, self.k1 - below))
    }
}

/// The sorted strided sample `at(i * (n / SAMPLE))`, `i < SAMPLE`, used to bracket ranks; `None`
/// for small inputs (`n < 4 * SAMPLE`, exact selection on everything is cheap) or when the
/// sample holds a NaN.
pub(crate) fn sorted_sample(n: usize, at: impl Fn(usize) -> f64) -> Option<Vec<f64>> {
    if n < 4 * SAMPLE {
        return None;
    }
    let step = n / SAMPLE;
    // sorted as integers in `f64::total_cmp` order (the key `total_cmp` itself compares; the map
    // is its own inverse), cheaper than sorting with the comparison closure
    let key = |b: i64| b ^ (((b >> 63) as u64) >> 1) as i64;
    let mut k: Vec<i64> = Vec::with_capacity(SAMPLE);
    for i in 0..SAMPLE {
        let v = at(i * step);
        if v.is_nan() {
            return None;
        }
        k.push(key(v.to_bits() as i64));
    }
    k.sort_unstable();
    Some(k.into_iter().map(|b| f64::from_bits(key(b) as u64)).collect())
}

/// The bracket `[lo, hi]` of rank `k` among `n` values, from their sorted sample.
pub(crate) fn rank_bracket(sample: &[f64], n: usize, k: usize) -> (f64, f64) {
    let pos = (k as f64 / n as f64 * sample.len() as f64) as usize;
    sample_bracket(sample, pos, MARGIN)
}

/// Exact NumPy "linear" percentiles (`np.percentile(values, pcts)`) of `f(v)` over `values`,
/// where `f` is non-decreasing: order statistics are taken on `values` and only the two
/// neighbours are mapped before NumPy's interpolation. All the brackets are counted in one pass
/// over `values`. May reorder `values`. Panics on an empty slice.
pub fn percentiles(values: &mut [f64], pcts: &[f64], f: impl Fn(f64) -> f64) -> Vec<f64> {
    let n = values.len();
    assert!(n > 0, "percentile of an empty array");
    let plans: Vec<RankPlan> = pcts.iter().map(|&p| RankPlan::new(n, p)).collect();
    let mut found: Vec<Option<(f64, f64)>> = vec![None; plans.len()];
    if let Some(sample) = sorted_sample(n, |i| values[i]) {
        let br: Vec<(f64, f64)> = plans.iter().map(|p| rank_bracket(&sample, n, p.k)).collect();
        let mut below = vec![0usize; br.len()];
        let mut inside: Vec<Vec<f64>> = vec![Vec::new(); br.len()];
        // branch-free counting in blocks of 8; the rare blocks with values inside a bracket
        // are gathered in a second look
        let mut blocks = values.chunks_exact(8);
        for b in &mut blocks {
            for (j, &(lo, hi)) in br.iter().enumerate() {
                let mut nb = 0usize;
                let mut any = false;
                for &v in b {
                    nb += (v < lo) as usize;
                    any |= (v >= lo) & (v <= hi);
                }
                below[j] += nb;
                if any {
                    inside[j].extend(b.iter().filter(|&&v| v >= lo && v <= hi));
                }
            }
        }
        for &v in blocks.remainder() {
            for (j, &(lo, hi)) in br.iter().enumerate() {
                below[j] += (v < lo) as usize;
                if v >= lo && v <= hi {
                    inside[j].push(v);
                }
            }
        }
        for j in 0..plans.len() {
            found[j] = plans[j].pair_from_counts(below[j], &mut inside[j]);
        }
    }
    plans
        .iter()
        .zip(found)
        .map(|(p, got)| {
            let (a, b) = got.unwrap_or_else(|| kth_two(values, p.k, p.k1));
            p.finish(a, b, &f)
        })
        .collect()
}

/// `np.percentile(values, pct)` of one percentile (see [`percentiles`]).
pub fn percentile_mut(values: &mut [f64], pct: f64) -> f64 {
    percentiles(values, &[pct], |v| v)[0]
}

/// Reference: sort a copy and index it (NumPy's definition, no selection tricks).
#[cfg(test)]
pub(crate) fn percentile_sorted(values: &[f64], pct: f64, f: impl Fn(f64) -> f64) -> f64 {
    let mut s = values.to_vec();
    s.sort_by(f64::total_cmp);
    match np_virtual_index(s.len(), pct) {
        Ok((k, g)) => np_lerp(f(s[k]), f(s[k + 1]), g),
        Err(i) => f(s[i]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stain::tests::Rng;

    fn same(a: f64, b: f64) -> bool {
        a == b || (a.is_nan() && b.is_nan())
    }

    #[test]
    fn matches_numpy_linear() {
        // np.percentile([3, 1, 2, 10], [0, 1, 50, 99, 100, 25]) = [1, 1.03, 2.5, 9.79, 10, 1.75]
        let base = [3.0, 1.0, 2.0, 10.0];
        let expect = [
            (0.0, 1.0),
            (1.0, 1.03),
            (50.0, 2.5),
            (99.0, 9.79),
            (100.0, 10.0),
            (25.0, 1.75),
        ];
        for (p, e) in expect {
            let mut v = base;
            let got = percentile_mut(&mut v, p);
            assert!((got - e).abs() < 1e-12, "p={p}: {got} vs {e}");
        }
        let mut one = [5.0];
        assert_eq!(percentile_mut(&mut one, 99.0), 5.0);
    }

    #[test]
    fn exact_with_nan_ties_outliers_and_skew() {
        let mut rng = Rng::new(8);
        for n in [1usize, 2, 3, 5, 2047, 2048, 5000, 9000, 40_000, 44_000] {
            for dist in 0..6 {
                let v: Vec<f64> = (0..n)
                    .map(|i| match dist {
                        0 => rng.unit(),
                        1 => (rng.next() % 3) as f64, // many ties
                        2 => -(rng.unit().powi(8)),   // skewed
                        3 if i == n / 3 => f64::NAN,
                        4 if i % 100 == 0 => 1e6, // outliers
                        5 if i >= n / 2 => 10.0 + rng.unit(), // sorted halves
                        _ => rng.unit(),
                    })
                    .collect();
                let pcts = [1.0, 99.0, 0.0, 100.0, 37.5, 50.0];
                let mut w = v.clone();
                let got = percentiles(&mut w, &pcts, |x| x * 3.0);
                for (j, &p) in pcts.iter().enumerate() {
                    let want = percentile_sorted(&v, p, |x| x * 3.0);
                    assert!(same(got[j], want), "n={n} dist={dist} p={p}: {} vs {want}", got[j]);
                }
            }
        }
    }

    #[test]
    fn sorted_sample_is_total_cmp_order() {
        let mut rng = Rng::new(2);
        let specials = [0.0, -0.0, f64::INFINITY, f64::NEG_INFINITY, 1e-310, -1e-310, f64::MIN, f64::MAX];
        let v: Vec<f64> = (0..3000)
            .map(|i| if i % 50 == 0 { specials[i / 50 % 8] } else { rng.unit() - 0.5 })
            .collect();
        let got = sorted_sample(v.len(), |i| v[i]).unwrap();
        let step = v.len() / SAMPLE;
        let mut want: Vec<f64> = (0..SAMPLE).map(|i| v[i * step]).collect();
        want.sort_by(f64::total_cmp);
        assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        assert!(sorted_sample(100, |i| v[i]).is_none());
        assert!(sorted_sample(3000, |i| if i == 0 { f64::NAN } else { v[i] }).is_none());
    }

    #[test]
    fn bracket_miss_falls_back_exactly() {
        // a strided sample that sees only one value: every bracket misses
        let n = 4096;
        let v: Vec<f64> = (0..n).map(|i| if i % 8 == 0 { 0.5 } else { i as f64 }).collect();
        for p in [1.0, 50.0, 99.0] {
            let mut w = v.clone();
            assert_eq!(percentile_mut(&mut w, p), percentile_sorted(&v, p, |x| x));
        }
    }
}
