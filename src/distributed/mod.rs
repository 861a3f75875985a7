//! Fits spread over several processes ("ranks"), each on its own adapter: rank `r` of
//! `K` takes batches `r, r + K, r + 2K, …` of both passes over the data, and the ranks
//! combine what they accumulated through a [`Communicator`]:
//!
//! - the Kronecker factors after the factor pass and EKFAC's corrected eigenvalues
//!   after the correction pass are per-batch f32 contributions added on the host into
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

/// Which batches a rank takes: batch `b` (examples `b·batch .. (b+1)·batch`) belongs
/// to rank `b mod size`.
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

    /// Whether batch `index` is this rank's.
    pub fn takes(&self, index: usize) -> bool {
        index % self.size == self.rank
    }

    /// This rank's batches of `n` examples in batches of `batch`, in order: the
    /// `(start, len)` of each.
    pub fn batches(&self, n: usize, batch: usize) -> impl Iterator<Item = (usize, usize)> {
        let batch = batch.max(1);
        (0..n)
            .step_by(batch)
            .enumerate()
            .filter(move |&(index, _)| self.takes(index))
            .map(move |(_, start)| (start, batch.min(n - start)))
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
        for (index, start) in (0..n).step_by(batch.max(1)).enumerate() {
            let share = &mut shares[index % self.size];
            share.batches += 1;
            share.examples += batch.min(n - start);
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
