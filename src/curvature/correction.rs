//! EKFAC's correction pass (SPEC §4), always in expand format: without weight sharing
//! `Λ += κ_b · hᵀ (ÃQ_A)^{∘2}` with `h = Σ_v (g_v Q_G)^{∘2}` (`[B, d_out]`), the
//! per-example identity `Q_Gᵀ(g ãᵀ)Q_A = (Q_Gᵀg)(Q_Aᵀã)ᵀ`; with sharing the fused kernel
//! [`correct_shared`] forms tiles of `Q_Gᵀ(Σ_s g_s ã_sᵀ)Q_A` in registers. Neither
//! forms a `B × d_out × D` tensor. Bias blocks get `λ += κ_b · 1ᵀh` from position sums.
//! Each batch's terms are formed on the GPU from zero and summed over the batches on
//! the host ([`BatchSum`]), as the factors are.

use crate::curvature::batches::{
    BatchPass, BatchStage, BatchSum, Batches, LayerRows, for_each_batch,
};
use crate::curvature::layout::{BlockKind, ParamLayout};
use crate::curvature::state::FactorEigen;
use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Backward;
use crate::layers::Pass;
use crate::ops::eigencorrect::{correct_shared, square_sum_stack};
use crate::ops::gemm::{Gemm, gemm};
use crate::ops::reduce::{Sum, square, sum_rows};
use crate::progress::{Progress, Stage};

/// The eigenbases of one layer: host copies (for the state) and GPU copies (for the
/// correction pass). `gradient.1` is `None` for forward-only's identity `G`.
pub(super) struct LayerBasis {
    pub input: Option<(FactorEigen, GpuTensor)>,
    pub gradient: (FactorEigen, Option<GpuTensor>),
}

/// EKFAC's corrected eigenvalues of every block of `batches.layout`, `[d_out, D]` each,
/// summed over this rank's batches.
pub(super) fn correction_pass(
    batches: &Batches,
    bases: &[LayerBasis],
    progress: &dyn Progress,
) -> Result<Vec<BatchSum>> {
    let layout = batches.layout;
    let corrected = layout
        .blocks
        .iter()
        .map(|b| BatchSum::new(batches.ctx, &[b.d_out, b.d_in]))
        .collect::<Result<Vec<_>>>()?;
    let mut stage = Correction {
        progress,
        layout,
        bases,
        corrected,
    };
    for_each_batch(batches, &mut stage)?;
    Ok(stage.corrected)
}

struct Correction<'a> {
    progress: &'a dyn Progress,
    layout: &'a ParamLayout,
    bases: &'a [LayerBasis],
    /// `Λ` per block.
    corrected: Vec<BatchSum>,
}

impl BatchStage for Correction<'_> {
    /// Per layer, the rotated expand-format inputs `x̃ = ã Q_A` `[B·S, D]`, squared for
    /// layers without weight sharing.
    type Inputs = Vec<Option<GpuTensor>>;
    const STAGE: Stage = Stage::Correction;
    const WORK: &'static str = "correcting eigenvalues";

    fn progress(&self) -> &dyn Progress {
        self.progress
    }

    fn inputs(
        &mut self,
        pass: &mut Pass,
        layers: &[LayerRows],
        batch: &BatchPass,
    ) -> Result<Self::Inputs> {
        let len = batch.forward.batch();
        let mut rotated_inputs = Vec::with_capacity(layers.len());
        for (rows, basis) in layers.iter().zip(self.bases) {
            rotated_inputs.push(match &basis.input {
                Some((_, q_a)) => {
                    let d = q_a.shape()[0];
                    let n = len * rows.blocks.positions;
                    let x = rows.expand_inputs(pass, &batch.forward)?;
                    let rotated = pass.zeros(&[n, d])?;
                    gemm(
                        &mut pass.rec,
                        &Gemm::new(n, d, d, false, false),
                        &x,
                        q_a,
                        &rotated,
                    )?;
                    pass.keep(x);
                    if rows.blocks.positions == 1 {
                        let squared = pass.zeros(&[n, d])?;
                        square(&mut pass.rec, 1.0, &rotated, 0.0, &squared)?;
                        pass.keep(rotated);
                        Some(squared)
                    } else {
                        Some(rotated)
                    }
                }
                None => None,
            });
        }
        Ok(rotated_inputs)
    }

    fn sums(&mut self) -> Vec<&mut BatchSum> {
        self.corrected.iter_mut().collect()
    }

    fn gradients(
        &mut self,
        pass: &mut Pass,
        layers: &[LayerRows],
        rotated_inputs: &Self::Inputs,
        backward: &Backward,
        nv: usize,
        batch: &BatchPass,
    ) -> Result<()> {
        let len = batch.forward.batch();
        let kappa = batch.kappa as f32;
        for ((rows, basis), x) in layers.iter().zip(self.bases).zip(rotated_inputs) {
            let q_g = basis.gradient.1.as_ref().expect("EKFAC has G");
            let (d_out, positions) = (rows.blocks.d_out, rows.blocks.positions);
            for &b in &rows.blocks.blocks {
                let block = &self.layout.blocks[b];
                let corrected = &self.corrected[b].batch;
                match (block.kind, x) {
                    (BlockKind::Weight | BlockKind::Joint, Some(x)) if positions > 1 => {
                        // Fused: Λ += κ Σ_{v,n} (Σ_s g̃_{v,n,s} x̃_{n,s}ᵀ)^∘2.
                        let g = rows.expand_grads(pass, backward)?;
                        let n = g.len() / d_out;
                        let rotated = pass.zeros(&[n, d_out])?;
                        gemm(
                            &mut pass.rec,
                            &Gemm::new(n, d_out, d_out, false, false),
                            &g,
                            q_g,
                            &rotated,
                        )?;
                        correct_shared(
                            &mut pass.rec,
                            &rotated,
                            x,
                            corrected,
                            nv,
                            positions,
                            kappa,
                        )?;
                        pass.keep(g);
                        pass.keep(rotated);
                    }
                    (BlockKind::Weight | BlockKind::Joint, Some(squared)) => {
                        // No sharing: Λ += κ hᵀ (x̃)^∘2 with h = Σ_v (g_v Q_G)^∘2.
                        let g = backward.output_grad(rows.blocks.layer);
                        let h = rotated_square_sum(pass, g, q_g, nv, len, d_out)?;
                        gemm(
                            &mut pass.rec,
                            &Gemm::new(d_out, block.d_in, len, true, false).scaled(kappa, 1.0),
                            &h,
                            squared,
                            corrected,
                        )?;
                        pass.keep(h);
                    }
                    (BlockKind::Bias, _) => {
                        // λ += κ 1ᵀ Σ_v (Q_Gᵀ Σ_s g_{v,s})^∘2.
                        let summed = rows.summed_grads(pass, backward)?;
                        let h = rotated_square_sum(pass, &summed, q_g, nv, len, d_out)?;
                        let sum = Sum {
                            alpha: kappa,
                            beta: 1.0,
                            ..Sum::new(len, d_out)
                        };
                        sum_rows(pass.ctx(), &mut pass.rec, &h, corrected, &sum)?;
                        pass.keep(summed);
                        pass.keep(h);
                    }
                    (_, None) => unreachable!("weight blocks have an input factor"),
                }
            }
        }
        Ok(())
    }
}

/// `h = Σ_v (g_v Q_G)^∘2`, `[B, d_out]`, for `g` `[V·B, d_out]`.
fn rotated_square_sum(
    pass: &mut Pass,
    g: &GpuTensor,
    q_g: &GpuTensor,
    stack: usize,
    batch: usize,
    d_out: usize,
) -> Result<GpuTensor> {
    let projected = pass.zeros(&[stack * batch, d_out])?;
    gemm(
        &mut pass.rec,
        &Gemm::new(stack * batch, d_out, d_out, false, false),
        g,
        q_g,
        &projected,
    )?;
    let h = pass.zeros(&[batch, d_out])?;
    square_sum_stack(&mut pass.rec, &projected, &h)?;
    pass.keep(projected);
    Ok(h)
}
