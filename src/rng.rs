//! The counter-based generator behind MC sampling: Philox4x32-10 (Salmon et al. 2011,
//! Random123), identical on the CPU reference and in `shaders/loss.wgsl`.
//!
//! # MC contract
//! - Key: `(seed & 0xffff_ffff, seed >> 32)`.
//! - Counter: `(n, m, c, 0)` with `n` the **global** example index (batch start + row),
//!   `m` the MC sample index and `c` the output index (0 where one draw serves the whole
//!   row). Samples therefore do not depend on the batch size, and the factor pass and the
//!   correction pass see the same samples (curvlinops re-seeds at the start of each pass).
//! - Uniform: word `x` ↦ `(x >> 8)·2⁻²⁴ ∈ [0, 1)`, exact in f32 and f64, so both sides
//!   see the same number.
//! - Gaussian (MSE, one per `(n, m, c)`): Box–Muller on words 0 and 1 of the block,
//!   `u₁ = ((x₀ >> 8) + 1)·2⁻²⁴ ∈ (0, 1]`, `u₂ = (x₁ >> 8)·2⁻²⁴`,
//!   `z = √(−2 ln u₁)·cos(2π u₂)`.
//! - Categorical (CE, one per `(n, m)`): `u` from word 0 of counter `(n, m, 0, 0)`; the
//!   label is the first class `c` with `u < Σ_{j≤c} p_j` (inverse CDF in class order),
//!   the last class if there is none.
//! - Bernoulli (BCE, one per `(n, m, c)`): `y_c = 1` if `u(n, m, c) < p_c`, else 0.
//!
//! The bits are identical on CPU and GPU; the transforms (logarithm, cosine, cumulative
//! sums of probabilities) are computed in f64 here and f32 on the GPU, so a categorical
//! or Bernoulli draw can differ only when `u` lies within f32 rounding of a boundary.

/// Philox multiplier for words 0/1.
const M0: u32 = 0xD251_1F53;
/// Philox multiplier for words 2/3.
const M1: u32 = 0xCD9E_8D57;
/// Weyl key increments.
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// One Philox4x32-10 block: four 32-bit words for `counter` under `key`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut x = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let p0 = u64::from(M0) * u64::from(x[0]);
        let p1 = u64::from(M1) * u64::from(x[2]);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        x = [hi1 ^ x[1] ^ k[0], lo1, hi0 ^ x[3] ^ k[1], lo0];
    }
    x
}

/// The Philox key of `seed`: low word, high word.
pub fn key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// 2⁻²⁴.
const TWO_POW_M24: f64 = 1.0 / 16_777_216.0;

/// A 32-bit word as a uniform number in `[0, 1)`: `(x >> 8)·2⁻²⁴`.
pub fn word_to_uniform(x: u32) -> f64 {
    f64::from(x >> 8) * TWO_POW_M24
}

/// Counter-based sampler for one seed (see the module doc for the contract).
#[derive(Clone, Copy, Debug)]
pub struct Philox {
    key: [u32; 2],
}

impl Philox {
    pub fn new(seed: u64) -> Self {
        Philox { key: key(seed) }
    }

    /// The block for counter `(n, m, c, 0)`.
    pub fn block(&self, n: u32, m: u32, c: u32) -> [u32; 4] {
        philox4x32_10([n, m, c, 0], self.key)
    }

    /// Uniform in `[0, 1)` from word 0 of block `(n, m, c, 0)`.
    pub fn uniform(&self, n: u32, m: u32, c: u32) -> f64 {
        word_to_uniform(self.block(n, m, c)[0])
    }

    /// Standard normal from words 0 and 1 of block `(n, m, c, 0)` (Box–Muller).
    pub fn gaussian(&self, n: u32, m: u32, c: u32) -> f64 {
        let x = self.block(n, m, c);
        let u1 = (f64::from(x[0] >> 8) + 1.0) * TWO_POW_M24;
        let u2 = word_to_uniform(x[1]);
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Class index drawn from probabilities `p` (inverse CDF in class order) with the
    /// uniform of block `(n, m, 0, 0)`.
    pub fn categorical(&self, n: u32, m: u32, p: &[f64]) -> usize {
        let u = self.uniform(n, m, 0);
        let mut cdf = 0.0;
        for (c, &pc) in p.iter().enumerate() {
            cdf += pc;
            if u < cdf {
                return c;
            }
        }
        p.len().saturating_sub(1)
    }

    /// Bernoulli draw (1.0 or 0.0) with success probability `p` for output `c`.
    pub fn bernoulli(&self, n: u32, m: u32, c: u32, p: f64) -> f64 {
        if self.uniform(n, m, c) < p { 1.0 } else { 0.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's `kat_vectors` for philox4x32_10.
    #[test]
    fn known_answers() {
        let cases: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            (
                [0, 0, 0, 0],
                [0, 0],
                [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8],
            ),
            (
                [0xffff_ffff; 4],
                [0xffff_ffff; 2],
                [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd],
            ),
            (
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0],
                [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1],
            ),
        ];
        for (ctr, key, want) in cases {
            assert_eq!(
                philox4x32_10(ctr, key),
                want,
                "counter {ctr:x?} key {key:x?}"
            );
        }
    }

    #[test]
    fn uniform_range_and_moments() {
        let g = Philox::new(2147483647);
        let n = 20000;
        let (mut s, mut s2) = (0.0, 0.0);
        for i in 0..n {
            let z = g.gaussian(i, 0, 0);
            s += z;
            s2 += z * z;
            let u = g.uniform(i, 1, 3);
            assert!((0.0..1.0).contains(&u));
        }
        let mean = s / f64::from(n);
        let var = s2 / f64::from(n) - mean * mean;
        // Standard errors: 1/√n ≈ 0.007 for the mean, √(2/n) ≈ 0.01 for the variance.
        assert!(mean.abs() < 0.04, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
    }
}
