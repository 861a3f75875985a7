//! The data set: inputs `x` and targets `y` from a safetensors file, held on the host and
//! handed out in contiguous batches.
//!
//! File format: `x` F32 `[N, *input_shape]`, or I64/I32 token ids `[N, *input_shape]`
//! for a graph input of dtype `i64`; `y` either I64/I32 class indices `[N]` or `[N, 1]`
//! (cross-entropy) or F32 values `[N, C]` (MSE, BCE). No other keys.

use std::path::Path;

use safetensors::Dtype;

use super::tensor_file::TensorFile;
use crate::error::{Error, Result};
use crate::graph::{Graph, InputType};
use crate::layers::batched_shape;

/// The whole data set, row-major and example-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// `[len, *example_shape]` float inputs; empty for token data.
    pub x: Vec<f32>,
    /// `[len, *example_shape]` token ids (a graph input of dtype `i64`), uploaded to the
    /// GPU as u32 words; `None` for float data.
    pub ids: Option<Vec<u32>>,
    /// The shape of one example (the model's `input_shape`).
    pub example_shape: Vec<usize>,
    pub y: Targets,
    /// `N`, the number of examples.
    pub len: usize,
}

/// The targets of every example.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Class indices `[N]` (cross-entropy).
    Classes(Vec<i64>),
    /// Target values `[N, cols]`, row-major (MSE, BCE).
    Values { data: Vec<f32>, cols: usize },
}

/// The targets of one batch, borrowed from a [`Dataset`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TargetsSlice<'a> {
    /// Class indices `[len]`.
    Classes(&'a [i64]),
    /// Target values `[len, cols]`.
    Values { data: &'a [f32], cols: usize },
}

/// Examples `start .. start + len` of a [`Dataset`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Batch<'a> {
    pub start: usize,
    pub len: usize,
    /// `[len, *example_shape]` float inputs (empty for token data).
    pub x: &'a [f32],
    /// `[len, *example_shape]` token ids, for token data.
    pub ids: Option<&'a [u32]>,
    pub y: TargetsSlice<'a>,
}

impl Targets {
    fn describe(&self, n: usize) -> String {
        match self {
            Targets::Classes(_) => format!("class indices [{n}]"),
            Targets::Values { cols, .. } => format!("F32 values [{n}, {cols}]"),
        }
    }
}

impl Dataset {
    /// Reads `x` and `y` from a safetensors file (see the module docs), checking dtypes,
    /// shapes, that both have the same `N ≥ 1`, and that every float is finite.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_tensor_file(&TensorFile::load(path)?)
    }

    /// Like [`Dataset::load`], then [`Dataset::check`] with errors naming the file.
    pub fn load_checked(path: impl AsRef<Path>, spec: &Graph, classes: bool) -> Result<Self> {
        let file = TensorFile::load(path)?;
        let data = Self::from_tensor_file(&file)?;
        data.check_as(spec, classes, file.label())?;
        Ok(data)
    }

    /// Reads `x` and `y` from a parsed safetensors file.
    pub fn from_tensor_file(file: &TensorFile) -> Result<Self> {
        let label = file.label();
        if let Some(key) = file.keys().into_iter().find(|k| k != "x" && k != "y") {
            return Err(Error::input(
                label,
                format!("unexpected key \"{key}\" (a data file holds only \"x\" and \"y\")"),
            ));
        }
        let x = file.require(
            "x",
            "the inputs, F32 [N, *input_shape] (or I64/I32 token ids [N, *input_shape])",
        )?;
        if !matches!(x.dtype, Dtype::F32 | Dtype::I64 | Dtype::I32) {
            return Err(x.err(format!(
                "expected dtype F32 (or I64/I32 token ids), found {:?}",
                x.dtype
            )));
        }
        if x.shape.len() < 2 {
            return Err(x.err(format!(
                "expected shape [N, *input_shape] (at least 2-D), found {:?}",
                x.shape
            )));
        }
        let y = file.require(
            "y",
            "the targets, I64/I32 class indices [N] or [N, 1], or F32 values [N, C]",
        )?;
        let targets = match (y.dtype, y.shape) {
            (Dtype::I64 | Dtype::I32, [_] | [_, 1]) => Targets::Classes(y.to_i64()?),
            (Dtype::I64 | Dtype::I32, shape) => {
                return Err(y.err(format!(
                    "integer targets are class indices of shape [N] or [N, 1], found {shape:?}"
                )));
            }
            (Dtype::F32, [_, cols]) => Targets::Values {
                data: y.to_f32()?,
                cols: *cols,
            },
            (Dtype::F32, shape) => {
                return Err(y.err(format!(
                    "F32 targets must have shape [N, C], found {shape:?}"
                )));
            }
            (other, _) => {
                return Err(y.err(format!(
                    "expected I64/I32 class indices or F32 values, found dtype {other:?}"
                )));
            }
        };
        if x.shape[0] != y.shape[0] {
            return Err(Error::input(
                label,
                format!(
                    "\"x\" has {} examples (shape {:?}) but \"y\" has {} (shape {:?})",
                    x.shape[0], x.shape, y.shape[0], y.shape
                ),
            ));
        }
        let example_shape = x.shape[1..].to_vec();
        let data = if x.dtype == Dtype::F32 {
            Self::new(x.to_f32()?, example_shape, targets)
        } else {
            let ids = x.to_i64()?;
            let example = example_shape.iter().product::<usize>().max(1);
            let ids = ids
                .iter()
                .enumerate()
                .map(|(i, &id)| {
                    u32::try_from(id).map_err(|_| {
                        Error::input(
                            label,
                            format!(
                                "\"x\": example {} has token id {id} at position {}, outside \
                                 [0, 2^32)",
                                i / example,
                                i % example
                            ),
                        )
                    })
                })
                .collect::<Result<Vec<u32>>>()?;
            Self::tokens(ids, example_shape, targets)
        };
        data.map_err(|e| match e {
            Error::Input { message, .. } => Error::input(label, message),
            e => e,
        })
    }

    /// A data set from Rust: `x [N, *example_shape]` and targets for the same `N ≥ 1`;
    /// checks lengths and that every float is finite.
    pub fn new(x: Vec<f32>, example_shape: Vec<usize>, y: Targets) -> Result<Self> {
        let len = Self::examples(x.len(), &example_shape, &y)?;
        let mut x_shape = vec![len];
        x_shape.extend_from_slice(&example_shape);
        check_finite("x", &x, &x_shape)?;
        Ok(Self {
            x,
            ids: None,
            example_shape,
            y,
            len,
        })
    }

    /// A data set of token ids `[N, *example_shape]` (for a graph input of dtype `i64`)
    /// and targets for the same `N ≥ 1`; checks lengths and that every float is finite.
    pub fn tokens(ids: Vec<u32>, example_shape: Vec<usize>, y: Targets) -> Result<Self> {
        let len = Self::examples(ids.len(), &example_shape, &y)?;
        Ok(Self {
            x: Vec::new(),
            ids: Some(ids),
            example_shape,
            y,
            len,
        })
    }

    /// `N` from `values` input elements, checking the shapes and the targets.
    fn examples(values: usize, example_shape: &[usize], y: &Targets) -> Result<usize> {
        let example: usize = example_shape.iter().product();
        if example == 0 || example_shape.is_empty() {
            return Err(Error::input(
                "data",
                format!("\"x\": example shape {example_shape:?} has no elements"),
            ));
        }
        if !values.is_multiple_of(example) {
            return Err(Error::input(
                "data",
                format!(
                    "\"x\": {values} values are not a whole number of examples of shape \
                     {example_shape:?}"
                ),
            ));
        }
        let len = values / example;
        let y_len = match y {
            Targets::Classes(c) => c.len(),
            Targets::Values { data, cols } => {
                if *cols == 0 || data.len() % cols != 0 {
                    return Err(Error::input(
                        "data",
                        format!("\"y\": {} values do not form [N, {cols}]", data.len()),
                    ));
                }
                data.len() / cols
            }
        };
        if len == 0 {
            return Err(Error::input("data", "the data set has no examples (N = 0)"));
        }
        if y_len != len {
            return Err(Error::input(
                "data",
                format!("\"x\" has {len} examples but \"y\" has {y_len}"),
            ));
        }
        if let Targets::Values { data, cols } = y {
            check_finite("y", data, &[len, *cols])?;
        }
        Ok(len)
    }

    /// Elements of one example, `prod(example_shape)`.
    pub fn example_len(&self) -> usize {
        self.example_shape.iter().product()
    }

    /// Checks the data fits `spec`: the example shape is the model's input shape, and
    /// the targets are class indices in `0..C` (`classes`, cross-entropy) or values
    /// `[N, C]` (otherwise), `C` being the model's number of outputs.
    pub fn check(&self, spec: &Graph, classes: bool) -> Result<()> {
        self.check_as(spec, classes, "data")
    }

    fn check_as(&self, spec: &Graph, classes: bool, label: &str) -> Result<()> {
        self.check_inputs(spec, label)?;
        if self.example_shape != spec.input.shape {
            return Err(Error::input(
                label,
                format!(
                    "\"x\": the model's input_shape is {:?}, so x must be {}, found [{}, {}]",
                    spec.input.shape,
                    batched_shape(&spec.input.shape).replacen('B', "N", 1),
                    self.len,
                    self.example_shape
                        .iter()
                        .map(usize::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let shapes = spec.shapes();
        let c: usize = shapes.last().map_or(0, |s| s.iter().product());
        match (&self.y, classes) {
            (Targets::Classes(labels), true) => {
                if let Some((i, &k)) = labels
                    .iter()
                    .enumerate()
                    .find(|&(_, &k)| k < 0 || k as usize >= c)
                {
                    return Err(Error::input(
                        label,
                        format!(
                            "\"y\": y[{i}] = {k} is not a class index in 0..{c} (the model has \
                             {c} outputs)"
                        ),
                    ));
                }
                Ok(())
            }
            (Targets::Values { cols, .. }, false) if *cols == c => Ok(()),
            (y, true) => Err(Error::input(
                label,
                format!(
                    "\"y\": cross-entropy needs I64/I32 class indices [N] or [N, 1], found {}",
                    y.describe(self.len)
                ),
            )),
            (y, false) => Err(Error::input(
                label,
                format!(
                    "\"y\": this loss needs F32 targets [N, C] = [{}, {c}] (the model has {c} \
                     outputs), found {}",
                    self.len,
                    y.describe(self.len)
                ),
            )),
        }
    }

    /// Checks that token ids come exactly for a graph input of dtype `i64`, and that
    /// every id indexes each embedding that reads them (`0 ≤ id < num_embeddings`).
    fn check_inputs(&self, spec: &Graph, label: &str) -> Result<()> {
        let tokens = spec.input.dtype == InputType::I64;
        let Some(ids) = &self.ids else {
            if tokens {
                return Err(Error::input(
                    label,
                    "\"x\": the model's input is token ids (dtype i64), so x must be I64 or I32, \
                     found F32",
                ));
            }
            return Ok(());
        };
        if !tokens {
            return Err(Error::input(
                label,
                "\"x\": the model's input is F32, found integer token ids",
            ));
        }
        let Some((node, limit)) = spec.token_limit() else {
            return Ok(());
        };
        let example = self.example_len();
        if let Some((i, &id)) = ids
            .iter()
            .enumerate()
            .find(|&(_, &id)| u64::from(id) >= limit)
        {
            return Err(Error::input(
                label,
                format!(
                    "\"x\": example {} has token id {id} at position {}, outside [0, {limit}) \
                     (num_embeddings of {})",
                    i / example,
                    i % example,
                    node.label()
                ),
            ));
        }
        Ok(())
    }

    /// Examples `start .. start + len`.
    pub fn batch(&self, start: usize, len: usize) -> Batch<'_> {
        let e = self.example_len();
        let y = match &self.y {
            Targets::Classes(c) => TargetsSlice::Classes(&c[start..start + len]),
            Targets::Values { data, cols } => TargetsSlice::Values {
                data: &data[start * cols..(start + len) * cols],
                cols: *cols,
            },
        };
        Batch {
            start,
            len,
            x: if self.ids.is_some() {
                &[]
            } else {
                &self.x[start * e..(start + len) * e]
            },
            ids: self
                .ids
                .as_ref()
                .map(|ids| &ids[start * e..(start + len) * e]),
            y,
        }
    }

    /// Contiguous batches of `batch_size` examples in order; the last may be smaller.
    /// `batch_size` must be positive (options validation guarantees it).
    pub fn batches(&self, batch_size: usize) -> impl Iterator<Item = Batch<'_>> + '_ {
        assert!(batch_size > 0, "batch size must be positive");
        (0..self.len)
            .step_by(batch_size)
            .map(move |start| self.batch(start, batch_size.min(self.len - start)))
    }
}

/// Errors on the first non-finite value of `values` (row-major `shape`), naming its index.
fn check_finite(key: &str, values: &[f32], shape: &[usize]) -> Result<()> {
    let Some(flat) = values.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    let mut index = vec![0; shape.len()];
    let mut rest = flat;
    for (slot, &dim) in index.iter_mut().zip(shape).rev() {
        *slot = rest % dim;
        rest /= dim;
    }
    let index: Vec<String> = index.iter().map(usize::to_string).collect();
    Err(Error::input(
        "data",
        format!(
            "\"{key}\": {key}[{}] is {} (values must be finite)",
            index.join(", "),
            values[flat]
        ),
    ))
}
