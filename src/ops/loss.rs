//! The loss kernels (`shaders/loss_<loss>.wgsl`, each prefixed with
//! `shaders/loss_common.wgsl`): the backpropagated output-space vectors `V [nv, B, C]`
//! of one batch, and the raw Philox blocks of the MC contract ([`crate::rng`]). They
//! know nothing of the pipeline: the caller says which loss, which vectors and their
//! scale ([`crate::loss`] does, from the options).

use super::check::{expect_len, expect_u32};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Kernel, Recorder, Shader, grid_1d};
use crate::kernel_params;

kernel_params! {
    /// Every loss kernel's parameters (`shaders/loss_common.wgsl`).
    pub struct LossParams {
        /// `B`.
        batch: u32,
        /// `C`.
        classes: u32,
        /// `nv`.
        num_vectors: u32,
        /// Global index of the first example (the MC counter).
        batch_start: u32,
        /// [`Vectors`] as its discriminant.
        mode: u32,
        seed_lo: u32,
        seed_hi: u32,
        /// The factor every vector is multiplied with.
        scale: f32,
    }
}

pub(crate) static LOSS_MSE: Shader = crate::shader!("loss_mse" after "loss_common");
pub(crate) static LOSS_CROSS_ENTROPY: Shader =
    crate::shader!("loss_cross_entropy" after "loss_common");
pub(crate) static LOSS_BCE: Shader = crate::shader!("loss_bce" after "loss_common");

/// Which loss kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossKernel {
    /// `shaders/loss_mse.wgsl`, dense targets.
    Mse,
    /// `shaders/loss_cross_entropy.wgsl`, class-index targets.
    CrossEntropy,
    /// `shaders/loss_bce.wgsl`, dense targets.
    Bce,
}

impl LossKernel {
    fn shader(self) -> &'static Shader {
        match self {
            LossKernel::Mse => &LOSS_MSE,
            LossKernel::CrossEntropy => &LOSS_CROSS_ENTROPY,
            LossKernel::Bce => &LOSS_BCE,
        }
    }
}

/// Which vectors the kernel writes (the kernels' `mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vectors {
    /// Column `v` of the loss Hessian's square root, `v < C`.
    HessianSqrt = 0,
    /// The gradient at the true targets.
    Gradient = 1,
    /// The gradient at targets drawn for MC sample `v`.
    Sampled = 2,
}

/// The targets of one batch on the GPU.
#[derive(Clone, Copy, Debug)]
pub enum GpuTargets<'a> {
    /// Class indices `[B]` as `u32` (cross-entropy), each below `C` (checked when the
    /// data are loaded).
    Classes(&'a GpuTensor),
    /// Values `[B, C]` as `f32` (MSE, BCE; binary for BCE with type-2).
    Dense(&'a GpuTensor),
}

/// What one call of a loss kernel computes.
#[derive(Clone, Copy, Debug)]
pub struct BackpropVectors {
    pub kernel: LossKernel,
    pub vectors: Vectors,
    /// `nv`: `C` for [`Vectors::HessianSqrt`].
    pub num_vectors: usize,
    /// Global index of the batch's first example (the MC counter).
    pub batch_start: usize,
    /// Key of the MC generator.
    pub seed: u64,
    /// The factor every vector is multiplied with.
    pub scale: f32,
}

/// Records the vectors `p` asks for of the batch `logits [B, C]` into
/// `vectors [nv, B, C]`.
pub fn record_backprop_vectors(
    rec: &mut Recorder,
    p: &BackpropVectors,
    logits: &GpuTensor,
    targets: GpuTargets<'_>,
    vectors: &GpuTensor,
) -> Result<()> {
    const OP: &str = "loss::backprop_vectors";
    let [batch, outputs] = logits.shape() else {
        return Err(Error::gpu(
            OP,
            format!("logits must be [B, C], found shape {:?}", logits.shape()),
        ));
    };
    let (batch, outputs, nv) = (*batch, *outputs, p.num_vectors);
    let (labels, values) = match (p.kernel, targets) {
        (LossKernel::CrossEntropy, GpuTargets::Classes(t)) => {
            expect_len(OP, "class indices", t, batch)?;
            (t, logits)
        }
        (LossKernel::Mse | LossKernel::Bce, GpuTargets::Dense(t)) => {
            expect_len(OP, "targets", t, batch * outputs)?;
            (logits, t)
        }
        (LossKernel::CrossEntropy, _) => {
            return Err(Error::gpu(OP, "cross-entropy needs class-index targets"));
        }
        _ => return Err(Error::gpu(OP, "this loss needs dense [B, C] targets")),
    };
    expect_len(OP, "vectors", vectors, nv * batch * outputs)?;
    expect_u32(OP, &[nv * batch * outputs, p.batch_start + batch])?;
    if outputs == 0 || batch == 0 {
        return Err(Error::gpu(OP, "empty batch or no outputs"));
    }
    let threads = (nv * batch) as u32;
    rec.dispatch(
        &Kernel::new(p.kernel.shader(), "backprop_vectors"),
        &[logits, labels, values],
        &[vectors],
        &LossParams {
            batch: batch as u32,
            classes: outputs as u32,
            num_vectors: nv as u32,
            batch_start: p.batch_start as u32,
            mode: p.vectors as u32,
            seed_lo: p.seed as u32,
            seed_hi: (p.seed >> 32) as u32,
            scale: p.scale,
        },
        grid_1d(threads.div_ceil(256)),
    )
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
    rec.dispatch(
        &Kernel::new(&LOSS_MSE, "philox_blocks"),
        &[],
        &[&words],
        &LossParams {
            batch: batch as u32,
            classes: outputs as u32,
            num_vectors: samples as u32,
            batch_start: batch_start as u32,
            seed_lo: seed as u32,
            seed_hi: (seed >> 32) as u32,
            ..LossParams::default()
        },
        grid_1d((count as u32).div_ceil(256)),
    )?;
    rec.submit()?;
    ctx.read_u32(&words)
}
