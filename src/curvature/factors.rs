//! The factor pass (SPEC §2–§3): per batch `b`,
//! - `A += ÃᵀÃ / (N·S)` with `Ã` the expand-format layer inputs `[B·S, D]` (a ones
//!   column for a joint block), or for reduce `A += ĀᵀĀ / N` with the position means
//!   `[B, D]`;
//! - `G += κ_b · gᵀg` with `g` the output gradients of the `V` backpropagated vectors
//!   as rows, `[V·B·S, d_out]` for expand or position sums `[V·B, d_out]` for reduce.
//!
//! Each batch's terms are formed on the GPU from zero and summed over the batches on
//! the host ([`BatchSum`]), so the factors do not depend on how the batches are spread
//! over ranks.

use crate::curvature::batches::{
    BatchPass, BatchStage, BatchSum, Batches, LayerRows, for_each_batch,
};
use crate::curvature::options::{FisherType, KfacApprox};
use crate::error::Result;
use crate::gpu::{GpuTensor, Recorder};
use crate::graph::Backward;
use crate::layers::Pass;
use crate::ops::gemm::{Gemm, gemm};
use crate::progress::{Progress, Stage};

/// The Kronecker factors of one curvature layer, on the GPU.
pub(super) struct LayerAccumulators {
    /// `A`, `[D, D]`, when a block of the layer needs it.
    pub input: Option<GpuTensor>,
    /// `G`, `[d_out, d_out]`, unless forward-only.
    pub gradient: Option<GpuTensor>,
}

/// The sums over this rank's batches of one curvature layer's factors.
pub(super) struct LayerSums {
    /// `A`, `[D, D]`, when a block of the layer needs it.
    pub input: Option<BatchSum>,
    /// `G`, `[d_out, d_out]`, unless forward-only.
    pub gradient: Option<BatchSum>,
}

/// Sums every layer's Kronecker factors over this rank's batches of `batches.data`.
pub(super) fn factor_pass(batches: &Batches, progress: &dyn Progress) -> Result<Vec<LayerSums>> {
    let Batches {
        ctx,
        data,
        options,
        layout,
        ..
    } = *batches;
    let sums = layout
        .layers
        .iter()
        .map(|layer| {
            let input_dim = layer.input_dim(layout);
            Ok(LayerSums {
                input: input_dim.map(|d| BatchSum::new(ctx, &[d, d])).transpose()?,
                gradient: (options.fisher != FisherType::ForwardOnly)
                    .then(|| BatchSum::new(ctx, &[layer.d_out, layer.d_out]))
                    .transpose()?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut stage = Factors {
        progress,
        sums,
        approx: options.approx,
        num_data: data.len() as f64,
    };
    for_each_batch(batches, &mut stage)?;
    Ok(stage.sums)
}

struct Factors<'a> {
    progress: &'a dyn Progress,
    sums: Vec<LayerSums>,
    approx: KfacApprox,
    num_data: f64,
}

impl BatchStage for Factors<'_> {
    type Inputs = ();
    const STAGE: Stage = Stage::Factors;
    const WORK: &'static str = "accumulating Kronecker factors";

    fn progress(&self) -> &dyn Progress {
        self.progress
    }

    fn inputs(&mut self, pass: &mut Pass, layers: &[LayerRows], batch: &BatchPass) -> Result<()> {
        for (rows, sums) in layers.iter().zip(&self.sums) {
            if let Some(a) = &sums.input {
                let d = a.shape()[0];
                let x = rows.factor_inputs(pass, &batch.forward, self.approx)?;
                let scale = match self.approx {
                    KfacApprox::Expand => 1.0 / (self.num_data * rows.blocks.positions as f64),
                    KfacApprox::Reduce => 1.0 / self.num_data,
                };
                accumulate_gram(&mut pass.rec, &x, d, scale, &a.batch)?;
                pass.keep(x);
            }
        }
        Ok(())
    }

    fn sums(&mut self) -> Vec<&mut BatchSum> {
        self.sums
            .iter_mut()
            .flat_map(|layer| [layer.input.as_mut(), layer.gradient.as_mut()])
            .flatten()
            .collect()
    }

    fn gradients(
        &mut self,
        pass: &mut Pass,
        layers: &[LayerRows],
        _: &(),
        backward: &Backward,
        _: usize,
        batch: &BatchPass,
    ) -> Result<()> {
        for (rows, sums) in layers.iter().zip(&self.sums) {
            if let Some(g) = &sums.gradient {
                let grads = rows.factor_grads(pass, backward, self.approx)?;
                let d_out = rows.blocks.d_out;
                accumulate_gram(&mut pass.rec, &grads, d_out, batch.kappa, &g.batch)?;
                pass.keep(grads);
            }
        }
        Ok(())
    }
}

/// `C += α·XᵀX` for row-major `x` `[rows, n]` and `c` `[n, n]`.
fn accumulate_gram(
    rec: &mut Recorder,
    x: &GpuTensor,
    n: usize,
    alpha: f64,
    c: &GpuTensor,
) -> Result<()> {
    let rows = x.len() / n;
    gemm(
        rec,
        &Gemm::new(n, n, rows, true, false).scaled(alpha as f32, 1.0),
        x,
        x,
        c,
    )
}
