//! Reading safetensors files with errors that name the file, the key and what was expected.

use std::path::Path;

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// A safetensors file held in memory (header parsed once, tensors read on demand).
pub struct TensorFile {
    label: String,
    bytes: Vec<u8>,
    data_start: usize,
    metadata: Metadata,
}

/// One tensor of a [`TensorFile`]: its dtype, shape and little-endian row-major bytes.
pub struct TensorRef<'a> {
    file: &'a str,
    key: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl TensorFile {
    /// Reads and parses `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(bytes, path.display())
    }

    /// Parses the bytes of a safetensors file; `label` names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, label: impl std::fmt::Display) -> Result<Self> {
        let label = label.to_string();
        let (header, metadata) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::input(&label, format!("not a valid safetensors file: {e:?}")))?;
        Ok(Self {
            label,
            bytes,
            data_start: 8 + header,
            metadata,
        })
    }

    /// The file's name as errors show it.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The value of `key` in the file's string metadata (`__metadata__`), if any.
    pub fn string_metadata(&self, key: &str) -> Option<&str> {
        self.metadata
            .metadata()
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }

    /// The tensor names, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.metadata.tensors().into_keys().collect();
        keys.sort();
        keys
    }

    /// The tensor called `key`, if present.
    pub fn get<'a>(&'a self, key: &'a str) -> Option<TensorRef<'a>> {
        let info: &TensorInfo = self.metadata.info(key)?;
        let (start, end) = info.data_offsets;
        Some(TensorRef {
            file: &self.label,
            key,
            dtype: info.dtype,
            shape: &info.shape,
            data: &self.bytes[self.data_start + start..self.data_start + end],
        })
    }

    /// The tensor called `key`, or an error saying it is missing and what it should hold.
    pub fn require<'a>(&'a self, key: &'a str, what: &str) -> Result<TensorRef<'a>> {
        self.get(key).ok_or_else(|| {
            let keys = self.keys();
            Error::input(
                &self.label,
                format!(
                    "missing key \"{key}\" ({what}); the file has {}",
                    if keys.is_empty() {
                        "no tensors".to_string()
                    } else {
                        format!("keys {keys:?}")
                    }
                ),
            )
        })
    }
}

impl TensorRef<'_> {
    /// An error about this tensor: `<file>: "<key>": <msg>`.
    pub fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::input(self.file, format!("\"{}\": {msg}", self.key))
    }

    /// Checks the shape is exactly `expected`.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(self.err(format!(
                "expected shape {expected:?}, found {:?}",
                self.shape
            )));
        }
        Ok(())
    }

    /// The values as f32: F32 as is, F16/BF16/F64 converted (F64 rounds to nearest);
    /// any other dtype is an error.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        match self.dtype {
            Dtype::F32 => Ok(le_words::<4>(self.data).map(f32::from_le_bytes).collect()),
            Dtype::F64 => Ok(le_words::<8>(self.data)
                .map(|b| f64::from_le_bytes(b) as f32)
                .collect()),
            Dtype::F16 => Ok(le_words::<2>(self.data)
                .map(|b| half::f16::from_le_bytes(b).to_f32())
                .collect()),
            Dtype::BF16 => Ok(le_words::<2>(self.data)
                .map(|b| half::bf16::from_le_bytes(b).to_f32())
                .collect()),
            other => Err(self.err(format!(
                "expected a floating-point dtype (F32, or F16/BF16/F64 to convert), found \
                 {other:?}"
            ))),
        }
    }

    /// The values as f64 from any floating-point dtype (exact conversion).
    pub fn to_f64(&self) -> Result<Vec<f64>> {
        match self.dtype {
            Dtype::F64 => Ok(le_words::<8>(self.data).map(f64::from_le_bytes).collect()),
            _ => Ok(self.to_f32()?.into_iter().map(f64::from).collect()),
        }
    }

    /// The values as i64 from I64 or I32; any other dtype is an error.
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        match self.dtype {
            Dtype::I64 => Ok(le_words::<8>(self.data).map(i64::from_le_bytes).collect()),
            Dtype::I32 => Ok(le_words::<4>(self.data)
                .map(|b| i64::from(i32::from_le_bytes(b)))
                .collect()),
            other => Err(self.err(format!(
                "expected an integer dtype (I64 or I32), found {other:?}"
            ))),
        }
    }
}

/// The little-endian words of width `W` of `data` (whose length the safetensors header
/// check has made a multiple of `W`).
fn le_words<const W: usize>(data: &[u8]) -> impl Iterator<Item = [u8; W]> + '_ {
    data.chunks_exact(W).map(|c| {
        let mut word = [0u8; W];
        word.copy_from_slice(c);
        word
    })
}
