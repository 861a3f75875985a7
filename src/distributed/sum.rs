//! Sums over batches that do not depend on how the batches are spread over ranks (so
//! not on the number of ranks `K`, nor on timing).
//!
//! The batches form groups of consecutive batches that depend only on `N` and the
//! batch size ([`super::Partition`]; one batch per group up to
//! [`super::MAX_GROUPS`] batches). Each group's contribution to a factor or to the
//! corrected eigenvalues is summed on the GPU in f32 from zero, read back, and added on
//! the host into a [`CompensatedSum`]: per element a double-f64 pair `(hi, lo)` updated
//! by Knuth's error-free TwoSum (Ogita–Rump–Oishi's `Sum2`), so the pair carries the
//! sum of the f32 terms to about 2⁻¹⁰⁶ relative. The ranks' pairs are combined on rank
//! 0 by the same TwoSum in rank order and rounded once to f32, so one process (`K = 1`,
//! which goes through the same rounding) and any `K` give the same f32 bits unless two
//! groupings' sums straddle an f32 rounding boundary: they differ by at most about
//! `n²·2⁻¹⁰⁶` relative for `n` groups, so that happens with probability about
//! `n²·2⁻⁸²` per element — never in practice. (A sum of f32 terms is exact in such a
//! pair whenever an element's terms span less than about 2⁸⁰ in magnitude.)
//!
//! Why on the host: the alternatives were a compensated (double-f32) accumulator on
//! the GPU, whose TwoSum `(s − a)` a shader compiler may legally fold (WGSL has no
//! `precise`, and Mesa's NIR simplifies inexact `a + b − a`), and whose 2⁻⁴⁸ error
//! would round differently on some elements of a large fit; or a fixed-point
//! superaccumulator (~280 bits per f32 element to be exact). The host pair is exact
//! enough on every driver; its cost is one readback of the sums per group (the batch
//! loop waits for each batch anyway) and about 6 f64 operations per element and group,
//! overlapped with the next batch's GPU work (measured in the README's "Running at
//! scale"); the groups bound it to [`super::MAX_GROUPS`] readbacks per pass.

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

/// Threads [`CompensatedSum::add`] uses at most (the adds are memory-bound).
const MAX_THREADS: usize = 8;

/// Elements per thread below which [`CompensatedSum::add`] uses fewer threads.
const PER_THREAD: usize = 1 << 16;

/// `(hi, lo) += terms`, element by element.
fn add_terms(hi: &mut [f64], lo: &mut [f64], terms: &[f32]) {
    for ((hi, lo), &t) in hi.iter_mut().zip(lo).zip(terms) {
        let (s, e) = two_sum(*hi, f64::from(t));
        *hi = s;
        *lo += e;
    }
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

    /// Adds one term per element (`terms.len() == self.len()`). Large sums are split
    /// over up to [`MAX_THREADS`] threads (each element is still added alone, so the
    /// bits do not depend on the split).
    pub fn add(&mut self, terms: &[f32]) {
        debug_assert_eq!(terms.len(), self.len());
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_THREADS)
            .min(self.len() / PER_THREAD)
            .max(1);
        if threads == 1 {
            add_terms(&mut self.hi, &mut self.lo, terms);
            return;
        }
        let chunk = self.len().div_ceil(threads);
        std::thread::scope(|scope| {
            for ((hi, lo), terms) in self
                .hi
                .chunks_mut(chunk)
                .zip(self.lo.chunks_mut(chunk))
                .zip(terms.chunks(chunk))
            {
                scope.spawn(move || add_terms(hi, lo, terms));
            }
        });
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
    fn a_sum_split_over_threads_is_the_sum_in_one() {
        let n = 3 * PER_THREAD + 5;
        let mut split = CompensatedSum::new(n);
        let (mut hi, mut lo) = (vec![0.0; n], vec![0.0; n]);
        for b in 0..3 {
            let terms: Vec<f32> = (0..n).map(|i| ((i * 7 + b) as f32).sin() * 1e3).collect();
            split.add(&terms);
            add_terms(&mut hi, &mut lo, &terms);
        }
        assert!(split.hi == hi && split.lo == lo);
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
