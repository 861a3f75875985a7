//! Vector and matrix files: `[P, K]` or `[P]` tensors read whole ([`read_matrix`]) or a
//! chunk of columns at a time ([`MatrixReader`], [`MatrixWriter`]), for `apply`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::{cut_list, write_atomic};

use crate::error::{Error, Result};
use crate::model::TensorFile;

/// A row-major f32 matrix read from a safetensors file.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    /// The stored shape: `[rows]` or `[rows, cols]`.
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Matrix {
    /// Number of rows (the first dimension).
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    /// Number of columns (1 for a vector).
    pub fn cols(&self) -> usize {
        self.shape.get(1).copied().unwrap_or(1)
    }
}

/// Reads the `[P, K]` or `[P]` tensor `key` (F32 or F64, converted to f32) from a parsed
/// safetensors file; other keys are ignored. Non-finite values are errors.
pub fn matrix_from(file: &TensorFile, key: &str) -> Result<Matrix> {
    let t = file.require(key, "the [P, K] matrix to multiply")?;
    let shape = t.shape.to_vec();
    if shape.is_empty() || shape.len() > 2 {
        return Err(t.err(format!(
            "expected a [P] or [P, K] tensor, found shape {shape:?}"
        )));
    }
    let data = match t.dtype {
        safetensors::Dtype::F32 | safetensors::Dtype::F64 => t.to_f32()?,
        other => return Err(t.err(format!("expected F32 or F64, found {other:?}"))),
    };
    Ok(Matrix { shape, data })
}

/// Reads the `[P]` or `[P, K]` tensor `key` from the safetensors file at `path` (see
/// [`matrix_from`]).
pub fn read_matrix(path: &Path, key: &str) -> Result<Matrix> {
    matrix_from(&TensorFile::load(path)?, key)
}

/// The bytes of a safetensors file of `tensors` (name, shape, f32 data) and optional
/// string metadata; `path` names the output in errors.
pub fn tensor_bytes(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(data),
            )
            .map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::input(path.display(), format!("building the output: {e}")))?;
    safetensors::serialize(views, metadata)
        .map_err(|e| Error::input(path.display(), format!("serialising: {e}")))
}

/// Writes `tensors` (name, shape, f32 data) and optional string metadata as a
/// safetensors file, atomically.
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    write_atomic(path, &tensor_bytes(path, tensors, metadata)?)
}

/// The `[P]` or `[P, K]` F32 or F64 tensor `key` of a safetensors file, read a block of
/// columns at a time with positioned reads, so that a product over many columns needs
/// host memory for one block only. Values are checked as they are read: finite, and
/// from F64 within f32's range; errors name the file, the key and the index.
pub struct MatrixReader {
    file: File,
    label: String,
    key: String,
    /// The stored shape: `[rows]` or `[rows, cols]`.
    pub shape: Vec<usize>,
    f64: bool,
    /// File offset of the tensor's first byte.
    start: u64,
}

/// Bytes read at once when a block of columns is gathered (whole rows at a time).
const READ_BLOCK_BYTES: usize = 8 << 20;

impl MatrixReader {
    /// Opens `path` (a regular file; only its header is read) and finds `key`.
    pub fn open(path: &Path, key: &str, what: &str) -> Result<Self> {
        let (file, header) = crate::model::tensor_file::Header::read(path, what)?;
        let label = path.display().to_string();
        let info = header.tensors.get(key).ok_or_else(|| {
            let keys: Vec<&String> = header.tensors.keys().collect();
            Error::input(
                &label,
                format!(
                    "missing key \"{key}\" (the [P, K] matrix to multiply); the file has {}",
                    if keys.is_empty() {
                        "no tensors".to_string()
                    } else {
                        format!("keys {}", cut_list(&keys))
                    }
                ),
            )
        })?;
        let fail = |msg: String| Error::input(&label, format!("\"{key}\": {msg}"));
        if info.shape.is_empty() || info.shape.len() > 2 {
            return Err(fail(format!(
                "expected a [P] or [P, K] tensor, found shape {:?}",
                info.shape
            )));
        }
        let f64 = match info.dtype {
            safetensors::Dtype::F32 => false,
            safetensors::Dtype::F64 => true,
            other => return Err(fail(format!("expected F32 or F64, found {other:?}"))),
        };
        Ok(Self {
            file,
            key: key.to_string(),
            shape: info.shape.clone(),
            f64,
            start: header.data_start + info.data_offsets.0 as u64,
            label,
        })
    }

    /// Number of rows `P`.
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    /// Number of columns `K` (1 for a vector).
    pub fn cols(&self) -> usize {
        self.shape.get(1).copied().unwrap_or(1)
    }

    /// Columns `first .. first + count` as a row-major `[P, count]` f32 matrix.
    pub fn read_columns(&self, first: usize, count: usize) -> Result<Vec<f32>> {
        #[cfg(unix)]
        use std::os::unix::fs::FileExt;
        let (rows, cols) = (self.rows(), self.cols());
        let width = if self.f64 { 8 } else { 4 };
        let row_bytes = cols * width;
        // All columns: whole rows, many at a time. Some columns: just their range of
        // each row (one positioned read per row).
        let (rows_per_read, read_bytes, skip) = if count == cols {
            ((READ_BLOCK_BYTES / row_bytes.max(1)).max(1), row_bytes, 0)
        } else {
            (1, count * width, first * width)
        };
        let mut out = Vec::with_capacity(rows * count);
        let mut buf = Vec::new();
        for block_start in (0..rows).step_by(rows_per_read) {
            let n = rows_per_read.min(rows - block_start);
            buf.resize(n * read_bytes, 0);
            let offset = self.start + (block_start * row_bytes + skip) as u64;
            #[cfg(unix)]
            self.file
                .read_exact_at(&mut buf, offset)
                .map_err(|e| Error::io(&self.label, e))?;
            #[cfg(not(unix))]
            {
                use std::io::{Seek, SeekFrom};
                let mut f = &self.file;
                f.seek(SeekFrom::Start(offset))
                    .and_then(|_| f.read_exact(&mut buf))
                    .map_err(|e| Error::io(&self.label, e))?;
            }
            for (r, row) in buf.chunks_exact(read_bytes).enumerate() {
                for c in first..first + count {
                    let at = c * width - skip;
                    let bytes = &row[at..at + width];
                    let (value, wide) = if self.f64 {
                        let v = f64::from_le_bytes(bytes.try_into().expect("8 bytes"));
                        (v as f32, v)
                    } else {
                        let v = f32::from_le_bytes(bytes.try_into().expect("4 bytes"));
                        (v, f64::from(v))
                    };
                    if !value.is_finite() {
                        let index = if self.shape.len() == 1 {
                            format!("{}[{}]", self.key, block_start + r)
                        } else {
                            format!("{}[{}, {c}]", self.key, block_start + r)
                        };
                        let msg = if wide.is_finite() {
                            format!("{index} = {wide:e} overflows f32 (largest {:e})", f32::MAX)
                        } else {
                            format!("{index} is {wide} (values must be finite)")
                        };
                        return Err(Error::input(
                            &self.label,
                            format!("\"{}\": {msg}", self.key),
                        ));
                    }
                    out.push(value);
                }
            }
        }
        Ok(out)
    }
}

/// A `[P]` or `[P, K]` F32 safetensors file with one tensor, written a block of
/// columns at a time with positioned writes into a staged output file.
pub struct MatrixWriter<'a> {
    file: &'a File,
    path: PathBuf,
    cols: usize,
    start: u64,
}

impl<'a> MatrixWriter<'a> {
    /// Writes the header of a file holding `key` of `shape` (F32) into `file` and sizes
    /// it; the values follow by [`Self::write_columns`].
    pub fn new(file: &'a File, path: &Path, key: &str, shape: &[usize]) -> Result<Self> {
        #[cfg(unix)]
        use std::os::unix::fs::FileExt;
        let count: usize = shape.iter().product();
        let header = serde_json::json!({
            key: {"dtype": "F32", "shape": shape, "data_offsets": [0, count * 4]}
        });
        let mut text = header.to_string().into_bytes();
        text.resize(text.len().next_multiple_of(8), b' ');
        let mut prefix = (text.len() as u64).to_le_bytes().to_vec();
        prefix.extend_from_slice(&text);
        let start = prefix.len() as u64;
        let io = |e| Error::io(path, e);
        file.set_len(start + 4 * count as u64).map_err(io)?;
        #[cfg(unix)]
        file.write_all_at(&prefix, 0).map_err(io)?;
        #[cfg(not(unix))]
        {
            use std::io::{Seek, SeekFrom};
            let mut f = file;
            f.seek(SeekFrom::Start(0))
                .and_then(|_| f.write_all(&prefix))
                .map_err(io)?;
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            cols: shape.get(1).copied().unwrap_or(1),
            start,
        })
    }

    /// Writes columns `first .. first + count` from the row-major `[P, count]` `values`.
    pub fn write_columns(&self, first: usize, count: usize, values: &[f32]) -> Result<()> {
        #[cfg(unix)]
        use std::os::unix::fs::FileExt;
        let io = |e| Error::io(&self.path, e);
        let bytes: &[u8] = bytemuck::cast_slice(values);
        let write_at = |data: &[u8], offset: u64| -> std::io::Result<()> {
            #[cfg(unix)]
            {
                self.file.write_all_at(data, offset)
            }
            #[cfg(not(unix))]
            {
                use std::io::{Seek, SeekFrom};
                let mut f = self.file;
                f.seek(SeekFrom::Start(offset))?;
                f.write_all(data)
            }
        };
        if count == self.cols {
            return write_at(bytes, self.start + (first * 4) as u64).map_err(io);
        }
        for (row, values) in bytes.chunks_exact(count * 4).enumerate() {
            write_at(values, self.start + ((row * self.cols + first) * 4) as u64).map_err(io)?;
        }
        Ok(())
    }
}
