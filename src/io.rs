//! File helpers shared by the state file and the command line: atomic writes and
//! reading one matrix out of a safetensors file.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::TensorFile;

/// Writes `bytes` to `path` through a temporary file in the same directory and a
/// rename, so a failure never leaves a partial file at `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

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

/// Reads the `[P]` or `[P, K]` tensor `key` (F32 or F64, converted to f32) from the
/// safetensors file at `path`; other keys are ignored. Non-finite values are errors.
pub fn read_matrix(path: &Path, key: &str) -> Result<Matrix> {
    let file = TensorFile::load(path)?;
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
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(t.err(format!("element {i} is not finite ({})", data[i])));
    }
    Ok(Matrix { shape, data })
}

/// Writes `tensors` (name, shape, f32 data) and optional string metadata as a
/// safetensors file, atomically.
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
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
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| Error::input(path.display(), format!("serialising: {e}")))?;
    write_atomic(path, &bytes)
}
