//! Sums over batches that do not depend on how the batches are grouped (so not on the
//! number of ranks `K`, nor on timing).
//!
//! Each batch's contribution to a factor or to the corrected eigenvalues is computed
//! on the GPU in f32 on its own (from zero), read back, and added on the host into a
//! [`CompensatedSum`]: per element a double-f64 pair `(hi, lo)` updated by Knuth's
//! error-free TwoSum (Ogita–Rump–Oishi's `Sum2`), so the pair carries the sum of the
//! f32 terms to about 2⁻¹⁰⁶ relative. The ranks' pairs are combined on rank 0 by the
//! same TwoSum in rank order and rounded once to f32, so one process (`K = 1`, which
//! goes through the same rounding) and any `K` give the same f32 bits unless two
//! groupings' sums straddle an f32 rounding boundary: they differ by at most about
//! `n²·2⁻¹⁰⁶` relative for `n` batches, so that happens with probability about
//! `n²·2⁻⁸²` per element — never in practice. (A sum of f32 terms is exact in such a
//! pair whenever an element's terms span less than about 2⁸⁰ in magnitude.)
//!
//! Why on the host: the alternatives were a compensated (double-f32) accumulator on
//! the GPU, whose TwoSum `(s − a)` a shader compiler may legally fold (WGSL has no
//! `precise`, and Mesa's NIR simplifies inexact `a + b − a`), and whose 2⁻⁴⁸ error
//! would round differently on some elements of a large fit; or a fixed-point
//! superaccumulator (~280 bits per f32 element to be exact). The host pair is exact
//! enough on every driver; its cost is one readback of the contributions per batch
//! (the batch loop waits for each batch anyway) and about 6 f64 operations per
//! element and batch (measured in the README's "Running at scale").

use super::Communicator;
use crate::error::Result;

/// Per-element sums of f32 terms as double-f64 pairs (see the module docs).
#[derive(Clone, Debug)]
pub struct CompensatedSum {
    hi: Vec<f64>,
    lo: Vec<f64>,
}

/// `(s, e)` with `s = fl(a + b)` and `s + e = a + b` exactly (Knuth's TwoSum: no
/// branch, and Rust neither reassociates nor contracts float operations).
fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let b_virtual = s - a;
    let a_virtual = s - b_virtual;
    (s, (a - a_virtual) + (b - b_virtual))
}

impl CompensatedSum {
    /// `len` zeros.
    pub fn new(len: usize) -> Self {
        Self {
            hi: vec![0.0; len],
            lo: vec![0.0; len],
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.hi.len()
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.hi.is_empty()
    }

    /// Adds one term per element (`terms.len() == self.len()`).
    pub fn add(&mut self, terms: &[f32]) {
        debug_assert_eq!(terms.len(), self.len());
        for ((hi, lo), &t) in self.hi.iter_mut().zip(&mut self.lo).zip(terms) {
            let (s, e) = two_sum(*hi, f64::from(t));
            *hi = s;
            *lo += e;
        }
    }

    /// The sums over every rank of `comm`, rounded once to f32, on every rank
    /// (collective): rank 0 adds the ranks' pairs in rank order by TwoSum. With one
    /// rank the same rounding applies to this rank's pairs.
    pub fn total(&self, comm: &dyn Communicator) -> Result<Vec<f32>> {
        let n = self.len();
        let k = comm.size();
        // Pairs interleaved, so that each gathered chunk holds whole elements.
        let pairs: Vec<f64> = self
            .hi
            .iter()
            .zip(&self.lo)
            .flat_map(|(&h, &l)| [h, l])
            .collect();
        let mut out = vec![0.0f32; n];
        comm.gather(&pairs, &mut |start, gathered| {
            let len = gathered.len() / k;
            for (j, v) in out[start / 2..(start + len) / 2].iter_mut().enumerate() {
                let (mut hi, mut lo) = (0.0, 0.0);
                for r in 0..k {
                    for &term in &gathered[r * len + 2 * j..r * len + 2 * j + 2] {
                        let (s, e) = two_sum(hi, term);
                        hi = s;
                        lo += e;
                    }
                }
                *v = (hi + lo) as f32;
            }
        })?;
        comm.broadcast(0, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::Single;

    /// Rank 0 of `K` simulated ranks holding these pairs (interleaved `hi, lo`).
    struct Ranks(Vec<Vec<f64>>);

    impl Communicator for Ranks {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            self.0.len()
        }
        fn gather(&self, _: &[f64], combine: &mut dyn FnMut(usize, &[f64])) -> Result<()> {
            combine(0, &self.0.concat());
            Ok(())
        }
        fn broadcast(&self, _: usize, _: &mut [f32]) -> Result<()> {
            Ok(())
        }
        fn gather_messages(&self, _: &str) -> Result<Vec<String>> {
            unreachable!()
        }
        fn min(&self, _: u64) -> Result<u64> {
            unreachable!()
        }
        fn barrier(&self) {}
    }

    /// 23 batches of 40 terms spanning 2⁻³⁰ to 2³¹ with both signs, which an f32
    /// (or f64) running sum does not add exactly.
    fn batches() -> Vec<Vec<f32>> {
        (0..23)
            .map(|b| {
                (0..40)
                    .map(|i| {
                        let e = (b * 7 + i * 13) % 61 - 30;
                        let sign = if (b + i) % 3 == 0 { -1.0 } else { 1.0 };
                        sign * 2f32.powi(e) * (1.0 + (b as f32) / 7.0)
                    })
                    .collect()
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn any_grouping_of_the_batches_gives_the_correctly_rounded_sum() {
        let batches = batches();
        let mut whole = CompensatedSum::new(40);
        for t in &batches {
            whole.add(t);
        }
        let whole = whole.total(&Single).unwrap();
        // Every term is a multiple of 2⁻⁶⁴ below 2³², so i128 adds them exactly.
        let scale = 2f64.powi(64);
        for (i, &v) in whole.iter().enumerate() {
            let exact: i128 = batches
                .iter()
                .map(|t| (f64::from(t[i]) * scale) as i128)
                .sum();
            let want = (exact as f64 / scale) as f32;
            assert_eq!(v.to_bits(), want.to_bits(), "element {i}");
        }
        // Rank r of K adds batches r, r + K, …; rank 0 combines the K pairs.
        for k in [2, 3, 5] {
            let ranks = (0..k)
                .map(|r| {
                    let mut s = CompensatedSum::new(40);
                    for t in batches.iter().skip(r).step_by(k) {
                        s.add(t);
                    }
                    s.hi.iter().zip(&s.lo).flat_map(|(&h, &l)| [h, l]).collect()
                })
                .collect();
            let got = CompensatedSum::new(40).total(&Ranks(ranks)).unwrap();
            assert_eq!(bits(&got), bits(&whole), "K = {k}");
        }
    }
}
