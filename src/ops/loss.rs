//! The loss kernel (`shaders/loss.wgsl`): the backpropagated output-space vectors
//! `V [nv, B, C]` of one batch for type-2, MC and empirical Fisher, matching the f64
//! reference [`crate::loss::backprop_vectors`], and the raw Philox blocks of the MC
//! contract ([`crate::rng`]).

use super::check::{expect_len, expect_u32};
use crate::curvature::{FisherType, LossKind, Options, Reduction};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Kernel, Recorder, grid_1d};

/// The targets of one batch on the GPU.
#[derive(Clone, Copy, Debug)]
pub enum GpuTargets<'a> {
    /// Class indices `[B]` as `u32` (cross-entropy), each below `C` (checked when the
    /// data are loaded).
    Classes(&'a GpuTensor),
    /// Values `[B, C]` as `f32` (MSE, BCE; binary for BCE with type-2).
    Dense(&'a GpuTensor),
}

/// The kernel's `scale` (see `shaders/loss.wgsl`): type-2 MSE `σ_b·√(2c_C)`, CE `σ_b`,
/// BCE `σ_b·√c_C`; empirical/MC MSE `2σ'`, CE `σ_b`, BCE `σ'`.
fn scale(opts: &Options, batch: usize, outputs: usize) -> f64 {
    let (b, c) = (batch as f64, outputs as f64);
    let mean = opts.reduction == Reduction::Mean;
    let sigma_b = if mean { 1.0 / b } else { 1.0 };
    let c_c = if mean { 1.0 / c } else { 1.0 };
    let sigma_prime = if mean { 1.0 / (b * c.sqrt()) } else { 1.0 };
    match (opts.fisher, opts.loss) {
        (FisherType::Type2, LossKind::Mse) => sigma_b * (2.0 * c_c).sqrt(),
        (FisherType::Type2, LossKind::CrossEntropy) => sigma_b,
        (FisherType::Type2, LossKind::BceWithLogits) => sigma_b * c_c.sqrt(),
        (_, LossKind::Mse) => 2.0 * sigma_prime,
        (_, LossKind::CrossEntropy) => sigma_b,
        (_, LossKind::BceWithLogits) => sigma_prime,
    }
}

/// Records the backpropagated vectors of the batch `logits [B, C]` whose first example
/// has global index `batch_start`, into `vectors [nv, B, C]` (`nv` from
/// [`Options::num_vectors`]), and returns κ_b ([`crate::loss::kappa`]) for a data set
/// of `num_data` examples. Forward-only has no vectors and is an error here.
pub fn record_backprop_vectors(
    rec: &mut Recorder,
    opts: &Options,
    logits: &GpuTensor,
    targets: GpuTargets<'_>,
    batch_start: usize,
    num_data: usize,
    vectors: &GpuTensor,
) -> Result<f64> {
    const OP: &str = "loss::backprop_vectors";
    let [batch, outputs] = logits.shape() else {
        return Err(Error::gpu(
            OP,
            format!("logits must be [B, C], found shape {:?}", logits.shape()),
        ));
    };
    let (batch, outputs) = (*batch, *outputs);
    let nv = opts.num_vectors(outputs);
    let mode = match opts.fisher {
        FisherType::Type2 => 0u32,
        FisherType::Empirical => 1,
        FisherType::Mc => 2,
        FisherType::ForwardOnly => {
            return Err(Error::gpu(
                OP,
                "the forward-only Fisher has no backpropagated vectors",
            ));
        }
    };
    let (labels, values) = match (opts.loss, targets) {
        (LossKind::CrossEntropy, GpuTargets::Classes(t)) => {
            expect_len(OP, "class indices", t, batch)?;
            (t, logits)
        }
        (LossKind::Mse | LossKind::BceWithLogits, GpuTargets::Dense(t)) => {
            expect_len(OP, "targets", t, batch * outputs)?;
            (logits, t)
        }
        (loss, _) => {
            return Err(Error::gpu(
                OP,
                format!(
                    "{loss} needs {} targets",
                    match loss {
                        LossKind::CrossEntropy => "class-index",
                        _ => "dense [B, C]",
                    }
                ),
            ));
        }
    };
    expect_len(OP, "vectors", vectors, nv * batch * outputs)?;
    expect_u32(OP, &[nv * batch * outputs, batch_start + batch])?;
    if outputs == 0 || batch == 0 {
        return Err(Error::gpu(OP, "empty batch or no outputs"));
    }
    let loss = match opts.loss {
        LossKind::Mse => 0u32,
        LossKind::CrossEntropy => 1,
        LossKind::BceWithLogits => 2,
    };
    let threads = (nv * batch) as u32;
    rec.dispatch_words(
        &Kernel::new(&super::LOSS, "backprop_vectors"),
        &[logits, labels, values],
        &[vectors],
        &[
            batch as u32,
            outputs as u32,
            nv as u32,
            batch_start as u32,
            loss,
            mode,
            opts.seed as u32,
            (opts.seed >> 32) as u32,
            (scale(opts, batch, outputs) as f32).to_bits(),
        ],
        grid_1d(threads.div_ceil(256)),
    )?;
    Ok(crate::loss::kappa(
        opts.reduction,
        batch,
        num_data,
        opts.mc_samples,
    ))
}

/// [`record_backprop_vectors`] into a new tensor, submitted at once: `(V, κ_b)`.
pub fn backprop_vectors(
    ctx: &GpuContext,
    opts: &Options,
    logits: &GpuTensor,
    targets: GpuTargets<'_>,
    batch_start: usize,
    num_data: usize,
) -> Result<(GpuTensor, f64)> {
    let [batch, outputs] = logits.shape() else {
        return Err(Error::gpu(
            "loss::backprop_vectors",
            format!("logits must be [B, C], found shape {:?}", logits.shape()),
        ));
    };
    let vectors = ctx.zeros(&[opts.num_vectors(*outputs), *batch, *outputs])?;
    let mut rec = ctx.recorder();
    let kappa = record_backprop_vectors(
        &mut rec,
        opts,
        logits,
        targets,
        batch_start,
        num_data,
        &vectors,
    )?;
    rec.submit()?;
    Ok((vectors, kappa))
}

/// The Philox4x32-10 blocks of counters `(batch_start + n, m, c, 0)` under `seed`, for
/// `n < batch`, `m < samples`, `c < outputs`, computed on the GPU: `[batch, samples,
/// outputs, 4]` words, to verify the MC contract against [`crate::rng::philox4x32_10`].
pub fn philox_blocks(
    ctx: &GpuContext,
    seed: u64,
    batch_start: usize,
    batch: usize,
    samples: usize,
    outputs: usize,
) -> Result<Vec<u32>> {
    const OP: &str = "loss::philox_blocks";
    let count = batch * samples * outputs;
    expect_u32(OP, &[count * 4, batch_start + batch])?;
    let words = ctx.zeros(&[count * 4])?;
    let mut rec = ctx.recorder();
    rec.dispatch_words(
        &Kernel::new(&super::LOSS, "philox_blocks"),
        &[],
        &[&words],
        &[
            batch as u32,
            outputs as u32,
            samples as u32,
            batch_start as u32,
            0,
            0,
            seed as u32,
            (seed >> 32) as u32,
            0,
        ],
        grid_1d((count as u32).div_ceil(256)),
    )?;
    rec.submit()?;
    ctx.read_u32(&words)
}
