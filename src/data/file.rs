//! One safetensors data file, memory-mapped: the header is parsed and checked once, and
//! each [`DataSource::read`] copies the bytes of its examples out of the mapping and
//! then tells the kernel it no longer needs the pages it read whole
//! (`MADV_DONTNEED`), so the resident set stays at a few batches however large the
//! file is (the pages stay in the page cache; a later read maps them again).
//!
//! The mapping assumes the file is not truncated while a fit reads it (a truncated
//! mapping raises SIGBUS, as for any memory-mapped reader).

use std::path::Path;

use memmap2::{Advice, Mmap, UncheckedAdvice};
use safetensors::Dtype;

use super::{DataSource, InputDtype, TargetKind, TargetsMut};
use crate::error::{Error, Result};
use crate::model::tensor_file::Header;

/// One tensor's place in the mapping.
#[derive(Clone, Debug)]
struct Extent {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte offset of element 0 in the file.
    offset: usize,
}

impl Extent {
    fn element_bytes(&self) -> usize {
        self.dtype.bitsize() / 8
    }
}

/// A memory-mapped safetensors file with `x` and `y` (see [`super`] for the format).
pub struct MappedFile {
    label: String,
    map: Mmap,
    x: Extent,
    y: Extent,
    input_dtype: InputDtype,
    targets: TargetKind,
}

impl MappedFile {
    /// Opens, maps and checks the regular file `path`; `what` names it in errors about
    /// what it is (e.g. `--data`).
    pub fn open(path: &Path, what: &str) -> Result<Self> {
        let label = path.display().to_string();
        let (file, header) = Header::read(path, what)?;
        // SAFETY: the mapping is read-only and only ever copied from; the file must not
        // be truncated while it is mapped (see the module docs).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let _ = map.advise(Advice::Sequential);
        let err = |key: &str, msg: String| Error::input(&label, format!("\"{key}\": {msg}"));
        if let Some(key) = header.tensors.keys().find(|k| *k != "x" && *k != "y") {
            return Err(Error::input(
                &label,
                format!("unexpected key \"{key}\" (a data file holds only \"x\" and \"y\")"),
            ));
        }
        let extent = |key: &str, what: &str| -> Result<Extent> {
            let info = header.tensors.get(key).ok_or_else(|| {
                let keys: Vec<&String> = header.tensors.keys().collect();
                Error::input(
                    &label,
                    format!(
                        "missing key \"{key}\" ({what}); the file has {}",
                        if keys.is_empty() {
                            "no tensors".to_string()
                        } else {
                            format!("keys {}", crate::io::cut_list(&keys))
                        }
                    ),
                )
            })?;
            Ok(Extent {
                dtype: info.dtype,
                shape: info.shape.clone(),
                offset: header.data_start as usize + info.data_offsets.0,
            })
        };
        let x = extent(
            "x",
            "the inputs, F32 [N, *input_shape] or I64/I32 token ids [N, T]",
        )?;
        let input_dtype = match x.dtype {
            Dtype::F32 => InputDtype::F32,
            Dtype::I64 => InputDtype::I64,
            Dtype::I32 => InputDtype::I32,
            other => {
                return Err(err(
                    "x",
                    format!("expected dtype F32 (or I64/I32 token ids), found {other:?}"),
                ));
            }
        };
        if x.shape.len() < 2 {
            return Err(err(
                "x",
                format!(
                    "expected shape [N, *input_shape] (at least 2-D), found {:?}",
                    x.shape
                ),
            ));
        }
        let y = extent(
            "y",
            "the targets, I64/I32 class indices [N] or [N, 1], or F32 values [N, C]",
        )?;
        let targets = match (y.dtype, y.shape.as_slice()) {
            (Dtype::I64 | Dtype::I32, [_] | [_, 1]) => TargetKind::Classes,
            (Dtype::I64 | Dtype::I32, shape) => {
                return Err(err(
                    "y",
                    format!(
                        "integer targets are class indices of shape [N] or [N, 1], found {shape:?}"
                    ),
                ));
            }
            (Dtype::F32, [_, cols]) => TargetKind::Values { cols: *cols },
            (Dtype::F32, shape) => {
                return Err(err(
                    "y",
                    format!("F32 targets must have shape [N, C], found {shape:?}"),
                ));
            }
            (other, _) => {
                return Err(err(
                    "y",
                    format!("expected I64/I32 class indices or F32 values, found dtype {other:?}"),
                ));
            }
        };
        if x.shape[0] != y.shape[0] {
            return Err(Error::input(
                &label,
                format!(
                    "\"x\" has {} examples (shape {:?}) but \"y\" has {} (shape {:?})",
                    x.shape[0], x.shape, y.shape[0], y.shape
                ),
            ));
        }
        if x.shape[1..].contains(&0) || matches!(targets, TargetKind::Values { cols: 0 }) {
            return Err(Error::input(
                &label,
                format!(
                    "\"x\" {:?} or \"y\" {:?} has examples with no elements",
                    x.shape, y.shape
                ),
            ));
        }
        if x.shape[0] == 0 {
            return Err(Error::input(&label, "the data set has no examples (N = 0)"));
        }
        Ok(Self {
            label,
            map,
            x,
            y,
            input_dtype,
            targets,
        })
    }

    /// The dtype and shape of `x` and `y` (`[N, …]`), for comparing shards.
    pub(super) fn layout(&self) -> (Dtype, &[usize], Dtype, &[usize]) {
        (
            self.x.dtype,
            &self.x.shape[1..],
            self.y.dtype,
            &self.y.shape[1..],
        )
    }

    /// The bytes of examples `[start, end)` of `extent` (`per` elements each).
    fn bytes(&self, extent: &Extent, per: usize, start: usize, end: usize) -> &[u8] {
        let row = per * extent.element_bytes();
        &self.map[extent.offset + start * row..extent.offset + end * row]
    }

    /// Drops the pages that `bytes` (a slice of the mapping, already copied out) touch
    /// from the resident set.
    fn release(&self, bytes: &[u8]) {
        let page = page_size();
        let begin = bytes.as_ptr() as usize - self.map.as_ptr() as usize;
        let first = begin / page * page;
        let last = ((begin + bytes.len()).div_ceil(page) * page).min(self.map.len());
        if last > first {
            // SAFETY: the mapping is read-only and never handed out; for a file mapping
            // MADV_DONTNEED only unmaps the pages, and any later access (a neighbouring
            // read sharing a boundary page) maps the same file contents again.
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, first, last - first)
            };
        }
    }
}

/// The system's page size (4096 where it cannot be asked).
fn page_size() -> usize {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if size > 0 {
            return size as usize;
        }
    }
    4096
}

/// Copies little-endian words of width `W` from `bytes` into `out` through `convert`.
fn words<const W: usize, T>(
    bytes: &[u8],
    out: &mut [T],
    mut convert: impl FnMut(usize, [u8; W]) -> Result<T>,
) -> Result<()> {
    for (i, (chunk, slot)) in bytes.chunks_exact(W).zip(out.iter_mut()).enumerate() {
        *slot = convert(i, chunk.try_into().expect("W bytes"))?;
    }
    Ok(())
}

impl DataSource for MappedFile {
    fn label(&self) -> &str {
        &self.label
    }

    fn len(&self) -> usize {
        self.x.shape[0]
    }

    fn example_shape(&self) -> &[usize] {
        &self.x.shape[1..]
    }

    fn input_dtype(&self) -> InputDtype {
        self.input_dtype
    }

    fn targets(&self) -> TargetKind {
        self.targets
    }

    fn read(&self, start: usize, end: usize, x: &mut [u32], y: TargetsMut<'_>) -> Result<()> {
        let e = self.example_len();
        let xb = self.bytes(&self.x, e, start, end);
        let id = |i: usize, v: i64| {
            u32::try_from(v).map_err(|_| {
                Error::input(
                    &self.label,
                    format!(
                        "\"x\": x[{}, {}] = {v} is not a token id (0 to {})",
                        start + i / e,
                        i % e,
                        u32::MAX
                    ),
                )
            })
        };
        match self.input_dtype {
            InputDtype::F32 => words::<4, u32>(xb, x, |_, b| Ok(u32::from_le_bytes(b)))?,
            InputDtype::I64 => words::<8, u32>(xb, x, |i, b| id(i, i64::from_le_bytes(b)))?,
            InputDtype::I32 => {
                words::<4, u32>(xb, x, |i, b| id(i, i64::from(i32::from_le_bytes(b))))?
            }
        }
        self.release(xb);
        let per = self.targets.per_example();
        let yb = self.bytes(&self.y, per, start, end);
        match (y, self.y.dtype) {
            (TargetsMut::Classes(out), Dtype::I64) => {
                words::<8, i64>(yb, out, |_, b| Ok(i64::from_le_bytes(b)))?
            }
            (TargetsMut::Classes(out), _) => {
                words::<4, i64>(yb, out, |_, b| Ok(i64::from(i32::from_le_bytes(b))))?
            }
            (TargetsMut::Values(out), _) => {
                words::<4, f32>(yb, out, |_, b| Ok(f32::from_le_bytes(b)))?
            }
        }
        self.release(yb);
        Ok(())
    }
}
