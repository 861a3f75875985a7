//! [`Communicator`] over MPI's world communicator (the `mpi` cargo feature, on the
//! system's MPI library, e.g. OpenMPI). Started without `mpirun` it is one rank.
//!
//! MPI failures abort the whole job (MPI's default error handler), so the methods only
//! return `Ok`.
//!
//! OpenMPI's blocking collectives busy-poll. A rank that reaches [`agree`]'s exchange
//! early (its share done, or while another rank eigendecomposes) would spin on a core
//! the working ranks need (the README's K = 2 timings on 2 cores were slower than
//! K = 1 that way), so [`Communicator::gather_messages`] first waits in a
//! non-blocking barrier, testing it every millisecond and sleeping in between.
//!
//! [`agree`]: super::agree

use mpi::Count;
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::Communicator as _;
use mpi::traits::*;

use super::Communicator;
use crate::error::{Error, Result};

/// Values per message of [`Communicator::gather`] and [`Communicator::broadcast`] (even,
/// so that gathered pairs stay whole): rank 0 holds `K` times this many f64 at once.
const CHUNK: usize = 1 << 20;

/// How long a rank waiting in [`MpiCommunicator::wait_for_all`] sleeps between tests.
const IDLE_SLEEP: std::time::Duration = std::time::Duration::from_millis(1);

/// Bytes of a rank's error message that [`Communicator::gather_messages`] passes on.
const MAX_MESSAGE: usize = 64 << 10;

/// The world communicator of an initialised MPI environment (finalised on drop).
pub struct MpiCommunicator {
    world: SimpleCommunicator,
    _universe: Universe,
}

impl MpiCommunicator {
    /// Returns once every rank has called it, sleeping while it waits (a non-blocking
    /// barrier tested every [`IDLE_SLEEP`]).
    fn wait_for_all(&self) {
        let mut request = self.world.immediate_barrier();
        loop {
            match request.test() {
                Ok(_) => return,
                Err(pending) => {
                    request = pending;
                    std::thread::sleep(IDLE_SLEEP);
                }
            }
        }
    }

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

    fn gather(&self, values: &[f64], combine: &mut dyn FnMut(usize, &[f64])) -> Result<()> {
        let root = self.world.process_at_rank(0);
        let k = self.size();
        let mut all = Vec::new();
        for (index, part) in values.chunks(CHUNK).enumerate() {
            if self.rank() == 0 {
                all.resize(part.len() * k, 0.0);
                root.gather_into_root(part, &mut all[..]);
                combine(index * CHUNK, &all);
            } else {
                root.gather_into(part);
            }
        }
        Ok(())
    }

    fn broadcast(&self, root: usize, values: &mut [f32]) -> Result<()> {
        let root = self.world.process_at_rank(root as i32);
        for part in values.chunks_mut(CHUNK) {
            root.broadcast_into(part);
        }
        Ok(())
    }

    fn gather_messages(&self, message: &str) -> Result<Vec<String>> {
        self.wait_for_all();
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
