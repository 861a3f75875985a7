//! Data sources: where the examples of a fit come from, read a range at a time so that
//! host memory holds a few batches whatever `N` is.
//!
//! A [`DataSource`] says how many examples it has, the shape and dtype of one example's
//! inputs `x` and what its targets `y` are, and copies examples `[start, end)` into
//! buffers the caller owns. Implementations: [`MappedFile`] (one safetensors file,
//! memory-mapped), [`ShardDirectory`] (a directory of `*.safetensors` shards read in
//! file-name order as one data set) and the in-memory [`crate::model::Dataset`]; an
//! application can feed batches from its own pipeline by implementing the trait.
//!
//! File format (every shard alike): `x` F32 `[N, *input_shape]` (or I64/I32 token ids
//! `[N, T]`); `y` either I64/I32 class indices `[N]` or `[N, 1]` (cross-entropy) or F32
//! values `[N, C]` (MSE, BCE). No other keys.
//!
//! [`check`] streams over the examples a fit will read (each rank of a distributed fit
//! its own batches) once before the fit, checking they fit the model and the loss
//! (shapes, finite values, class indices in range) with errors that name the file and
//! the example.

mod file;
mod memory;
mod shards;

pub use file::MappedFile;
pub use shards::ShardDirectory;

use std::path::Path;

use crate::curvature::options::{FisherType, LossKind};
use crate::error::{Error, Result};
use crate::graph::{Graph, InputType};
use crate::layers::batched_shape;

/// The element type of the inputs `x`. On the GPU every element is one 4-byte word:
/// the bits of an f32, or a token id as a u32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputDtype {
    F32,
    /// Token ids stored as I64.
    I64,
    /// Token ids stored as I32.
    I32,
}

/// What the targets `y` hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// One class index per example (cross-entropy).
    Classes,
    /// `cols` values per example (MSE, BCE).
    Values { cols: usize },
}

impl TargetKind {
    /// Values of `y` per example.
    pub fn per_example(self) -> usize {
        match self {
            TargetKind::Classes => 1,
            TargetKind::Values { cols } => cols,
        }
    }

    fn describe(self, n: usize) -> String {
        match self {
            TargetKind::Classes => format!("class indices [{n}]"),
            TargetKind::Values { cols } => format!("F32 values [{n}, {cols}]"),
        }
    }
}

/// Where [`DataSource::read`] writes the targets of a range of examples.
pub enum TargetsMut<'a> {
    /// `[len]` class indices.
    Classes(&'a mut [i64]),
    /// `[len, cols]` values, row-major.
    Values(&'a mut [f32]),
}

/// Examples with inputs `x [N, *example_shape]` and targets `y`, read a range at a time.
pub trait DataSource: Sync {
    /// Names the source in errors (a file or directory path).
    fn label(&self) -> &str;

    /// `N`, the number of examples (at least 1).
    fn len(&self) -> usize;

    /// The shape of one example's inputs.
    fn example_shape(&self) -> &[usize];

    /// The element type of `x`.
    fn input_dtype(&self) -> InputDtype;

    /// What `y` holds.
    fn targets(&self) -> TargetKind;

    /// Copies examples `[start, end)` (`start < end ≤ len`): `x` gets
    /// `(end − start)·prod(example_shape)` words, row-major (f32 bits, or token ids,
    /// which must fit a u32), `y` one class index or `cols` values per example.
    fn read(&self, start: usize, end: usize, x: &mut [u32], y: TargetsMut<'_>) -> Result<()>;

    /// Where example `index` lives, for errors: the label unless a source spans files.
    fn locate(&self, index: usize) -> String {
        let _ = index;
        self.label().to_string()
    }

    /// Elements of one example's inputs, `prod(example_shape)`.
    fn example_len(&self) -> usize {
        self.example_shape().iter().product()
    }

    /// Whether the source has no examples (sources refuse to be empty).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Opens `--data`: a safetensors file, or a directory of `*.safetensors` shards.
/// Anything else (a FIFO, a device) is refused before it is opened.
pub fn open(path: &Path) -> Result<Box<dyn DataSource>> {
    open_as(path, "--data")
}

/// [`open`] for the data option `what` (e.g. `--train`), which errors name.
pub fn open_as(path: &Path, what: &str) -> Result<Box<dyn DataSource>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        Ok(Box::new(ShardDirectory::open(path)?))
    } else {
        Ok(Box::new(MappedFile::open(path, what)?))
    }
}

/// The targets of one batch, owned.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetBuffer {
    Classes(Vec<i64>),
    Values { data: Vec<f32>, cols: usize },
}

/// Examples `start .. start + len` of a source, read into reusable buffers.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchBuffer {
    pub start: usize,
    pub len: usize,
    /// `[len, *example_shape]` 4-byte words (f32 bits or token ids).
    pub x: Vec<u32>,
    pub y: TargetBuffer,
}

impl BatchBuffer {
    /// Empty buffers for batches of `source`.
    pub fn new(source: &dyn DataSource) -> Self {
        Self {
            start: 0,
            len: 0,
            x: Vec::new(),
            y: match source.targets() {
                TargetKind::Classes => TargetBuffer::Classes(Vec::new()),
                TargetKind::Values { cols } => TargetBuffer::Values {
                    data: Vec::new(),
                    cols,
                },
            },
        }
    }

    /// Reads examples `[start, end)` of `source`, reusing the buffers' memory.
    pub fn read(&mut self, source: &dyn DataSource, start: usize, end: usize) -> Result<()> {
        let len = end - start;
        self.start = start;
        self.len = len;
        self.x.resize(len * source.example_len(), 0);
        let y = match &mut self.y {
            TargetBuffer::Classes(c) => {
                c.resize(len, 0);
                TargetsMut::Classes(c)
            }
            TargetBuffer::Values { data, cols } => {
                data.resize(len * *cols, 0.0);
                TargetsMut::Values(data)
            }
        };
        source.read(start, end, &mut self.x, y)
    }

    /// `x` as f32 (for F32 inputs).
    pub fn x_f32(&self) -> &[f32] {
        bytemuck::cast_slice(&self.x)
    }
}

/// How many examples [`check`] reads at a time: about 4 MiB of inputs.
fn check_chunk(source: &dyn DataSource) -> usize {
    ((4 << 20) / (4 * source.example_len().max(1))).max(1)
}

/// Checks, streaming over the examples of `ranges` (`(start, len)` pairs, e.g. a
/// rank's batches, [`crate::distributed::Partition::batches`]) once, that `source`
/// fits the model `graph` and the loss: [`check_layout`], then inputs are finite and
/// targets are class indices in `0..C` (cross-entropy) or finite values (binary for
/// BCE with type-2), `C` being the model's number of outputs. Errors name the file and
/// the example.
pub fn check(
    source: &dyn DataSource,
    graph: &Graph,
    loss: LossKind,
    fisher: FisherType,
    ranges: impl Iterator<Item = (usize, usize)>,
) -> Result<()> {
    let c = check_layout(source, graph, loss)?;
    let chunk = check_chunk(source);
    let mut buffer = BatchBuffer::new(source);
    for (first, len) in ranges {
        for start in (first..first + len).step_by(chunk) {
            let end = (first + len).min(start + chunk);
            buffer.read(source, start, end)?;
            check_values(source, graph, loss, fisher, c, &buffer)?;
        }
    }
    Ok(())
}

/// [`check`] over every example.
pub fn check_all(
    source: &dyn DataSource,
    graph: &Graph,
    loss: LossKind,
    fisher: FisherType,
) -> Result<()> {
    check(
        source,
        graph,
        loss,
        fisher,
        std::iter::once((0, source.len())),
    )
}

/// Checks, without reading examples, that `source` has examples whose shape is the
/// model's input shape and whose dtype its input dtype, and targets of the kind the
/// loss needs: class indices (cross-entropy) or `C` values per example, `C` being the
/// model's number of outputs (returned).
pub fn check_layout(source: &dyn DataSource, graph: &Graph, loss: LossKind) -> Result<usize> {
    let n = source.len();
    let label = source.label();
    if n == 0 {
        return Err(Error::input(label, "the data set has no examples (N = 0)"));
    }
    if source.example_shape() != graph.input.shape.as_slice() {
        return Err(Error::input(
            label,
            format!(
                "\"x\": the model's input_shape is {:?}, so x must be {}, found [{n}, {}]",
                graph.input.shape,
                batched_shape(&graph.input.shape).replacen('B', "N", 1),
                source
                    .example_shape()
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let tokens = graph.input.dtype == InputType::I64;
    match (source.input_dtype(), tokens) {
        (InputDtype::F32, false) | (InputDtype::I64 | InputDtype::I32, true) => {}
        (InputDtype::F32, true) => {
            return Err(Error::input(
                label,
                "\"x\": the model's input is token ids (dtype i64), so x must be I64 or I32, \
                 found F32",
            ));
        }
        (dtype, false) => {
            return Err(Error::input(
                label,
                format!(
                    "\"x\": token ids ({dtype:?}) need a model whose input has dtype i64; this \
                     model's input is f32, so x must be F32"
                ),
            ));
        }
    }
    let c: usize = graph.shapes().last().map_or(0, |s| s.iter().product());
    let classes = loss == LossKind::CrossEntropy;
    match (source.targets(), classes) {
        (TargetKind::Classes, true) => {}
        (TargetKind::Values { cols }, false) if cols == c => {}
        (y, true) => {
            return Err(Error::input(
                label,
                format!(
                    "\"y\": cross-entropy needs I64/I32 class indices [N] or [N, 1], found {}",
                    y.describe(n)
                ),
            ));
        }
        (y, false) => {
            return Err(Error::input(
                label,
                format!(
                    "\"y\": this loss needs F32 targets [N, C] = [{n}, {c}] (the model has {c} \
                     outputs), found {}",
                    y.describe(n)
                ),
            ));
        }
    }
    Ok(c)
}

/// Checks the values of the examples in `buffer` (see [`check`]).
fn check_values(
    source: &dyn DataSource,
    graph: &Graph,
    loss: LossKind,
    fisher: FisherType,
    c: usize,
    buffer: &BatchBuffer,
) -> Result<()> {
    let e = source.example_len();
    let (start, end) = (buffer.start, buffer.start + buffer.len);
    let floats = source.input_dtype() == InputDtype::F32;
    if let Some(flat) = buffer.x_f32().iter().position(|v| floats && !v.is_finite()) {
        let i = start + flat / e;
        return Err(Error::input(
            source.locate(i),
            format!(
                "\"x\": x[{}] is {} (values must be finite)",
                index_name(i, flat % e, source.example_shape()),
                buffer.x_f32()[flat]
            ),
        ));
    }
    if let (false, Some((node, limit))) = (floats, graph.token_limit())
        && let Some(flat) = buffer.x.iter().position(|&id| u64::from(id) >= limit)
    {
        let i = start + flat / e;
        return Err(Error::input(
            source.locate(i),
            format!(
                "\"x\": example {i} has token id {} at position {}, outside [0, {limit}) \
                 (num_embeddings of {})",
                buffer.x[flat],
                flat % e,
                node.label()
            ),
        ));
    }
    match &buffer.y {
        TargetBuffer::Classes(labels) => {
            if let Some((k, &class)) = labels
                .iter()
                .enumerate()
                .find(|&(_, &k)| k < 0 || k as usize >= c)
            {
                return Err(Error::input(
                    source.locate(start + k),
                    format!(
                        "\"y\": y[{}] = {class} is not a class index in 0..{c} (the model \
                         has {c} outputs)",
                        start + k
                    ),
                ));
            }
        }
        TargetBuffer::Values { data, cols } => {
            if let Some(flat) = data.iter().position(|v| !v.is_finite()) {
                let i = start + flat / cols;
                return Err(Error::input(
                    source.locate(i),
                    format!(
                        "\"y\": y[{i}, {}] is {} (values must be finite)",
                        flat % cols,
                        data[flat]
                    ),
                ));
            }
            let values: Vec<f64> = data.iter().map(|&v| f64::from(v)).collect();
            crate::loss::check_targets(
                loss,
                fisher,
                crate::loss::Targets::Dense(&values),
                end - start,
                c,
            )
            .map_err(|e| {
                Error::input(
                    source.locate(start),
                    format!("\"y\" in examples {start}..{end}: {e}"),
                )
            })?;
        }
    }
    Ok(())
}

/// `i, j, k…` for element `within` of example `i` of shape `shape`.
fn index_name(i: usize, within: usize, shape: &[usize]) -> String {
    let mut index = vec![0; shape.len()];
    let mut rest = within;
    for (slot, &dim) in index.iter_mut().zip(shape).rev() {
        *slot = rest % dim;
        rest /= dim;
    }
    std::iter::once(i)
        .chain(index)
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
