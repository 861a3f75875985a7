//! The fitted curvature as plain host data, and its state file.
//!
//! A state file is one safetensors file. Every tensor is F32:
//!
//! | key | shape | what |
//! |---|---|---|
//! | `<layer>.input_eigenvectors` | `[D, D]` | `Q_A`, column `j` is the eigenvector of eigenvalue `j` |
//! | `<layer>.input_eigenvalues` | `[D]` | eigenvalues of `A`, ascending |
//! | `<layer>.gradient_eigenvectors` | `[d_out, d_out]` | `Q_G` (absent for forward-only: `G = I`) |
//! | `<layer>.gradient_eigenvalues` | `[d_out]` | eigenvalues of `G`, ascending |
//! | `<layer>.<weight\|bias\|joint>.corrected_eigenvalues` | `[d_out, D]` | EKFAC's `Λ` (absent for forward-only) |
//!
//! `D` is the layer's `d_in`, plus one for a joint weight-and-bias block. The metadata
//! key `ekfac` holds one JSON string ([`StateMeta`]): format name and version, the
//! options, the damping given at fit time, the parameter names, shapes and offsets in
//! model order, the model description and fingerprint, the adapter and the crate
//! version.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::curvature::layout::{BlockKind, ParamLayout};
use crate::curvature::options::{FisherType, Options};
use crate::error::{Error, Result};
use crate::gpu::AdapterSummary;
use crate::model::TensorFile;

/// Written into every state file; loading refuses other names.
pub const FORMAT_NAME: &str = "ekfac-state";
/// The newest state format this crate reads and the one it writes.
pub const FORMAT_VERSION: u32 = 1;
const METADATA_KEY: &str = "ekfac";
/// The largest forward-only identity factor built when a state is loaded (1 GiB of f32;
/// larger than the largest factor the GPU's eigendecomposition takes at 128 MiB
/// bindings, 10033).
pub const MAX_IDENTITY_DIM: usize = 16384;

/// Eigendecomposition of a symmetric factor: `vectors` is row-major `[n, n]` with column
/// `j` the eigenvector of `values[j]`; `values` ascending.
#[derive(Clone, Debug, PartialEq)]
pub struct FactorEigen {
    pub values: Vec<f32>,
    pub vectors: Vec<f32>,
}

impl FactorEigen {
    /// `n`, the factor's size.
    pub fn dim(&self) -> usize {
        self.values.len()
    }

    /// The identity factor of size `n` (forward-only's `G`).
    pub fn identity(n: usize) -> Self {
        let mut vectors = vec![0.0; n * n];
        for i in 0..n {
            vectors[i * n + i] = 1.0;
        }
        Self {
            values: vec![1.0; n],
            vectors,
        }
    }
}

/// The eigendecomposed Kronecker factors of one curvature layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerFactors {
    /// `A` (`D × D`), absent when only the layer's bias is selected.
    pub input: Option<FactorEigen>,
    /// `G` (`d_out × d_out`); the identity for forward-only.
    pub gradient: FactorEigen,
}

/// Everything recorded about a fit besides the tensors.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StateMeta {
    pub format: String,
    pub format_version: u32,
    pub crate_version: String,
    pub options: Options,
    /// The damping given at fit time, the default for inverse products.
    pub damping: Option<f64>,
    pub num_data: usize,
    pub num_params: usize,
    /// Selected parameters in model order: name, shape, offset.
    pub params: Vec<ParamEntry>,
    /// The model description (the JSON layer list).
    pub model: serde_json::Value,
    pub model_fingerprint: String,
    pub adapter: AdapterSummary,
}

/// One selected parameter tensor in the flattened vector.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
}

/// A fitted KFAC/EKFAC: the eigendecomposed factors of every layer and the corrected
/// eigenvalues of every block, all on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct CurvatureState {
    pub meta: StateMeta,
    pub layout: ParamLayout,
    /// One entry per [`ParamLayout::layers`].
    pub layers: Vec<LayerFactors>,
    /// `Λ` per [`ParamLayout::blocks`], row-major `[d_out, D]`; `None` for forward-only.
    pub corrected: Option<Vec<Vec<f32>>>,
}

fn block_suffix(kind: BlockKind) -> &'static str {
    match kind {
        BlockKind::Weight => "weight",
        BlockKind::Bias => "bias",
        BlockKind::Joint => "joint",
    }
}

impl CurvatureState {
    /// The factors of the curvature layer called `name`, if it has one.
    pub fn layer_factors(&self, name: &str) -> Option<&LayerFactors> {
        self.layout
            .layers
            .iter()
            .position(|l| l.name == name)
            .map(|i| &self.layers[i])
    }

    /// Whether EKFAC's corrected eigenvalues are present.
    pub fn has_ekfac(&self) -> bool {
        self.corrected.is_some()
    }

    /// Checks that every tensor has the size the layout requires.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let fail = |msg: String| Err(Error::input(origin, msg));
        if self.layers.len() != self.layout.layers.len() {
            return fail(format!(
                "expected factors for {} layers, found {}",
                self.layout.layers.len(),
                self.layers.len()
            ));
        }
        for (layer, factors) in self.layout.layers.iter().zip(&self.layers) {
            let d_in = layer.input_dim(&self.layout);
            let check = |what: &str, e: &FactorEigen, n: usize| {
                if e.values.len() != n || e.vectors.len() != n * n {
                    return Err(Error::input(
                        origin,
                        format!(
                            "layer {}: {what} must have {n} eigenvalues and {n}×{n} \
                             eigenvectors, found {} and {}",
                            layer.name,
                            e.values.len(),
                            e.vectors.len()
                        ),
                    ));
                }
                Ok(())
            };
            check("gradient factor", &factors.gradient, layer.d_out)?;
            match (&factors.input, d_in) {
                (Some(e), Some(n)) => check("input factor", e, n)?,
                (None, None) => {}
                (have, _) => {
                    return fail(format!(
                        "layer {}: input factor {} but the selection {} one",
                        layer.name,
                        if have.is_some() { "present" } else { "missing" },
                        if have.is_some() { "needs no" } else { "needs" }
                    ));
                }
            }
        }
        if let Some(corrected) = &self.corrected {
            if corrected.len() != self.layout.blocks.len() {
                return fail(format!(
                    "expected corrected eigenvalues for {} blocks, found {}",
                    self.layout.blocks.len(),
                    corrected.len()
                ));
            }
            for (block, lambda) in self.layout.blocks.iter().zip(corrected) {
                if lambda.len() != block.len() {
                    return fail(format!(
                        "{}.{}: corrected eigenvalues must be [{}, {}], found {} values",
                        block.name,
                        block_suffix(block.kind),
                        block.d_out,
                        block.d_in,
                        lambda.len()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Writes the state file atomically (a temporary file next to `path`, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::write_atomic(path, &self.to_bytes(path)?)
    }

    /// The bytes of the state file; `path` names it in errors.
    pub fn to_bytes(&self, path: &Path) -> Result<Vec<u8>> {
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        for (layer, factors) in self.layout.layers.iter().zip(&self.layers) {
            if let Some(a) = &factors.input {
                let n = a.dim();
                tensors.push((
                    format!("{}.input_eigenvectors", layer.name),
                    vec![n, n],
                    &a.vectors,
                ));
                tensors.push((
                    format!("{}.input_eigenvalues", layer.name),
                    vec![n],
                    &a.values,
                ));
            }
            if self.meta.options.fisher != FisherType::ForwardOnly {
                let g = &factors.gradient;
                let n = g.dim();
                tensors.push((
                    format!("{}.gradient_eigenvectors", layer.name),
                    vec![n, n],
                    &g.vectors,
                ));
                tensors.push((
                    format!("{}.gradient_eigenvalues", layer.name),
                    vec![n],
                    &g.values,
                ));
            }
        }
        if let Some(corrected) = &self.corrected {
            for (block, lambda) in self.layout.blocks.iter().zip(corrected) {
                tensors.push((
                    format!(
                        "{}.{}.corrected_eigenvalues",
                        block.name,
                        block_suffix(block.kind)
                    ),
                    vec![block.d_out, block.d_in],
                    lambda,
                ));
            }
        }
        let meta = serde_json::to_string(&self.meta)
            .map_err(|e| Error::input(path.display(), format!("serialising metadata: {e}")))?;
        crate::io::tensor_bytes(
            path,
            &tensors,
            Some(HashMap::from([(METADATA_KEY.into(), meta)])),
        )
    }

    /// Reads a state file written by [`Self::save`], refusing files that are not ours,
    /// newer format versions and tensors whose sizes do not fit the recorded layout.
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_tensor_file(&TensorFile::load(path)?)
    }

    /// [`Self::load`] from a parsed safetensors file. Every tensor must be finite; the
    /// orthonormality of the eigenvectors is checked on the GPU by
    /// [`crate::curvature::validate::check_eigenvectors`].
    pub fn from_tensor_file(file: &TensorFile) -> Result<Self> {
        let origin = file.label().to_string();
        let fail = |msg: String| Error::input(&origin, msg);
        let raw = file.string_metadata(METADATA_KEY).ok_or_else(|| {
            fail(format!(
                "not an ekfac state file: metadata key `{METADATA_KEY}` is missing"
            ))
        })?;
        let probe: serde_json::Value = serde_json::from_str(raw)
            .map_err(|e| fail(format!("metadata `{METADATA_KEY}` is not JSON: {e}")))?;
        if probe.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
            return Err(fail(format!(
                "not an ekfac state file: metadata format is {}, expected \"{FORMAT_NAME}\"",
                probe.get("format").unwrap_or(&serde_json::Value::Null)
            )));
        }
        match probe.get("format_version").and_then(|v| v.as_u64()) {
            Some(v) if v <= u64::from(FORMAT_VERSION) => {}
            other => {
                return Err(fail(format!(
                    "state format version {} is not supported; this is ekfac {} which reads \
                     versions up to {FORMAT_VERSION}",
                    other.map_or("missing".to_string(), |v| v.to_string()),
                    env!("CARGO_PKG_VERSION")
                )));
            }
        }
        let meta: StateMeta = serde_json::from_value(probe)
            .map_err(|e| fail(format!("metadata `{METADATA_KEY}`: {e}")))?;
        let names: Vec<String> = meta.params.iter().map(|p| p.name.clone()).collect();
        let model = crate::graph::json::from_json_str(
            &meta.model.to_string(),
            format!("{origin} (recorded model)"),
        )?;
        let layout = ParamLayout::new(&model, Some(&names), meta.options.joint_bias)
            .map_err(|e| fail(format!("recorded model and parameters: {e}")))?;
        if layout.num_params != meta.num_params {
            return Err(fail(format!(
                "recorded num_params {} does not match the recorded parameters ({})",
                meta.num_params, layout.num_params
            )));
        }
        let read = |key: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let t = file.require(key, "part of the fitted state")?;
            t.expect_shape(shape)?;
            if t.dtype != safetensors::Dtype::F32 {
                return Err(t.err(format!("expected F32, found {:?}", t.dtype)));
            }
            t.to_f32()
        };
        let forward_only = meta.options.fisher == FisherType::ForwardOnly;
        let mut layers = Vec::new();
        for layer in &layout.layers {
            let input_dim = layer.input_dim(&layout);
            let input = input_dim
                .map(|n| -> Result<FactorEigen> {
                    Ok(FactorEigen {
                        vectors: read(&format!("{}.input_eigenvectors", layer.name), &[n, n])?,
                        values: read(&format!("{}.input_eigenvalues", layer.name), &[n])?,
                    })
                })
                .transpose()?;
            let n = layer.d_out;
            let gradient = if forward_only {
                // Forward-only's G = I is built here from the recorded model alone; its
                // size is bounded so that a corrupt description cannot allocate without
                // end.
                if n > MAX_IDENTITY_DIM {
                    return Err(fail(format!(
                        "layer {}: forward-only G = I of size {n} × {n} is larger than the \
                         {MAX_IDENTITY_DIM} × {MAX_IDENTITY_DIM} this crate builds",
                        layer.name
                    )));
                }
                FactorEigen::identity(n)
            } else {
                FactorEigen {
                    vectors: read(&format!("{}.gradient_eigenvectors", layer.name), &[n, n])?,
                    values: read(&format!("{}.gradient_eigenvalues", layer.name), &[n])?,
                }
            };
            layers.push(LayerFactors { input, gradient });
        }
        let corrected = (!forward_only)
            .then(|| {
                layout
                    .blocks
                    .iter()
                    .map(|b| {
                        read(
                            &format!("{}.{}.corrected_eigenvalues", b.name, block_suffix(b.kind)),
                            &[b.d_out, b.d_in],
                        )
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        let state = CurvatureState {
            meta,
            layout,
            layers,
            corrected,
        };
        state.validate(&origin)?;
        Ok(state)
    }
}
