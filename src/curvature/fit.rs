//! The GPU pipeline: one pass over the data for the Kronecker factors, their
//! eigendecomposition, a second pass for EKFAC's corrected eigenvalues.
//!
//! Per batch `b` (SPEC §2–§4, `S = 1` for linear layers):
//! - `A += ÃᵀÃ / (N·S)` with `Ã` the layer input `[B, d_in]`, plus a ones column for a
//!   joint block;
//! - `G += κ_b · gᵀg` with `g` the `[V·B, d_out]` gradients w.r.t. the layer output of
//!   the `V` backpropagated vectors (one stacked backward pass);
//! - correction: `Λ += κ_b · hᵀ (ÃQ_A)^{∘2}` with `h = Σ_v (g_v Q_G)^{∘2}` (`[B, d_out]`),
//!   the per-example identity `Q_Gᵀ(g ãᵀ)Q_A = (Q_Gᵀg)(Q_Aᵀã)ᵀ`, so no
//!   `B × d_out × D` tensor is formed; bias blocks get `λ += κ_b · 1ᵀh`.
//!
//! The backpropagated vectors come from [`crate::loss::backprop_vectors`] on the host
//! (the logits of a batch are read back): MC samples are therefore exactly those of
//! the CPU reference, and both passes see the same samples.

use std::time::Instant;

use crate::curvature::layout::{BlockKind, CurvatureLayer, ParamLayout};
use crate::curvature::options::{FisherType, LossKind, Options};
use crate::curvature::state::{
    CurvatureState, FORMAT_NAME, FORMAT_VERSION, FactorEigen, LayerFactors, ParamEntry, StateMeta,
};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Recorder};
use crate::loss::{Targets, backprop_vectors};
use crate::model::data::{Dataset, TargetsSlice};
use crate::model::sequential::{Backward, Forward, Sequential};
use crate::model::Model;
use crate::ops::eigencorrect::square_sum_stack;
use crate::ops::gemm::{Gemm, gemm};
use crate::ops::jacobi::{JacobiOptions, eigh};
use crate::ops::reduce::{append_ones_column, square};

/// Wall-clock milliseconds of the phases of a fit.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Timings {
    pub load: f64,
    pub factors: f64,
    pub eigendecomposition: f64,
    pub correction: f64,
    pub scalars: f64,
    pub save: f64,
}

/// What a fit produced besides the state.
pub struct Fitted {
    pub state: CurvatureState,
    pub timings: Timings,
    /// Largest number of bytes of GPU buffers the crate held at once during the fit.
    pub peak_gpu_bytes: u64,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// The factor accumulators of one curvature layer.
struct LayerAccumulators {
    /// `A`, `[D, D]`, when a block of the layer needs it.
    input: Option<GpuTensor>,
    /// `G`, `[d_out, d_out]`, unless forward-only.
    gradient: Option<GpuTensor>,
}

/// Fits KFAC and (unless forward-only) EKFAC of `model` on `data` with `options`.
/// `damping` is recorded in the state as the default for inverse products.
pub fn fit(
    ctx: &GpuContext,
    model: &Model,
    data: &Dataset,
    options: &Options,
    damping: Option<f64>,
) -> Result<Fitted> {
    options.validate()?;
    let layout = ParamLayout::from_options(model, options)?;
    if layout.layers.iter().any(|l| l.conv) {
        return Err(Error::Options(
            "curvature of conv2d layers is not supported yet; select only linear-layer \
             parameters with --params"
                .into(),
        ));
    }
    data.check(&model.spec, options.loss == LossKind::CrossEntropy)?;
    if data.len == 0 {
        return Err(Error::Options("the dataset has no examples".into()));
    }
    if options.batch_size == 0 {
        return Err(Error::Options("batch size must be at least 1".into()));
    }
    ctx.memory().reset_peak();
    let network = Sequential::new(ctx, model)?;
    let mut timings = Timings::default();

    let start = Instant::now();
    let accumulators = factor_pass(ctx, &network, data, options, &layout)?;
    timings.factors = ms(start);

    let start = Instant::now();
    let bases = layout
        .layers
        .iter()
        .zip(&accumulators)
        .map(|(layer, acc)| {
            Ok(LayerBasis {
                input: acc.input.as_ref().map(|a| eigendecompose(ctx, a)).transpose()?,
                gradient: match &acc.gradient {
                    Some(g) => {
                        let (e, t) = eigendecompose(ctx, g)?;
                        (e, Some(t))
                    }
                    None => (FactorEigen::identity(layer.d_out), None),
                },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    drop(accumulators);
    timings.eigendecomposition = ms(start);

    let start = Instant::now();
    let corrected = if options.fisher == FisherType::ForwardOnly {
        None
    } else {
        Some(correction_pass(ctx, &network, data, options, &layout, &bases)?)
    };
    timings.correction = ms(start);

    let meta = StateMeta {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        crate_version: env!("CARGO_PKG_VERSION").into(),
        options: options.clone(),
        damping,
        num_data: data.len,
        num_params: layout.num_params,
        params: layout
            .params
            .iter()
            .map(|p| ParamEntry {
                name: p.name.clone(),
                shape: p.shape.clone(),
                offset: p.offset,
            })
            .collect(),
        model: serde_json::from_str(&model.spec.to_json())
            .map_err(|e| Error::model("(whole model)", format!("serialising: {e}")))?,
        model_fingerprint: model.fingerprint(),
        adapter: ctx.adapter_summary(),
    };
    let state = CurvatureState {
        meta,
        layout,
        layers: bases
            .into_iter()
            .map(|b| LayerFactors {
                input: b.input.map(|(e, _)| e),
                gradient: b.gradient.0,
            })
            .collect(),
        corrected,
    };
    state.validate("fit")?;
    Ok(Fitted {
        state,
        timings,
        peak_gpu_bytes: ctx.memory().peak_bytes(),
    })
}

/// The eigenbases of one layer: host copies (for the state) and GPU copies (for the
/// correction pass). `gradient.1` is `None` for forward-only's identity `G`.
struct LayerBasis {
    input: Option<(FactorEigen, GpuTensor)>,
    gradient: (FactorEigen, Option<GpuTensor>),
}

/// Eigendecomposition of a symmetric factor on the GPU; eigenvalues ascending.
fn eigendecompose(ctx: &GpuContext, factor: &GpuTensor) -> Result<(FactorEigen, GpuTensor)> {
    let eigen = eigh(ctx, factor, &JacobiOptions::default())?;
    let values = ctx.read(&eigen.values)?;
    let vectors = ctx.read(&eigen.vectors)?;
    Ok((FactorEigen { values, vectors }, eigen.vectors))
}

/// The GPU tensors of one batch after the forward pass and (unless forward-only) the
/// stacked backward pass of its `V` backpropagated vectors.
struct BatchPass {
    forward: Forward,
    backward: Option<Backward>,
    /// κ_b.
    kappa: f64,
    /// `V`.
    num_vectors: usize,
}

/// Runs the network on one batch and backpropagates the loss vectors of `options`.
fn run_batch(
    ctx: &GpuContext,
    network: &Sequential,
    data: &Dataset,
    options: &Options,
    start: usize,
    len: usize,
) -> Result<BatchPass> {
    let batch = data.batch(start, len);
    let mut shape = vec![len];
    shape.extend(&data.example_shape);
    let x = ctx.upload(batch.x, &shape)?;
    let forward = network.forward(ctx, x)?;
    if options.fisher == FisherType::ForwardOnly {
        return Ok(BatchPass {
            forward,
            backward: None,
            kappa: 1.0,
            num_vectors: 0,
        });
    }
    let outputs = network.num_outputs();
    let logits: Vec<f64> = ctx
        .read(forward.output())?
        .into_iter()
        .map(f64::from)
        .collect();
    let classes: Vec<usize>;
    let values: Vec<f64>;
    let targets = match batch.y {
        TargetsSlice::Classes(y) => {
            classes = y.iter().map(|&c| c as usize).collect();
            Targets::Classes(&classes)
        }
        TargetsSlice::Values { data: y, .. } => {
            values = y.iter().map(|&v| f64::from(v)).collect();
            Targets::Dense(&values)
        }
    };
    let vectors = backprop_vectors(options, &logits, outputs, targets, start, data.len)?;
    let nv = vectors.num_vectors;
    let host: Vec<f32> = vectors.values.iter().map(|&v| v as f32).collect();
    let grad_output = ctx.upload(&host, &[nv, len, outputs])?;
    let backward = network.backward(ctx, &forward, &grad_output, nv, false)?;
    Ok(BatchPass {
        forward,
        backward: Some(backward),
        kappa: vectors.kappa,
        num_vectors: nv,
    })
}

/// `Ã`: the layer input `[B, d_in]`, with a ones column appended for a joint block.
fn layer_input<'t>(
    ctx: &GpuContext,
    rec: &mut Recorder,
    layer: &CurvatureLayer,
    layout: &ParamLayout,
    input: &'t GpuTensor,
    scratch: &'t mut Option<GpuTensor>,
) -> Result<&'t GpuTensor> {
    let joint = layer
        .blocks
        .iter()
        .any(|&b| layout.blocks[b].kind == BlockKind::Joint);
    if !joint {
        return Ok(input);
    }
    let rows = input.len() / layer.d_in;
    let with_ones = ctx.zeros(&[rows, layer.d_in + 1])?;
    append_ones_column(rec, input, &with_ones, rows, layer.d_in)?;
    Ok(scratch.insert(with_ones))
}

/// `C += α·XᵀX` for row-major `x` `[rows, n]` and `c` `[n, n]`.
fn accumulate_gram(rec: &mut Recorder, x: &GpuTensor, n: usize, alpha: f64, c: &GpuTensor) -> Result<()> {
    let rows = x.len() / n;
    gemm(
        rec,
        &Gemm::new(n, n, rows, true, false).scaled(alpha as f32, 1.0),
        x,
        x,
        c,
    )
}

fn factor_pass(
    ctx: &GpuContext,
    network: &Sequential,
    data: &Dataset,
    options: &Options,
    layout: &ParamLayout,
) -> Result<Vec<LayerAccumulators>> {
    let accumulators = layout
        .layers
        .iter()
        .map(|layer| {
            let input_dim = layer
                .blocks
                .iter()
                .map(|&b| &layout.blocks[b])
                .find(|b| b.has_input_factor())
                .map(|b| b.d_in);
            Ok(LayerAccumulators {
                input: input_dim.map(|d| ctx.zeros(&[d, d])).transpose()?,
                gradient: (options.fisher != FisherType::ForwardOnly)
                    .then(|| ctx.zeros(&[layer.d_out, layer.d_out]))
                    .transpose()?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let n = data.len as f64;
    for start in (0..data.len).step_by(options.batch_size) {
        let len = options.batch_size.min(data.len - start);
        let pass = run_batch(ctx, network, data, options, start, len)?;
        let mut rec = ctx.recorder();
        let mut scratch: Vec<Option<GpuTensor>> = (0..layout.layers.len()).map(|_| None).collect();
        for ((layer, acc), slot) in layout.layers.iter().zip(&accumulators).zip(&mut scratch) {
            if let Some(a) = &acc.input {
                let d = a.shape()[0];
                let input = pass.forward.layer_input(layer.layer);
                let x = layer_input(ctx, &mut rec, layer, layout, input, slot)?;
                accumulate_gram(&mut rec, x, d, 1.0 / (n * layer.positions as f64), a)?;
            }
            if let (Some(g), Some(backward)) = (&acc.gradient, &pass.backward) {
                let grads = backward.output_grad(layer.layer);
                accumulate_gram(&mut rec, grads, layer.d_out, pass.kappa, g)?;
            }
        }
        rec.submit()?;
        ctx.wait("accumulating Kronecker factors")?;
        drop(scratch);
    }
    Ok(accumulators)
}

fn correction_pass(
    ctx: &GpuContext,
    network: &Sequential,
    data: &Dataset,
    options: &Options,
    layout: &ParamLayout,
    bases: &[LayerBasis],
) -> Result<Vec<Vec<f32>>> {
    let corrected = layout
        .blocks
        .iter()
        .map(|b| ctx.zeros(&[b.d_out, b.d_in]))
        .collect::<Result<Vec<_>>>()?;
    for start in (0..data.len).step_by(options.batch_size) {
        let len = options.batch_size.min(data.len - start);
        let pass = run_batch(ctx, network, data, options, start, len)?;
        let backward = pass.backward.as_ref().expect("EKFAC has a backward pass");
        let nv = pass.num_vectors;
        let ones = ctx.upload(&vec![1.0; len], &[len])?;
        let mut rec = ctx.recorder();
        let mut keep = Vec::new();
        for (layer, basis) in layout.layers.iter().zip(bases) {
            let q_g = basis.gradient.1.as_ref().expect("EKFAC has G");
            // h = Σ_v (g_v Q_G)^∘2, [B, d_out].
            let grads = backward.output_grad(layer.layer);
            let projected = ctx.zeros(&[nv * len, layer.d_out])?;
            gemm(
                &mut rec,
                &Gemm::new(nv * len, layer.d_out, layer.d_out, false, false),
                grads,
                q_g,
                &projected,
            )?;
            let h = ctx.zeros(&[len, layer.d_out])?;
            square_sum_stack(&mut rec, &projected, &h)?;
            // (Ã Q_A)^∘2, [B, D].
            let rotated_input = match &basis.input {
                Some((_, q_a)) => {
                    let d = q_a.shape()[0];
                    let mut slot = None;
                    let input = pass.forward.layer_input(layer.layer);
                    let x = layer_input(ctx, &mut rec, layer, layout, input, &mut slot)?;
                    let rotated = ctx.zeros(&[len, d])?;
                    gemm(&mut rec, &Gemm::new(len, d, d, false, false), x, q_a, &rotated)?;
                    let squared = ctx.zeros(&[len, d])?;
                    square(&mut rec, 1.0, &rotated, 0.0, &squared)?;
                    keep.push(slot);
                    keep.push(Some(rotated));
                    Some(squared)
                }
                None => None,
            };
            for &b in &layer.blocks {
                let block = &layout.blocks[b];
                let kappa = pass.kappa as f32;
                match (block.kind, &rotated_input) {
                    (BlockKind::Bias, _) => gemm(
                        &mut rec,
                        &Gemm::new(1, block.d_out, len, false, false).scaled(kappa, 1.0),
                        &ones,
                        &h,
                        &corrected[b],
                    )?,
                    (_, Some(rotated)) => gemm(
                        &mut rec,
                        &Gemm::new(block.d_out, block.d_in, len, true, false).scaled(kappa, 1.0),
                        &h,
                        rotated,
                        &corrected[b],
                    )?,
                    (_, None) => unreachable!("weight blocks have an input factor"),
                }
            }
            keep.push(Some(projected));
            keep.push(Some(h));
            keep.push(rotated_input);
        }
        rec.submit()?;
        ctx.wait("correcting eigenvalues")?;
        drop(keep);
    }
    corrected.iter().map(|t| ctx.read(t)).collect()
}
