//! Dense 3x3 / 3x2 linear algebra for the stain models.

/// Eigen-decomposition of a symmetric 3x3 matrix (cyclic Jacobi). Returns eigenvalues in
/// ascending order and the matching unit eigenvectors as **columns** (like `np.linalg.eigh`).
pub fn sym_eigen3(m: [[f64; 3]; 3]) -> ([f64; 3], [[f64; 3]; 3]) {
    let mut a = m;
    let mut v = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    let scale = a.iter().flatten().map(|x| x * x).sum::<f64>();
    for _sweep in 0..64 {
        let off = a[0][1] * a[0][1] + a[0][2] * a[0][2] + a[1][2] * a[1][2];
        if off <= scale * 1e-32 || off == 0.0 {
            break;
        }
        for (p, q) in [(0usize, 1usize), (0, 2), (1, 2)] {
            let apq = a[p][q];
            if apq == 0.0 {
                continue;
            }
            let theta = (a[q][q] - a[p][p]) / (2.0 * apq);
            let t = if theta >= 0.0 {
                1.0 / (theta + (theta * theta + 1.0).sqrt())
            } else {
                -1.0 / (-theta + (theta * theta + 1.0).sqrt())
            };
            let c = 1.0 / (t * t + 1.0).sqrt();
            let s = t * c;
            for k in 0..3 {
                let (akp, akq) = (a[k][p], a[k][q]);
                a[k][p] = c * akp - s * akq;
                a[k][q] = s * akp + c * akq;
            }
            for k in 0..3 {
                let (apk, aqk) = (a[p][k], a[q][k]);
                a[p][k] = c * apk - s * aqk;
                a[q][k] = s * apk + c * aqk;
            }
            for row in v.iter_mut() {
                let (vkp, vkq) = (row[p], row[q]);
                row[p] = c * vkp - s * vkq;
                row[q] = s * vkp + c * vkq;
            }
        }
    }
    let mut order = [0usize, 1, 2];
    order.sort_by(|&i, &j| a[i][i].total_cmp(&a[j][j]));
    let vals = [a[order[0]][order[0]], a[order[1]][order[1]], a[order[2]][order[2]]];
    let mut vecs = [[0.0; 3]; 3];
    for (col, &o) in order.iter().enumerate() {
        for r in 0..3 {
            vecs[r][col] = v[r][o];
        }
    }
    (vals, vecs)
}


/// Pseudo-inverse of a full-rank 3x2 matrix; `None` when the columns are (nearly) collinear.
pub fn pinv_3x2(he: &[[f64; 2]; 3]) -> Option<[[f64; 3]; 2]> {
    let mut g = [[0.0; 2]; 2];
    for i in 0..2 {
        for j in 0..2 {
            g[i][j] = (0..3).map(|r| he[r][i] * he[r][j]).sum();
        }
    }
    let det = g[0][0] * g[1][1] - g[0][1] * g[1][0];
    let norm = g[0][0] * g[1][1];
    if !(det.is_finite() && norm > 0.0 && det > 1e-10 * norm) {
        return None;
    }
    let inv = [[g[1][1] / det, -g[0][1] / det], [-g[1][0] / det, g[0][0] / det]];
    let mut p = [[0.0; 3]; 2];
    for i in 0..2 {
        for r in 0..3 {
            p[i][r] = inv[i][0] * he[r][0] + inv[i][1] * he[r][1];
        }
    }
    Some(p)
}


/// Inverse of a 3x3 matrix (cofactors).
pub fn inv3(m: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
    let mut r = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            let (a, b) = ((j + 1) % 3, (j + 2) % 3);
            let (c, d) = ((i + 1) % 3, (i + 2) % 3);
            r[i][j] = (m[a][c] * m[b][d] - m[a][d] * m[b][c]) / det;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stain::MACENKO_HE_REF;

    #[test]
    fn eigen_decomposition_reconstructs() {
        let m = [[2.0, 0.5, 0.1], [0.5, 1.0, 0.3], [0.1, 0.3, 0.5]];
        let (vals, v) = sym_eigen3(m);
        assert!(vals[0] <= vals[1] && vals[1] <= vals[2]);
        for i in 0..3 {
            for j in 0..3 {
                let rec: f64 = (0..3).map(|k| v[i][k] * vals[k] * v[j][k]).sum();
                assert!((rec - m[i][j]).abs() < 1e-12, "A[{i}][{j}]");
                let dot: f64 = (0..3).map(|k| v[k][i] * v[k][j]).sum();
                assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        let (vals, _) = sym_eigen3([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]);
        assert_eq!(vals, [1.0, 2.0, 3.0]);
    }

    #[test]
    fn pinv_is_left_inverse() {
        let p = pinv_3x2(&MACENKO_HE_REF).unwrap();
        for i in 0..2 {
            for j in 0..2 {
                let v: f64 = (0..3).map(|r| p[i][r] * MACENKO_HE_REF[r][j]).sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        assert!(pinv_3x2(&[[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]]).is_none());
    }

    #[test]
    fn inv3_inverts() {
        let m = [[2.0, 0.5, 0.1], [0.4, 1.0, 0.3], [0.1, 0.2, 0.5]];
        let r = inv3(&m);
        for i in 0..3 {
            for j in 0..3 {
                let v: f64 = (0..3).map(|k| m[i][k] * r[k][j]).sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
    }
}
