//! [`Communicator`] over MPI's world communicator (the `mpi` cargo feature, on the
//! system's MPI library, e.g. OpenMPI). Started without `mpirun` it is one rank.
//!
//! MPI failures abort the whole job (MPI's default error handler), so the methods only
//! return `Ok`.

use mpi::Count;
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::Communicator as _;
use mpi::traits::*;

use super::Communicator;
use crate::error::{Error, Result};

/// Values per message of [`Communicator::sum`] and [`Communicator::broadcast`]: rank 0
/// holds `K` times this many f64 at once.
const CHUNK: usize = 1 << 20;

/// Bytes of a rank's error message that [`Communicator::gather_messages`] passes on.
const MAX_MESSAGE: usize = 64 << 10;

/// The world communicator of an initialised MPI environment (finalised on drop).
pub struct MpiCommunicator {
    world: SimpleCommunicator,
    _universe: Universe,
}

impl MpiCommunicator {
    /// Initialises MPI (once per process).
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize()
            .ok_or_else(|| Error::Options("MPI was initialised twice in one process".into()))?;
        Ok(Self {
            world: universe.world(),
            _universe: universe,
        })
    }
}

impl Communicator for MpiCommunicator {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn sum(&self, values: &mut [f64]) -> Result<()> {
        let root = self.world.process_at_rank(0);
        let k = self.size();
        for part in values.chunks_mut(CHUNK) {
            let n = part.len();
            if self.rank() == 0 {
                let mut all = vec![0.0f64; n * k];
                root.gather_into_root(&part[..], &mut all[..]);
                for (i, v) in part.iter_mut().enumerate() {
                    *v = (0..k).fold(0.0, |sum, r| sum + all[r * n + i]);
                }
            } else {
                root.gather_into(&part[..]);
            }
            root.broadcast_into(part);
        }
        Ok(())
    }

    fn broadcast(&self, values: &mut [f32]) -> Result<()> {
        let root = self.world.process_at_rank(0);
        for part in values.chunks_mut(CHUNK) {
            root.broadcast_into(part);
        }
        Ok(())
    }

    fn gather_messages(&self, message: &str) -> Result<Vec<String>> {
        let mut cut = message.len().min(MAX_MESSAGE);
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        // A leading byte, so that no rank sends nothing (empty buffers are refused).
        let mut bytes = vec![b'|'];
        bytes.extend_from_slice(&message.as_bytes()[..cut]);
        let len = bytes.len() as Count;
        let mut counts = vec![0 as Count; self.size()];
        self.world.all_gather_into(&len, &mut counts[..]);
        let displs: Vec<Count> = counts
            .iter()
            .scan(0, |at, &c| {
                let d = *at;
                *at += c;
                Some(d)
            })
            .collect();
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let mut all = vec![0u8; total];
        {
            let mut partition = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.world
                .all_gather_varcount_into(&bytes[..], &mut partition);
        }
        Ok(counts
            .iter()
            .zip(&displs)
            .map(|(&c, &d)| {
                String::from_utf8_lossy(&all[d as usize + 1..(d + c) as usize]).into_owned()
            })
            .collect())
    }

    fn barrier(&self) {
        self.world.barrier();
    }

    fn min(&self, value: u64) -> Result<u64> {
        let mut out = 0u64;
        self.world
            .all_reduce_into(&value, &mut out, SystemOperation::min());
        Ok(out)
    }
}
