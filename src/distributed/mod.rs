//! Fits spread over several processes ("ranks"), each on its own adapter: rank `r` of
//! `K` takes batches `r, r + K, r + 2K, …` of both passes over the data, and the ranks
//! combine what they accumulated through a [`Communicator`]:
//!
//! - the Kronecker factors after the factor pass and EKFAC's corrected eigenvalues
//!   after the correction pass are summed by [`Communicator::sum`]: every rank's f32
//!   partial sums are widened to f64 and added in rank order on rank 0, and the sums,
//!   rounded once to f32, go back to every rank, so all ranks hold the same bits and
//!   the result depends on `K` only through the f32 rounding of each rank's partial
//!   sums (the MC samples are keyed by the global example index, so any `K` draws the
//!   same samples);
//! - the eigendecomposition runs on rank 0 only and its eigenbases are broadcast
//!   ([`Communicator::broadcast`]), so every rank rotates with the same bases whatever
//!   adapters the ranks have;
//! - [`agree`] at each step turns one rank's failure into the same error
//!   on every rank (naming the failing rank), so no rank waits forever on a failed one
//!   and no rank writes an output.
//!
//! [`Single`] is the one-process communicator (nothing to combine; a fit with it is
//! exactly the plain fit). With the `mpi` cargo feature, [`mpi::MpiCommunicator`]
//! runs over MPI's world communicator (`mpirun -np K ekfac fit …`).
//!
//! Communication per fit: one sum of the factors, `Σ (D² + d_out²)` floats, one
//! broadcast of their eigenbases (as many floats again, plus the eigenvalues), and
//! one sum of the corrected eigenvalues, `Σ d_out·D` floats.

#[cfg(feature = "mpi")]
pub mod mpi;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The ranks of a distributed fit and how they combine their results. Every method is
/// collective: all ranks call it in the same order with buffers of the same length.
pub trait Communicator {
    /// This process's rank, `0 ≤ rank < size`.
    fn rank(&self) -> usize;

    /// `K`, the number of ranks.
    fn size(&self) -> usize;

    /// Replaces `values` on every rank by the sum over ranks, added in f64 in rank
    /// order (so every rank gets the same bits, whatever the timing).
    fn sum(&self, values: &mut [f64]) -> Result<()>;

    /// Replaces `values` on every rank by rank 0's.
    fn broadcast(&self, values: &mut [f32]) -> Result<()>;

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

    fn sum(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn broadcast(&self, _: &mut [f32]) -> Result<()> {
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

/// Sums f32 values over ranks through f64 ([`Communicator::sum`]), rounding once.
/// With one rank the values are unchanged.
pub fn sum_f32(comm: &dyn Communicator, values: &mut [f32]) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mut wide: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
    comm.sum(&mut wide)?;
    for (v, w) in values.iter_mut().zip(wide) {
        *v = w as f32;
    }
    Ok(())
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
