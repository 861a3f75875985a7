//! Fits spread over several processes ("ranks"), each on its own adapter: rank `r` of
//! `K` takes groups `r, r + K, r + 2K, …` of consecutive batches of both passes over
//! the data (one batch per group unless there are more than [`MAX_GROUPS`] batches,
//! see [`Partition`]), and the ranks combine what they accumulated through a
//! [`Communicator`]:
//!
//! - the Kronecker factors after the factor pass and EKFAC's corrected eigenvalues
//!   after the correction pass are per-group f32 sums added on the host into
//!   [`CompensatedSum`]s (one per factor or block), whose double-f64 pairs rank 0
//!   combines in rank order and rounds once to f32 (see [`sum`]): the result is the
//!   same bits for every `K` (one process included) and every timing, and the MC
//!   samples are keyed by the global example index, so any `K` draws the same samples;
//! - the eigendecompositions are spread over the ranks, whole groups of factors of the
//!   same size at a time (see `crate::curvature::fit`), and each is broadcast from the
//!   rank that computed it, so every rank holds the bases one process computes;
//! - [`agree`] at each step turns one rank's failure into the same error on every rank
//!   (naming the failing rank), so no rank waits forever on a failed one and no rank
//!   writes an output. Ranks that wait at such a step sleep rather than spin (with
//!   MPI), leaving the cores to the ranks still working.
//!
//! [`Single`] is the one-process communicator (nothing to combine; a fit with it is
//! exactly the plain fit). With the `mpi` cargo feature, [`mpi::MpiCommunicator`]
//! runs over MPI's world communicator (`mpirun -np K ekfac fit …`).
//!
//! Communication per fit: one gather of the factors' pairs on rank 0, `2·Σ (D² +
//! d_out²)` f64 from each rank, and their f32 sums broadcast back; one broadcast of
//! each eigenbasis (`n² + n` f32 per factor); one gather of the corrected eigenvalues'
//! pairs, `2·Σ d_out·D` f64 per rank, and their f32 sums broadcast back.

#[cfg(feature = "mpi")]
pub mod mpi;
pub mod sum;

pub use sum::CompensatedSum;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The ranks of a distributed fit and how they combine their results. Every method is
/// collective: all ranks call it in the same order with buffers of the same length.
pub trait Communicator {
    /// This process's rank, `0 ≤ rank < size`.
    fn rank(&self) -> usize;

    /// `K`, the number of ranks.
    fn size(&self) -> usize;

    /// Gathers every rank's `values` (the same length on every rank) on rank 0, a
    /// chunk at a time: rank 0 calls `combine(start, gathered)` with `gathered` the
    /// ranks' elements `start .. start + len`, rank-major (`[K, len]`), for consecutive
    /// chunks covering `values`, each chunk's `len` a multiple of 2 (so that pairs stay
    /// whole). The other ranks only send.
    fn gather(&self, values: &[f64], combine: &mut dyn FnMut(usize, &[f64])) -> Result<()>;

    /// Replaces `values` on every rank by rank `root`'s.
    fn broadcast(&self, root: usize, values: &mut [f32]) -> Result<()>;

    /// Every rank's `message` (empty for success), in rank order.
    fn gather_messages(&self, message: &str) -> Result<Vec<String>>;

    /// The smallest `value` over ranks.
    fn min(&self, value: u64) -> Result<u64>;

    /// Returns once every rank has called it.
    fn barrier(&self);
}

/// Turns each rank's outcome into the same result on every rank (collective): `Ok`
/// when every rank succeeded, else an error naming the first failing rank and its
/// message.
pub fn agree<T>(comm: &dyn Communicator, outcome: Result<T>) -> Result<T> {
    if comm.size() == 1 {
        return outcome;
    }
    let message = match &outcome {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    let messages = comm.gather_messages(&message)?;
    match outcome {
        Err(e) => Err(Error::Distributed {
            rank: comm.rank(),
            size: comm.size(),
            message: e.to_string(),
        }),
        Ok(value) => match messages.iter().position(|m| !m.is_empty()) {
            None => Ok(value),
            Some(rank) => Err(Error::Distributed {
                rank,
                size: comm.size(),
                message: messages[rank].clone(),
            }),
        },
    }
}

/// Checks (collective) that every rank holds the same `value`, else the same error on
/// every rank naming `what` and the range of values (e.g. ranks whose `--data` differ
/// in size on an inconsistent file system, which would otherwise sum the wrong terms).
pub fn check_same(comm: &dyn Communicator, what: &str, value: u64) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let low = comm.min(value)?;
    let high = u64::MAX - comm.min(u64::MAX - value)?;
    let outcome = if low == high {
        Ok(())
    } else {
        Err(Error::Options(format!(
            "the ranks disagree on {what}: {value} on this rank, from {low} to {high} over \
             the ranks (every rank must be given the same files and options)"
        )))
    };
    agree(comm, outcome)
}

/// One process: nothing to combine.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn gather(&self, values: &[f64], combine: &mut dyn FnMut(usize, &[f64])) -> Result<()> {
        combine(0, values);
        Ok(())
    }

    fn broadcast(&self, _: usize, _: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn gather_messages(&self, message: &str) -> Result<Vec<String>> {
        Ok(vec![message.to_string()])
    }

    fn min(&self, value: u64) -> Result<u64> {
        Ok(value)
    }

    fn barrier(&self) {}
}

/// One rank's share of a fit's batches.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RankShare {
    pub rank: usize,
    /// Batches this rank ran (in each pass over the data).
    pub batches: usize,
    /// Examples in those batches.
    pub examples: usize,
}

/// At most this many groups of consecutive batches per pass ([`Partition`]).
pub const MAX_GROUPS: usize = 256;

/// One batch of a rank's share ([`Partition::batches`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchSpan {
    /// Its first example.
    pub start: usize,
    /// Its examples.
    pub len: usize,
    /// Whether it is the last batch of its group (the group's sums are then complete).
    pub ends_group: bool,
}

/// Which batches a rank takes. The `B = ⌈n / batch⌉` batches (batch `b` holds examples
/// `b·batch ..`) form groups of `⌈B / MAX_GROUPS⌉` consecutive batches, and group `g`
/// belongs to rank `g mod size`. A group's terms are summed in f32 on the GPU and each
/// group's sum once on the host ([`CompensatedSum`]), so the groups, which depend on
/// `n` and the batch size only, fix every rounding whatever the number of ranks, while
/// a pass reads back at most [`MAX_GROUPS`] sums in all. With fewer than
/// `MAX_GROUPS + 1` batches every group is one batch: rank `r` takes batches
/// `r, r + K, …`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    pub rank: usize,
    pub size: usize,
}

impl Partition {
    /// The partition of `comm`.
    pub fn of(comm: &dyn Communicator) -> Self {
        Self {
            rank: comm.rank(),
            size: comm.size(),
        }
    }

    /// Every batch of `n` examples in batches of `batch`, with its rank, in order.
    fn all(&self, n: usize, batch: usize) -> impl Iterator<Item = (usize, BatchSpan)> {
        let batch = batch.max(1);
        let group = n.div_ceil(batch).div_ceil(MAX_GROUPS).max(1);
        let size = self.size;
        (0..n)
            .step_by(batch)
            .enumerate()
            .map(move |(index, start)| {
                let span = BatchSpan {
                    start,
                    len: batch.min(n - start),
                    ends_group: (index + 1) % group == 0 || start + batch >= n,
                };
                (index / group % size, span)
            })
    }

    /// This rank's batches of `n` examples in batches of `batch`, in order.
    pub fn batches(&self, n: usize, batch: usize) -> impl Iterator<Item = BatchSpan> {
        let rank = self.rank;
        self.all(n, batch)
            .filter(move |&(r, _)| r == rank)
            .map(|(_, span)| span)
    }

    /// Every rank's share of `n` examples in batches of `batch`.
    pub fn shares(&self, n: usize, batch: usize) -> Vec<RankShare> {
        let mut shares: Vec<RankShare> = (0..self.size)
            .map(|rank| RankShare {
                rank,
                batches: 0,
                examples: 0,
            })
            .collect();
        for (rank, span) in self.all(n, batch) {
            shares[rank].batches += 1;
            shares[rank].examples += span.len;
        }
        shares
    }
}

/// Whether the adapter is picked by position ([`adapter_index`]): `EKFAC_ADAPTER_INDEX`
/// or `OMPI_COMM_WORLD_LOCAL_RANK` is set.
pub fn adapter_by_rank() -> bool {
    std::env::var_os("EKFAC_ADAPTER_INDEX").is_some()
        || std::env::var_os("OMPI_COMM_WORLD_LOCAL_RANK").is_some()
}

/// The adapter a rank uses among `count`: `EKFAC_ADAPTER_INDEX` if set, else the
/// node-local rank (`OMPI_COMM_WORLD_LOCAL_RANK`, as OpenMPI's `mpirun` sets it)
/// modulo `count`, else `None` (the default adapter).
pub fn adapter_index(count: usize) -> Result<Option<usize>> {
    if let Ok(text) = std::env::var("EKFAC_ADAPTER_INDEX") {
        let index: usize = text.trim().parse().map_err(|_| {
            Error::Options(format!(
                "EKFAC_ADAPTER_INDEX={text:?} is not a non-negative integer"
            ))
        })?;
        if index >= count {
            return Err(Error::Options(format!(
                "EKFAC_ADAPTER_INDEX={index} but only {count} adapter(s) are present"
            )));
        }
        return Ok(Some(index));
    }
    match std::env::var("OMPI_COMM_WORLD_LOCAL_RANK") {
        Ok(text) => match text.trim().parse::<usize>() {
            Ok(local) if count > 0 => Ok(Some(local % count)),
            _ => Ok(None),
        },
        Err(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_take_whole_groups_of_consecutive_batches() {
        // 6 batches (the last of 5 examples): one batch per group, round robin.
        let spans = |rank, size, n, batch| {
            Partition { rank, size }
                .batches(n, batch)
                .map(|s| (s.start, s.len, s.ends_group))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            spans(1, 2, 45, 8),
            [(8, 8, true), (24, 8, true), (40, 5, true)]
        );
        // 1000 batches of 1: groups of ⌈1000 / 256⌉ = 4, group g on rank g mod 3.
        let mine = spans(2, 3, 1000, 1);
        assert_eq!(
            mine[..5],
            [
                (8, 1, false),
                (9, 1, false),
                (10, 1, false),
                (11, 1, true),
                (20, 1, false)
            ]
        );
        let shares = Partition { rank: 0, size: 3 }.shares(1000, 1);
        let examples: Vec<usize> = shares.iter().map(|s| s.examples).collect();
        // 250 groups: 84, 83, 83 of them.
        assert_eq!(examples, [336, 332, 332]);
        assert_eq!(mine.len(), 332);
        // Every batch belongs to exactly one rank, and each rank's last batch ends its group.
        let mut all: Vec<usize> = (0..3)
            .flat_map(|r| spans(r, 3, 1001, 1))
            .map(|s| s.0)
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..1001).collect::<Vec<_>>());
        assert!((0..3).all(|r| spans(r, 3, 1001, 1).last().unwrap().2));
    }
}
