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

/// Ranks `k` and `k1` (`k1 = k` or `k + 1`) through the sample bracket; `None` when it missed.
fn bracketed_pair(
    values: &[f64],
    sample: &[f64],
    k: usize,
    k1: usize,
    inside: &mut Vec<f64>,
) -> Option<(f64, f64)> {
    let n = values.len();
    let pos = (k as f64 / n as f64 * sample.len() as f64) as usize;
    let (lo, hi) = sample_bracket(sample, pos, MARGIN);
    let mut below = 0usize;
    inside.clear();
    // branch-free counting in blocks of 8; the rare blocks with values inside the bracket
    // are gathered in a second look
    let mut blocks = values.chunks_exact(8);
    for b in &mut blocks {
        let mut nb = 0usize;
        let mut any = false;
        for &v in b {
            nb += (v < lo) as usize;
            any |= (v >= lo) & (v <= hi);
        }
        below += nb;
        if any {
            inside.extend(b.iter().filter(|&&v| v >= lo && v <= hi));
        }
    }
    for &v in blocks.remainder() {
        below += (v < lo) as usize;
        if v >= lo && v <= hi {
            inside.push(v);
        }
    }
    // NaN is neither below nor inside (it sorts last, like "above" the bracket)
    if below > k || below + inside.len() <= k1 {
        return None;
    }
    Some(kth_two(inside, k - below, k1 - below))
}

/// Exact NumPy "linear" percentiles (`np.percentile(values, pcts)`) of `f(v)` over `values`,
/// where `f` is non-decreasing: order statistics are taken on `values` and only the two
/// neighbours are mapped before NumPy's interpolation. May reorder `values`. Panics on an empty
/// slice.
pub fn percentiles(values: &mut [f64], pcts: &[f64], f: impl Fn(f64) -> f64) -> Vec<f64> {
    let n = values.len();
    assert!(n > 0, "percentile of an empty array");
    let sample: Option<Vec<f64>> = (n >= 4 * SAMPLE)
        .then(|| {
            let step = n / SAMPLE;
            let mut s: Vec<f64> = (0..SAMPLE).map(|i| values[i * step]).collect();
            s.sort_unstable_by(f64::total_cmp);
            s
        })
        .filter(|s| !s.iter().any(|v| v.is_nan()));
    let mut inside: Vec<f64> = Vec::new();
    pcts.iter()
        .map(|&p| {
            let (k, k1, g) = match np_virtual_index(n, p) {
                Ok((k, g)) => (k, k + 1, Some(g)),
                Err(i) => (i, i, None),
            };
            let (a, b) = sample
                .as_deref()
                .and_then(|s| bracketed_pair(values, s, k, k1, &mut inside))
                .unwrap_or_else(|| kth_two(values, k, k1));
            match g {
                Some(g) => np_lerp(f(a), f(b), g),
                None => f(a),
            }
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
