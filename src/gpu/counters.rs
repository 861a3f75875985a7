//! Counts of the work the crate hands the GPU, per phase label
//! ([`GpuContext::gpu_phase`]): dispatches, submissions (compute passes), host
//! readbacks, and the floating-point operations that the recording ops declare
//! ([`crate::gpu::Recorder::count_flops`]). Unlike timings they do not depend on the driver or the machine's load, so
//! a benchmark can report them as cost drivers. Always on (a few integer additions per
//! submission).

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::gpu::context::GpuContext;
use crate::gpu::profiler::UNLABELLED_PHASE;

/// The work of one phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkCounts {
    /// Dispatches recorded into submitted passes.
    pub dispatches: u64,
    /// Compute passes submitted ([`crate::gpu::Recorder::submit`]), one per submission.
    pub submissions: u64,
    /// Tensors read back to the host ([`GpuContext::read`], [`GpuContext::read_u32`]).
    pub readbacks: u64,
    /// Floating-point operations declared by the ops that recorded the submitted
    /// dispatches ([`crate::gpu::Recorder::count_flops`]; only GEMM-shaped ops declare
    /// any), counted from their shapes.
    pub flops: u64,
}

impl WorkCounts {
    /// `self − earlier`, per field.
    pub fn since(&self, earlier: &WorkCounts) -> WorkCounts {
        WorkCounts {
            dispatches: self.dispatches - earlier.dispatches,
            submissions: self.submissions - earlier.submissions,
            readbacks: self.readbacks - earlier.readbacks,
            flops: self.flops - earlier.flops,
        }
    }
}

/// The counts per phase label and the label of the phase running now.
#[derive(Debug)]
pub(crate) struct WorkCounter {
    inner: Mutex<(String, BTreeMap<String, WorkCounts>)>,
}

impl Default for WorkCounter {
    fn default() -> Self {
        Self {
            inner: Mutex::new((UNLABELLED_PHASE.to_string(), BTreeMap::new())),
        }
    }
}

impl WorkCounter {
    /// Makes `label` the current phase; returns the previous one.
    pub(crate) fn set_phase(&self, label: &str) -> String {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut inner.0, label.to_string())
    }

    fn add(&self, f: impl FnOnce(&mut WorkCounts)) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (label, map) = &mut *inner;
        f(map.entry(label.clone()).or_default());
    }

    /// One submitted pass of `dispatches` dispatches declaring `flops` operations.
    pub(crate) fn submitted(&self, dispatches: usize, flops: u64) {
        self.add(|c| {
            c.submissions += 1;
            c.dispatches += dispatches as u64;
            c.flops += flops;
        });
    }

    /// One tensor read back.
    pub(crate) fn read_back(&self) {
        self.add(|c| c.readbacks += 1);
    }
}

impl GpuContext {
    /// The work counted so far per phase label (see the module docs), since the context
    /// was created; take differences to measure a stretch of work.
    pub fn work_counts(&self) -> BTreeMap<String, WorkCounts> {
        let inner = self.work.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.1.clone()
    }
}
