//! Order statistics: NumPy "linear" percentiles by exact selection.

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

/// `np.percentile(values, pct)` (method "linear"), possibly reordering `values`.
/// Panics on an empty slice. Values must not be NaN.
pub fn percentile_mut(values: &mut [f64], pct: f64) -> f64 {
    percentile_mapped(values, pct, |v| v)
}

/// Percentile of `f(v)` where `f` is non-decreasing: order statistics are taken on `values`
/// and only the two neighbours are mapped before NumPy's interpolation.
fn percentile_mapped(values: &mut [f64], pct: f64, f: impl Fn(f64) -> f64) -> f64 {
    let n = values.len();
    assert!(n > 0, "percentile of an empty array");
    match np_virtual_index(n, pct) {
        Err(i) => f(kth_pair(values, i).0),
        Ok((k, g)) => {
            let (a, b) = kth_pair(values, k);
            np_lerp(f(a), f(b), g)
        }
    }
}

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

/// Sample-bracketing selection: a strided sample of 512 values gives thresholds that (very
/// likely) bracket ranks `k` and `k+1`; one pass counts the values below the bracket and
/// gathers those inside, which are then sorted. Returns `None` when the bracket missed (the
/// caller then uses an exact histogram method), so the result is always exact.
pub(crate) fn kth_pair_sampled(values: &[f64], k: usize) -> Option<(f64, f64)> {
    const M: usize = 512;
    const MARGIN: usize = 10;
    let n = values.len();
    let step = n / M;
    let mut sample: Vec<f64> = (0..M).map(|i| values[i * step]).collect();
    if sample.iter().any(|v| v.is_nan()) {
        return None;
    }
    sample.sort_unstable_by(f64::total_cmp);
    let pos = (k as f64 / n as f64 * M as f64) as usize;
    let (t_lo, t_hi) = sample_bracket(&sample, pos, MARGIN);
    let mut below = 0usize;
    let mut inside: Vec<f64> = Vec::with_capacity(4 * MARGIN * n / M + 16);
    for &v in values {
        if v < t_lo {
            below += 1;
        } else if v <= t_hi {
            inside.push(v);
        }
    }
    let need_hi = (k + 1).min(n - 1);
    if below > k || below + inside.len() <= need_hi {
        return None;
    }
    Some(kth_two(&mut inside, k - below, need_hi - below))
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

/// Exact NumPy "linear" percentiles of `f(value(i)), i < n` (`f` non-decreasing): the values
/// are materialised once and handed to [`percentiles_of`]. `value` must be deterministic.
pub fn percentiles_stream(
    n: usize,
    value: impl Fn(usize) -> f64,
    pcts: &[f64],
    f: impl Fn(f64) -> f64 + Copy,
) -> Vec<f64> {
    assert!(n > 0, "percentile of an empty array");
    let mut all: Vec<f64> = (0..n).map(value).collect();
    percentiles_of(&mut all, pcts, f)
}

/// Exact NumPy "linear" percentiles of `f(v)` over `values` (`f` non-decreasing), possibly
/// reordering `values`. For large inputs a strided sample of 512 values brackets each needed
/// rank; one tight pass per percentile counts the values below the bracket and gathers those
/// inside, and a selection on the (few) gathered values gives the exact order statistics.
/// Falls back to [`percentile_mapped`] (selection on everything) when a bracket misses, on
/// NaN, or for small inputs, so the result is always exact.
pub fn percentiles_of(values: &mut [f64], pcts: &[f64], f: impl Fn(f64) -> f64 + Copy) -> Vec<f64> {
    const M: usize = 512;
    const MARGIN: usize = 8;
    let n = values.len();
    assert!(n > 0, "percentile of an empty array");
    if n < 4 * M {
        return pcts.iter().map(|&p| percentile_mapped(values, p, f)).collect();
    }
    let step = n / M;
    let mut sample: Vec<f64> = (0..M).map(|i| values[i * step]).collect();
    if sample.iter().any(|v| v.is_nan()) {
        return pcts.iter().map(|&p| percentile_mapped(values, p, f)).collect();
    }
    sample.sort_unstable_by(f64::total_cmp);
    let mut inside: Vec<f64> = Vec::with_capacity(4 * MARGIN * step + 16);
    let mut out = Vec::with_capacity(pcts.len());
    for &p in pcts {
        // ranks needed: (k, k+1 clamped, gamma)
        let (k, k1, g) = match np_virtual_index(n, p) {
            Ok((k, g)) => (k, (k + 1).min(n - 1), g),
            Err(i) => (i, i, 0.0),
        };
        let pos = (k as f64 / n as f64 * M as f64) as usize;
        let (lo, hi) = sample_bracket(&sample, pos, MARGIN);
        let mut below = 0usize;
        inside.clear();
        // branch-free counting in blocks of 8; the rare blocks with values inside the
        // bracket are gathered in a second look
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
            out.push(percentile_mapped(values, p, f));
            continue;
        }
        let (a, b) = kth_two(&mut inside, k - below, k1 - below);
        out.push(if k1 == k { f(a) } else { np_lerp(f(a), f(b), g) });
    }
    out
}

/// The `k`-th and `(k+1)`-th smallest values (the second equals the first when `k = n-1`).
///
/// Exact. For large inputs a 4096-bucket histogram locates the bucket(s) holding ranks `k` and
/// `k+1`, and only those candidates are sorted: two linear passes instead of a quickselect
/// (several times faster on the ~40k values of a cell). Falls back to `select_nth_unstable`
/// for small or non-finite inputs.
pub fn kth_pair(values: &mut [f64], k: usize) -> (f64, f64) {
    let n = values.len();
    assert!(k < n);
    let select = |values: &mut [f64]| -> (f64, f64) {
        let (_, a, right) = values.select_nth_unstable_by(k, f64::total_cmp);
        let a = *a;
        let b = right.iter().copied().fold(f64::INFINITY, f64::min);
        (a, if k + 1 < n { b } else { a })
    };
    if n < 2048 {
        return select(values);
    }
    if let Some(r) = kth_pair_sampled(values, k) {
        return r;
    }
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for &v in values.iter() {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !(lo.is_finite() && hi.is_finite()) || values.iter().any(|v| v.is_nan()) {
        return select(values);
    }
    if lo == hi {
        return (lo, lo);
    }
    const B: usize = 4096;
    let scale = (B as f64) / (hi - lo);
    // (v - lo) * scale is non-decreasing in v (correctly rounded ops), so bucket order is
    // consistent with value order.
    let bucket = |v: f64| (((v - lo) * scale) as usize).min(B - 1);
    let mut counts = vec![0u32; B];
    for &v in values.iter() {
        counts[bucket(v)] += 1;
    }
    let mut cum = 0usize;
    let mut bk = 0;
    for (b, &c) in counts.iter().enumerate() {
        if cum + c as usize > k {
            bk = b;
            break;
        }
        cum += c as usize;
    }
    let rank = k - cum;
    // the (k+1)-th is in the same bucket, or the smallest of the next non-empty one
    let mut bn = bk;
    if rank + 1 >= counts[bk] as usize && k + 1 < n {
        bn = (bk + 1..B).find(|&b| counts[b] > 0).unwrap_or(bk);
    }
    let mut cand: Vec<f64> = values
        .iter()
        .copied()
        .filter(|&v| {
            let b = bucket(v);
            b == bk || b == bn
        })
        .collect();
    cand.sort_unstable_by(f64::total_cmp);
    let a = cand[rank];
    let b = if k + 1 < n { cand[rank + 1] } else { a };
    (a, b)
}
