//! Optional GPU timing of the compute passes the crate submits, with timestamp queries.
//!
//! Off by default; [`GpuContext::set_profiling`] turns it on where the device has
//! `TIMESTAMP_QUERY`. While on, every [`crate::gpu::Recorder::submit`] writes a
//! timestamp at the beginning and at the end of its compute pass into a query set and
//! charges the elapsed ticks to the current phase label ([`GpuContext::gpu_phase`]).
//! Nothing is read back per pass: query sets hold 256 passes each (`PASSES_PER_SET`), a
//! full set is resolved into a buffer by the command encoder of the pass that filled
//! it, and the buffers are mapped and summed only when [`GpuContext::gpu_times_ms`]
//! asks for the totals. Uploads and readbacks are copies, not compute passes, and are
//! not timed. While off, submission creates no query set and records no extra copy.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::gpu::context::GpuContext;

/// Compute passes per query set (two timestamps each, far below `QUERY_SET_MAX_QUERIES`).
const PASSES_PER_SET: u32 = 256;

/// Label of passes submitted outside any [`GpuContext::gpu_phase`].
pub const UNLABELLED_PHASE: &str = "unlabelled";

/// The query set being filled: pass `i` wrote its beginning and end timestamps at
/// slots `2i` and `2i + 1` and is charged to phase `phases[i]` (an index into
/// [`Profiler::labels`]).
struct OpenSet {
    queries: wgpu::QuerySet,
    phases: Vec<usize>,
}

/// Timestamps of a full or flushed query set, resolved and copied into a mappable
/// buffer of `2 · phases.len()` little-endian `u64` ticks.
struct ResolvedSet {
    readback: wgpu::Buffer,
    phases: Vec<usize>,
}

/// Timestamp bookkeeping of one [`GpuContext`] while profiling is on.
pub(crate) struct Profiler {
    /// Phase labels seen so far; passes refer to them by index.
    labels: Vec<String>,
    /// Index into `labels` of the phase new passes are charged to.
    current: usize,
    open: Option<OpenSet>,
    resolved: Vec<ResolvedSet>,
    /// Ticks per entry of `labels` from the sets already read back.
    ticks: Vec<u64>,
    /// Nanoseconds per tick (`Queue::get_timestamp_period`).
    period_ns: f64,
}

impl Profiler {
    pub(crate) fn new(period_ns: f32) -> Self {
        Self {
            labels: vec![UNLABELLED_PHASE.to_string()],
            current: 0,
            open: None,
            resolved: Vec::new(),
            ticks: vec![0],
            period_ns: f64::from(period_ns),
        }
    }

    /// Makes `label` the current phase; returns the previous one's label.
    fn set_phase(&mut self, label: &str) -> String {
        let index = match self.labels.iter().position(|l| l == label) {
            Some(i) => i,
            None => {
                self.labels.push(label.to_string());
                self.ticks.push(0);
                self.labels.len() - 1
            }
        };
        let previous = std::mem::replace(&mut self.current, index);
        self.labels[previous].clone()
    }

    /// Reserves the next two timestamp slots for a compute pass of the current phase
    /// and returns the pass's timestamp writes.
    pub(crate) fn timestamp_writes(
        &mut self,
        device: &wgpu::Device,
    ) -> wgpu::ComputePassTimestampWrites<'_> {
        let set = self.open.get_or_insert_with(|| OpenSet {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("pass timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * PASSES_PER_SET,
            }),
            phases: Vec::with_capacity(PASSES_PER_SET as usize),
        });
        let slot = 2 * set.phases.len() as u32;
        set.phases.push(self.current);
        wgpu::ComputePassTimestampWrites {
            query_set: &set.queries,
            beginning_of_pass_write_index: Some(slot),
            end_of_pass_write_index: Some(slot + 1),
        }
    }

    /// After a timed pass was encoded into `encoder`: if its query set is full,
    /// resolves it in the same encoder.
    pub(crate) fn after_pass(&mut self, device: &wgpu::Device, encoder: &mut wgpu::CommandEncoder) {
        if self
            .open
            .as_ref()
            .is_some_and(|s| s.phases.len() == PASSES_PER_SET as usize)
        {
            self.resolve_open(device, encoder);
        }
    }

    /// Resolves the used slots of the open set (only written slots: resolving unwritten
    /// ones is undefined on some backends) and copies them into a mappable buffer.
    fn resolve_open(&mut self, device: &wgpu::Device, encoder: &mut wgpu::CommandEncoder) {
        let Some(set) = self.open.take() else { return };
        if set.phases.is_empty() {
            return;
        }
        let used = 2 * set.phases.len() as u32;
        let bytes = u64::from(used) * wgpu::QUERY_SIZE as u64;
        let resolve = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("resolved timestamps"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let readback = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamp readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        encoder.resolve_query_set(&set.queries, 0..used, &resolve, 0);
        encoder.copy_buffer_to_buffer(&resolve, 0, &readback, 0, bytes);
        self.resolved.push(ResolvedSet {
            readback,
            phases: set.phases,
        });
    }
}

/// Restores the previous GPU phase label when dropped; see [`GpuContext::gpu_phase`].
#[must_use = "the phase ends when the guard is dropped"]
pub struct PhaseGuard<'a> {
    ctx: &'a GpuContext,
    previous: Option<String>,
    /// The work counter's previous phase ([`crate::gpu::counters`]).
    previous_work: Option<String>,
}

impl Drop for PhaseGuard<'_> {
    fn drop(&mut self) {
        if let Some(previous) = self.previous_work.take() {
            self.ctx.work.set_phase(&previous);
        }
        if let Some(previous) = self.previous.take()
            && let Some(p) = self.ctx.profiler_lock().as_mut()
        {
            p.set_phase(&previous);
        }
    }
}

impl GpuContext {
    /// Turns GPU timing of compute passes on or off. Turning it on needs the device's
    /// `TIMESTAMP_QUERY` feature ([`GpuContext::has_timestamps`]); without it this is an
    /// [`Error::Gpu`] and the caller falls back to host timing. Turning it on while on
    /// keeps the totals; turning it off discards them. Profiling changes no result: it
    /// only adds timestamp writes around passes and copies of the query results.
    pub fn set_profiling(&self, on: bool) -> Result<()> {
        let mut profiler = self.profiler_lock();
        if !on {
            *profiler = None;
            return Ok(());
        }
        if !self.has_timestamps() {
            return Err(Error::gpu(
                "enabling GPU profiling",
                format!(
                    "the device on adapter {:?} was created without Features::TIMESTAMP_QUERY \
                     (the adapter lacks it, or EKFAC_FEATURES=none)",
                    self.info.name
                ),
            ));
        }
        if profiler.is_none() {
            *profiler = Some(Profiler::new(self.queue.get_timestamp_period()));
        }
        Ok(())
    }

    /// Whether GPU timing is on ([`GpuContext::set_profiling`]).
    pub fn profiling(&self) -> bool {
        self.profiler_lock().is_some()
    }

    /// Charges the compute passes submitted until the guard is dropped to the phase
    /// `label` (phases nest: dropping the guard restores the enclosing label). The work
    /// counts of [`GpuContext::work_counts`] follow the same labels, profiling or not.
    pub fn gpu_phase(&self, label: &str) -> PhaseGuard<'_> {
        let previous = self.profiler_lock().as_mut().map(|p| p.set_phase(label));
        PhaseGuard {
            ctx: self,
            previous,
            previous_work: Some(self.work.set_phase(label)),
        }
    }

    /// GPU milliseconds per phase label (see [`GpuContext::gpu_phase`];
    /// [`UNLABELLED_PHASE`] for passes outside any phase) of every compute pass
    /// submitted since profiling was turned on, or `None` while it is off. Waits for
    /// the submitted work to finish and reads the timestamps back.
    ///
    /// A pass's time is from the timestamp written at its beginning to the one written
    /// at its end (`ticks × Queue::get_timestamp_period()`); a pair whose end precedes
    /// its beginning (a driver that does not order them) counts as zero.
    pub fn gpu_times_ms(&self) -> Result<Option<BTreeMap<String, f64>>> {
        let mut guard = self.profiler_lock();
        let Some(profiler) = guard.as_mut() else {
            return Ok(None);
        };
        if profiler.open.is_some() {
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
            profiler.resolve_open(&self.device, &mut encoder);
            self.queue.submit([encoder.finish()]);
        }
        let resolved = std::mem::take(&mut profiler.resolved);
        let (sender, receiver) = std::sync::mpsc::channel();
        for (i, set) in resolved.iter().enumerate() {
            let sender = sender.clone();
            set.readback.map_async(wgpu::MapMode::Read, .., move |r| {
                let _ = sender.send((i, r));
            });
        }
        drop(sender);
        self.wait("reading GPU timestamps back")?;
        let mapped: Vec<_> = receiver.try_iter().collect();
        if mapped.len() != resolved.len() {
            return Err(Error::gpu(
                "reading GPU timestamps back",
                format!(
                    "{} of {} timestamp buffers were mapped after the device went idle",
                    mapped.len(),
                    resolved.len()
                ),
            ));
        }
        for (i, result) in mapped {
            result.map_err(|e| Error::gpu("mapping GPU timestamps", e))?;
            let set = &resolved[i];
            let bytes = set
                .readback
                .get_mapped_range(..)
                .map_err(|e| Error::gpu("mapping GPU timestamps", e))?;
            let ticks: Vec<u64> = bytes
                .chunks_exact(8)
                .map(bytemuck::pod_read_unaligned::<u64>)
                .collect();
            for (pair, &phase) in ticks.chunks_exact(2).zip(&set.phases) {
                profiler.ticks[phase] += pair[1].saturating_sub(pair[0]);
            }
        }
        let ms_per_tick = profiler.period_ns * 1e-6;
        Ok(Some(
            profiler
                .labels
                .iter()
                .zip(&profiler.ticks)
                .map(|(l, &t)| (l.clone(), t as f64 * ms_per_tick))
                .collect(),
        ))
    }
}
