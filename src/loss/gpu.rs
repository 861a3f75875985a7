//! The backpropagated vectors of a fit's options on the GPU: picks the loss's kernel
//! ([`crate::ops::loss`]), which vectors and their scale, and returns κ_b; the logits
//! never leave the GPU. Matches [`super::backprop_vectors`].

use crate::curvature::{FisherType, Options};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Recorder};
use crate::ops::loss::{BackpropVectors, Vectors};

pub use crate::ops::loss::GpuTargets;

/// Records the backpropagated vectors of the batch `logits [B, C]` whose first example
/// has global index `batch_start` into `vectors [nv, B, C]` (`nv` from
/// [`Options::num_vectors`]), and returns κ_b ([`super::kappa`]) for a data set of
/// `num_data` examples. Forward-only has no vectors and is an error here.
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
    let loss = super::of(opts.loss);
    let kind = match opts.fisher {
        FisherType::Type2 => Vectors::HessianSqrt,
        FisherType::Empirical => Vectors::Gradient,
        FisherType::Mc => Vectors::Sampled,
        FisherType::ForwardOnly => {
            return Err(Error::gpu(
                OP,
                "the forward-only Fisher has no backpropagated vectors",
            ));
        }
    };
    let classes = matches!(targets, GpuTargets::Classes(_));
    if classes != loss.class_targets() {
        return Err(Error::gpu(
            OP,
            format!(
                "{} needs {} targets",
                opts.loss,
                if loss.class_targets() {
                    "class-index"
                } else {
                    "dense [B, C]"
                }
            ),
        ));
    }
    let scale = loss.kernel_scale(opts.fisher, opts.reduction, batch, outputs);
    crate::ops::loss::record_backprop_vectors(
        rec,
        &BackpropVectors {
            kernel: loss.kernel(),
            vectors: kind,
            num_vectors: opts.num_vectors(outputs),
            batch_start,
            seed: opts.seed,
            scale: scale as f32,
        },
        logits,
        targets,
        vectors,
    )?;
    Ok(super::kappa(
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
