//! Storage buffers with a shape, their upload and readback.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::context::{GpuContext, MemoryCounter};

/// One storage buffer, counted by the context's [`MemoryCounter`] while it lives.
struct Allocation {
    buffer: wgpu::Buffer,
    bytes: u64,
    memory: Arc<MemoryCounter>,
}

impl Drop for Allocation {
    fn drop(&mut self) {
        self.memory.release(self.bytes);
    }
}

/// A dense, row-major array of 4-byte elements (`f32`, or `u32` where a kernel says so)
/// in one storage buffer. Several tensors may view the same buffer with different
/// shapes ([`GpuTensor::view`]); the buffer lives, and is counted, until the last goes.
/// A [`GpuTensor::released`] tensor keeps only its shape: binding or reading it is an
/// error.
pub struct GpuTensor {
    /// `None` once released.
    allocation: Option<Arc<Allocation>>,
    shape: Vec<usize>,
    /// Byte offset of element 0 in the buffer: non-zero only for a [`GpuTensor::window`].
    offset: u64,
}

impl std::fmt::Debug for GpuTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuTensor{:?}", self.shape)
    }
}

impl GpuTensor {
    /// The shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The underlying buffer (`STORAGE | COPY_SRC | COPY_DST`); an error once released.
    pub fn buffer(&self) -> Result<&wgpu::Buffer> {
        self.allocation.as_ref().map(|a| &a.buffer).ok_or_else(|| {
            Error::gpu(
                "binding a tensor",
                format!(
                    "the tensor of shape {:?} was released (a forward value no backward \
                         declared it reads, see Layer::saved)",
                    self.shape
                ),
            )
        })
    }

    /// Whether the tensor was released: it has a shape and no buffer.
    pub fn is_released(&self) -> bool {
        self.allocation.is_none()
    }

    /// The same shape without the buffer: this handle no longer keeps the memory alive
    /// (other views of the buffer still do).
    pub fn released(&self) -> Self {
        Self {
            allocation: None,
            shape: self.shape.clone(),
            offset: 0,
        }
    }

    /// Bytes a kernel binding this tensor binds: its elements (at least 16 bytes for a
    /// whole buffer, which zero-sized bindings would make invalid).
    pub fn binding_size(&self) -> u64 {
        match &self.allocation {
            Some(a) if self.offset == 0 && self.len() * 4 < 16 => a.bytes,
            _ => (self.len() * 4) as u64,
        }
    }

    /// How a kernel binds this tensor: its elements only, which for a
    /// [`GpuTensor::window`] is a range of the buffer; an error once released.
    pub fn binding(&self) -> Result<wgpu::BindingResource<'_>> {
        Ok(wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.buffer()?,
            offset: self.offset,
            size: std::num::NonZeroU64::new(self.binding_size()),
        }))
    }

    /// A flat view of `len` elements starting at element `start`, for binding part of
    /// a tensor larger than one storage binding. `start · 4` must be a multiple of
    /// `alignment` bytes (the adapter's `min_storage_buffer_offset_alignment`).
    pub fn window(&self, start: usize, len: usize, alignment: u64) -> Result<Self> {
        let offset = self.offset + (start * 4) as u64;
        if len == 0 || start + len > self.len() || !offset.is_multiple_of(alignment) {
            return Err(Error::gpu(
                "window",
                format!(
                    "cannot bind elements {start}..{} of {:?} at byte offset {offset} \
                     (alignment {alignment})",
                    start + len,
                    self.shape
                ),
            ));
        }
        Ok(Self {
            allocation: self.allocation.clone(),
            shape: vec![len],
            offset,
        })
    }

    /// The same buffer seen with another shape of the same element count (no copy).
    pub fn view(&self, shape: &[usize]) -> Result<Self> {
        if shape.iter().product::<usize>() != self.len() {
            return Err(Error::gpu(
                "reshape",
                format!("cannot view {:?} as {shape:?}", self.shape),
            ));
        }
        Ok(Self {
            allocation: self.allocation.clone(),
            shape: shape.to_vec(),
            offset: self.offset,
        })
    }

    /// Changes the shape without moving data; the element count must stay the same.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        self.view(shape)
    }
}

impl GpuContext {
    /// Elements of one storage binding (`max_storage_buffer_binding_size / 4`) and the
    /// element alignment of a binding's offset (`min_storage_buffer_offset_alignment / 4`).
    pub fn binding_elements(&self) -> (usize, usize) {
        (
            (self.limits.max_storage_buffer_binding_size / 4) as usize,
            (self.limits.min_storage_buffer_offset_alignment as usize / 4).max(1),
        )
    }

    /// How to bind elements `first .. first + len` of `t`: the whole tensor when it fits
    /// one binding, otherwise the window from `first` rounded down to the offset
    /// alignment; returns the tensor to bind and the element index its element 0 has in
    /// `t` (subtract it from offsets into `t`). An error when the window does not fit.
    pub fn binding_window(
        &self,
        t: &GpuTensor,
        first: usize,
        len: usize,
    ) -> Result<(GpuTensor, usize)> {
        let (limit, align) = self.binding_elements();
        if t.len() <= limit {
            return Ok((t.view(t.shape())?, 0));
        }
        let start = first / align * align;
        let count = first + len - start;
        if count > limit {
            return Err(Error::Memory(format!(
                "elements {first}..{} of a tensor of shape {:?} span {} bytes, more than \
                 the adapter's max_storage_buffer_binding_size of {} bytes",
                first + len,
                t.shape(),
                count * 4,
                limit * 4
            )));
        }
        Ok((t.window(start, count, (align * 4) as u64)?, start))
    }
}

fn byte_len(shape: &[usize]) -> u64 {
    // Zero-sized bindings are invalid; every buffer holds at least 16 bytes.
    ((shape.iter().product::<usize>() * 4) as u64).max(16)
}

impl GpuContext {
    fn allocate(&self, shape: &[usize], contents: Option<&[u8]>) -> Result<GpuTensor> {
        let bytes = byte_len(shape);
        if bytes > self.limits.max_buffer_size {
            return Err(Error::Memory(format!(
                "a tensor of shape {shape:?} needs {bytes} bytes, more than the adapter's \
                 max_buffer_size of {} bytes",
                self.limits.max_buffer_size
            )));
        }
        let buffer = self.scoped(&format!("allocating {bytes} bytes for {shape:?}"), || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })?;
        if let Some(data) = contents.filter(|d| !d.is_empty()) {
            self.queue.write_buffer(&buffer, 0, data);
        }
        self.memory.allocate(bytes);
        Ok(GpuTensor {
            allocation: Some(Arc::new(Allocation {
                buffer,
                bytes,
                memory: self.memory.clone(),
            })),
            shape: shape.to_vec(),
            offset: 0,
        })
    }

    /// A zero-filled tensor.
    pub fn zeros(&self, shape: &[usize]) -> Result<GpuTensor> {
        self.allocate(shape, None)
    }

    /// Uploads `data` (row-major, `shape.iter().product()` elements).
    pub fn upload(&self, data: &[f32], shape: &[usize]) -> Result<GpuTensor> {
        check_len(data.len(), shape)?;
        self.allocate(shape, Some(bytemuck::cast_slice(data)))
    }

    /// Uploads unsigned integers (class indices, counters).
    pub fn upload_u32(&self, data: &[u32], shape: &[usize]) -> Result<GpuTensor> {
        check_len(data.len(), shape)?;
        self.allocate(shape, Some(bytemuck::cast_slice(data)))
    }

    /// Overwrites the contents of `tensor` with `data`.
    pub fn write(&self, tensor: &GpuTensor, data: &[f32]) -> Result<()> {
        check_len(data.len(), tensor.shape())?;
        if !data.is_empty() {
            self.queue
                .write_buffer(tensor.buffer()?, tensor.offset, bytemuck::cast_slice(data));
        }
        Ok(())
    }

    /// Waits for all submitted work and reads `tensor` back.
    pub fn read(&self, tensor: &GpuTensor) -> Result<Vec<f32>> {
        Ok(bytemuck::cast_slice(&self.read_bytes(&[tensor])?[0]).to_vec())
    }

    /// Waits for all submitted work and reads every tensor of `tensors` back in one
    /// readback (one staging buffer, one submission, one wait): element `i` of the result
    /// is `tensors[i]`'s contents.
    pub fn read_many(&self, tensors: &[&GpuTensor]) -> Result<Vec<Vec<f32>>> {
        Ok(self
            .read_bytes(tensors)?
            .iter()
            .map(|bytes| bytemuck::cast_slice(bytes).to_vec())
            .collect())
    }

    /// Like [`Self::read`], for tensors holding `u32`.
    pub fn read_u32(&self, tensor: &GpuTensor) -> Result<Vec<u32>> {
        Ok(bytemuck::cast_slice(&self.read_bytes(&[tensor])?[0]).to_vec())
    }

    /// The bytes of each tensor, copied into one staging buffer back to back (every
    /// length is a multiple of 4, wgpu's copy alignment) and mapped once.
    fn read_bytes(&self, tensors: &[&GpuTensor]) -> Result<Vec<Vec<u8>>> {
        self.work.read_back();
        let lens: Vec<u64> = tensors.iter().map(|t| (t.len() * 4) as u64).collect();
        let total: u64 = lens.iter().sum();
        if total == 0 {
            return Ok(vec![Vec::new(); tensors.len()]);
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: total,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
        let mut at = 0;
        for (tensor, &len) in tensors.iter().zip(&lens) {
            if len > 0 {
                encoder.copy_buffer_to_buffer(tensor.buffer()?, tensor.offset, &staging, at, len);
            }
            at += len;
        }
        self.queue.submit([encoder.finish()]);
        let (sender, receiver) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = sender.send(r);
        });
        self.wait("reading a tensor back")?;
        receiver
            .recv()
            .map_err(|e| Error::gpu("mapping a readback buffer", e))?
            .map_err(|e| Error::gpu("mapping a readback buffer", e))?;
        let bytes = {
            let mapped = staging
                .get_mapped_range(..)
                .map_err(|e| Error::gpu("mapping a readback buffer", e))?;
            let mut at = 0;
            lens.iter()
                .map(|&len| {
                    let part = mapped[at as usize..(at + len) as usize].to_vec();
                    at += len;
                    part
                })
                .collect()
        };
        staging.unmap();
        Ok(bytes)
    }
}

fn check_len(len: usize, shape: &[usize]) -> Result<()> {
    let expected: usize = shape.iter().product();
    if len != expected {
        return Err(Error::gpu(
            "upload",
            format!("shape {shape:?} needs {expected} elements, got {len}"),
        ));
    }
    Ok(())
}
