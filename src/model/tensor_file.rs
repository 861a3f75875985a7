//! Reading safetensors files with errors that name the file, the key and what was expected.
//!
//! The header is parsed here rather than by the `safetensors` crate so that every error
//! names the tensor at fault: its dtype, shape and offsets are checked one key at a time
//! (sizes in checked arithmetic), then the offsets must tile the data section exactly,
//! in order, naming the two keys that overlap or leave a gap. Headers larger than
//! [`MAX_HEADER_BYTES`] are refused before they are read.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::Dtype;
use safetensors::tensor::TensorInfo;

use crate::error::{Error, Result};
use crate::io::{cut_list, thousands};

/// The largest safetensors header read (the `safetensors` crate's own cap, 100 MB).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A safetensors file held in memory (header parsed once, tensors read on demand).
pub struct TensorFile {
    label: String,
    bytes: Vec<u8>,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
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
    /// Reads and parses `path`, which must be a regular file (see [`crate::io`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = crate::io::read_input(path, "a safetensors file", None)?;
        Self::from_bytes(bytes, path.display())
    }

    /// Parses the bytes of a safetensors file; `label` names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, label: impl std::fmt::Display) -> Result<Self> {
        let label = label.to_string();
        let Some(prefix) = bytes.get(..8) else {
            return Err(invalid(
                &label,
                format!(
                    "{} bytes, shorter than the 8-byte header length",
                    bytes.len()
                ),
            ));
        };
        let header_len = header_length(prefix, bytes.len() as u64, &label)?;
        let header = Header::parse(
            &bytes[8..8 + header_len],
            bytes.len() - 8 - header_len,
            &label,
        )?;
        Ok(Self {
            label,
            bytes,
            data_start: 8 + header_len,
            tensors: header.tensors,
            metadata: header.metadata,
        })
    }

    /// The file's name as errors show it.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The value of `key` in the file's string metadata (`__metadata__`), if any.
    pub fn string_metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// The tensor names, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    /// The tensor called `key`, if present.
    pub fn get<'a>(&'a self, key: &'a str) -> Option<TensorRef<'a>> {
        let info = self.tensors.get(key)?;
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
                        format!("keys {}", cut_list(&keys))
                    }
                ),
            )
        })
    }
}

/// `<label>: not a valid safetensors file: <msg>`.
fn invalid(label: &str, msg: String) -> Error {
    Error::input(label, format!("not a valid safetensors file: {msg}"))
}

/// The header length from the 8-byte prefix of a file of `file_len` bytes, checked
/// against [`MAX_HEADER_BYTES`] and the bytes that follow.
fn header_length(prefix: &[u8], file_len: u64, label: &str) -> Result<usize> {
    let header_len = u64::from_le_bytes(prefix.try_into().expect("8 bytes"));
    if header_len > MAX_HEADER_BYTES {
        return Err(invalid(
            label,
            format!(
                "the header length is {header_len} bytes, more than the limit of {} bytes",
                thousands(MAX_HEADER_BYTES as usize)
            ),
        ));
    }
    let available = file_len.saturating_sub(8);
    if header_len > available {
        return Err(invalid(
            label,
            format!("the header length is {header_len} bytes but only {available} bytes follow"),
        ));
    }
    Ok(header_len as usize)
}

/// The parsed header of a safetensors file: every tensor's dtype, shape and offsets
/// (checked against each other and the data section), and the string metadata.
pub struct Header {
    /// Byte offset of the data section in the file.
    pub data_start: u64,
    pub tensors: BTreeMap<String, TensorInfo>,
    pub metadata: HashMap<String, String>,
}

impl Header {
    /// Reads only the header of the regular file `path` (see [`crate::io::read_input`]),
    /// returning the open file to read tensors from.
    pub fn read(path: &Path, what: &str) -> Result<(std::fs::File, Self)> {
        use std::io::Read;
        let label = path.display().to_string();
        let len = crate::io::check_input(path, what, None)?;
        let mut file = crate::io::open_regular(path, what)?;
        let mut prefix = [0u8; 8];
        if len < 8 {
            return Err(invalid(
                &label,
                format!("{len} bytes, shorter than the 8-byte header length"),
            ));
        }
        file.read_exact(&mut prefix)
            .map_err(|e| Error::io(path, e))?;
        let header_len = header_length(&prefix, len, &label)?;
        let mut json = vec![0u8; header_len];
        file.read_exact(&mut json).map_err(|e| Error::io(path, e))?;
        let data_len = usize::try_from(len - 8 - header_len as u64).unwrap_or(usize::MAX);
        let mut header = Self::parse(&json, data_len, &label)?;
        header.data_start = 8 + header_len as u64;
        Ok((file, header))
    }

    /// Parses the header JSON of a file whose data section has `data_len` bytes.
    fn parse(json: &[u8], data_len: usize, label: &str) -> Result<Self> {
        let fail = |msg: String| invalid(label, msg);
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(json)
            .map_err(|e| fail(format!("the header is not a JSON object: {e}")))?;
        let mut tensors = BTreeMap::new();
        let mut metadata = HashMap::new();
        for (key, value) in header {
            if key == "__metadata__" {
                metadata = serde_json::from_value(value).map_err(|e| {
                    fail(format!("\"__metadata__\" must map strings to strings: {e}"))
                })?;
                continue;
            }
            let info: TensorInfo = serde_json::from_value(value).map_err(|e| {
                fail(format!(
                    "\"{key}\": expected {{\"dtype\", \"shape\", \"data_offsets\"}}: {e}"
                ))
            })?;
            let (start, end) = info.data_offsets;
            let bytes_needed = info
                .shape
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .and_then(|n| n.checked_mul(info.dtype.bitsize()))
                .filter(|bits| bits % 8 == 0)
                .map(|bits| bits / 8);
            let Some(bytes_needed) = bytes_needed else {
                return Err(fail(format!(
                    "\"{key}\": shape {:?} of {:?} is not a whole number of bytes that fits \
                     in memory",
                    info.shape, info.dtype
                )));
            };
            if end < start || end - start != bytes_needed || end > data_len {
                return Err(fail(format!(
                    "\"{key}\": data_offsets [{start}, {end}] do not hold {:?} {:?} \
                     ({bytes_needed} bytes) inside the {data_len} bytes of data",
                    info.dtype, info.shape
                )));
            }
            tensors.insert(key, info);
        }
        // The tensors must tile the data section in offset order.
        let mut order: Vec<(&String, &TensorInfo)> = tensors.iter().collect();
        order.sort_by_key(|(_, info)| info.data_offsets);
        let mut covered = 0;
        let mut previous: Option<&str> = None;
        for (key, info) in &order {
            let (start, end) = info.data_offsets;
            if start != covered {
                let after = previous.map_or("the start of the data".to_string(), |p| {
                    format!("\"{p}\", which ends at byte {covered}")
                });
                return Err(fail(format!(
                    "\"{key}\" starts at byte {start} of the data, but {after} ({})",
                    if start < covered {
                        "they overlap"
                    } else {
                        "a gap lies between"
                    }
                )));
            }
            covered = end;
            previous = Some(key);
        }
        if covered != data_len {
            return Err(fail(format!(
                "the tensors cover {covered} bytes of data but {data_len} bytes follow the \
                 header"
            )));
        }
        Ok(Self {
            data_start: 0,
            tensors,
            metadata,
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

    /// The values as f32: F32 as is, F16/BF16/F64 converted (F64 rounds to nearest).
    /// Every value must be finite and, from F64, within f32's range: the error names
    /// the key and the first offending index. Any other dtype is an error.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let values: Vec<f32> = match self.dtype {
            Dtype::F32 => le_words::<4>(self.data).map(f32::from_le_bytes).collect(),
            Dtype::F64 => {
                let wide: Vec<f64> = le_words::<8>(self.data).map(f64::from_le_bytes).collect();
                self.check_finite(&wide, |v| v.is_finite())?;
                let narrow: Vec<f32> = wide.iter().map(|&v| v as f32).collect();
                if let Some(i) = narrow.iter().position(|v| !v.is_finite()) {
                    return Err(self.err(format!(
                        "{} = {:e} overflows f32 (largest {:e})",
                        self.index_name(i),
                        wide[i],
                        f32::MAX
                    )));
                }
                return Ok(narrow);
            }
            Dtype::F16 => le_words::<2>(self.data)
                .map(|b| half::f16::from_le_bytes(b).to_f32())
                .collect(),
            Dtype::BF16 => le_words::<2>(self.data)
                .map(|b| half::bf16::from_le_bytes(b).to_f32())
                .collect(),
            other => {
                return Err(self.err(format!(
                    "expected a floating-point dtype (F32, or F16/BF16/F64 to convert), found \
                     {other:?}"
                )));
            }
        };
        self.check_finite(&values, |v| v.is_finite())?;
        Ok(values)
    }

    /// Errors on the first value that is not `finite`, naming its index.
    fn check_finite<T: Copy + std::fmt::Display>(
        &self,
        values: &[T],
        finite: impl Fn(T) -> bool,
    ) -> Result<()> {
        match values.iter().position(|&v| !finite(v)) {
            None => Ok(()),
            Some(i) => Err(self.err(format!(
                "{} is {} (values must be finite)",
                self.index_name(i),
                values[i]
            ))),
        }
    }

    /// `key[i, j, …]` for the flat row-major index `flat`.
    pub fn index_name(&self, flat: usize) -> String {
        let mut index = vec![0; self.shape.len()];
        let mut rest = flat;
        for (slot, &dim) in index.iter_mut().zip(self.shape).rev() {
            *slot = rest % dim.max(1);
            rest /= dim.max(1);
        }
        let index: Vec<String> = index.iter().map(usize::to_string).collect();
        format!("{}[{}]", self.key, index.join(", "))
    }

    /// The values as f64 from any floating-point dtype (exact conversion).
    pub fn to_f64(&self) -> Result<Vec<f64>> {
        match self.dtype {
            Dtype::F64 => {
                let values: Vec<f64> = le_words::<8>(self.data).map(f64::from_le_bytes).collect();
                self.check_finite(&values, f64::is_finite)?;
                Ok(values)
            }
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
