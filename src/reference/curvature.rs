//! The f64 reference of KFAC and EKFAC (the test oracle), written for clarity over speed.
//!
//! Pipeline (SPEC §2–§5): a factor pass over the data in batches of `batch_size`
//! accumulates `A` (from layer inputs, expand or reduce, a ones column for joint blocks)
//! and `G` (from the backpropagated vectors of [`crate::loss`], κ_b-scaled); the factors
//! are eigendecomposed with faer (ascending eigenvalues); for EKFAC a correction pass over
//! the same batches (same MC samples) accumulates `Λ = Σ κ_b (Q_Gᵀ Γ_n Q_A)^{∘2}` from
//! the explicit per-example gradients `Γ_n = Σ_s g_s ã_sᵀ`.
//!
//! All matrices are `[P, K]` row-major in model order (see
//! [`crate::curvature::layout`]). Products, inverses and scalars of the fitted operator
//! are in [`crate::reference::operator`].

use faer::prelude::*;
use faer::{Mat, Side};

use crate::curvature::layout::{BlockKind, ParamKind, ParamLayout};
pub use crate::curvature::operator::Approximation;
use crate::curvature::{FisherType, KfacApprox, Options};
use crate::error::{Error, Result};
use crate::layers::BackwardArgs;
use crate::loss::{self, BatchVectors, Targets};
pub use crate::reference::nn::{LayerWeights, Network64};

/// A symmetric matrix's eigendecomposition: eigenvalues ascending, eigenvectors as the
/// columns of `vectors`.
#[derive(Clone, Debug)]
pub struct Eigen {
    pub values: Vec<f64>,
    pub vectors: Mat<f64>,
}

/// faer's self-adjoint eigensolver (reads the lower triangle).
pub fn eigh(m: &Mat<f64>) -> Result<Eigen> {
    let e = m
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::Options(format!("eigendecomposition failed: {e:?}")))?;
    Ok(Eigen {
        values: (0..m.nrows()).map(|i| e.S()[i]).collect(),
        vectors: e.U().to_owned(),
    })
}

/// The factors of one block.
#[derive(Clone, Debug)]
pub struct BlockFactors {
    /// `A [D, D]` (weight and joint blocks).
    pub a: Option<Mat<f64>>,
    /// `G [d_out, d_out]` (shared by the weight and bias blocks of a layer).
    pub g: Mat<f64>,
    pub a_eigen: Option<Eigen>,
    pub g_eigen: Eigen,
    /// EKFAC's corrected eigenvalues `Λ [d_out, D]`, row-major, indexed
    /// `[G-eigenvector, A-eigenvector]`.
    pub corrected: Option<Vec<f64>>,
}

/// A fitted KFAC (and optionally EKFAC) in f64.
#[derive(Clone, Debug)]
pub struct CpuCurvature {
    pub layout: ParamLayout,
    pub options: Options,
    /// `N`.
    pub num_data: usize,
    /// One entry per block of `layout`.
    pub blocks: Vec<BlockFactors>,
}

/// The data set: inputs `x [N, *input_shape]` and the targets of all `N` examples.
#[derive(Clone, Copy, Debug)]
pub struct Dataset<'a> {
    pub x: &'a [f64],
    pub targets: Targets<'a>,
    pub num_data: usize,
}

impl<'a> Dataset<'a> {
    /// Examples `start..end`: inputs and targets.
    fn batch(&self, start: usize, end: usize, outputs: usize) -> (&'a [f64], Targets<'a>) {
        let per = self.x.len() / self.num_data;
        let t = match self.targets {
            Targets::Classes(y) => Targets::Classes(&y[start..end]),
            Targets::Dense(y) => Targets::Dense(&y[start * outputs..end * outputs]),
        };
        (&self.x[start * per..end * per], t)
    }

    /// `(start, end)` of every batch in loader order.
    fn batches(&self, batch_size: usize) -> Vec<(usize, usize)> {
        (0..self.num_data)
            .step_by(batch_size)
            .map(|s| (s, (s + batch_size).min(self.num_data)))
            .collect()
    }
}

/// One curvature layer's view of one batch.
struct LayerIo {
    /// The layer's input as the network sees it, `[B, *in]`.
    input: Vec<f64>,
    /// Expand-format inputs `[B, S, d_in]` (conv: group-averaged im2col patches).
    patches: Vec<f64>,
    /// Output gradients as the network produces them, `[V, B, *out]`.
    raw_grads: Vec<f64>,
    /// Output gradients `[V, B, S, d_out]` (conv: channel-last).
    grads: Vec<f64>,
}

/// Forward and backward pass of one batch for the curvature layers of `layout`.
struct BatchIo {
    layers: Vec<LayerIo>,
    vectors: BatchVectors,
}

/// Runs one batch through the network: layer inputs, backpropagated vectors and the
/// curvature layers' output gradients (none for forward-only).
fn batch_io(
    net: &Network64<'_>,
    layout: &ParamLayout,
    opts: &Options,
    data: &Dataset<'_>,
    start: usize,
    end: usize,
) -> Result<BatchIo> {
    let batch = end - start;
    let outputs = net.model.num_outputs();
    let (x, targets) = data.batch(start, end, outputs);
    let acts = net.forward(x, batch);
    let logits = &acts[net.model.graph.output + 1];
    let vectors = loss::backprop_vectors(opts, logits, outputs, targets, start, data.num_data)?;
    let nv = vectors.num_vectors;
    let per_vector: Vec<Vec<Vec<f64>>> = (0..nv)
        .map(|v| {
            let gv = &vectors.values[v * batch * outputs..(v + 1) * batch * outputs];
            net.backward(&acts, gv, batch, 1, false).0
        })
        .collect();
    let graph = &net.model.graph;
    let layers = layout
        .layers
        .iter()
        .map(|cl| {
            let i = cl.layer;
            let layer = graph
                .layer(i)
                .curvature()
                .expect("the layout holds curvature layers");
            let input = acts[graph.node_inputs(i)[0]].clone();
            let raw_grads: Vec<f64> = per_vector.iter().flat_map(|g| g[i].clone()).collect();
            LayerIo {
                patches: layer.reference_expand_inputs(&input, batch),
                grads: layer.reference_expand_grads(&raw_grads),
                input,
                raw_grads,
            }
        })
        .collect();
    Ok(BatchIo { layers, vectors })
}

/// `ã`: the row `a` with a 1 appended when `joint`.
fn augmented(a: &[f64], joint: bool) -> Vec<f64> {
    let mut v = a.to_vec();
    if joint {
        v.push(1.0);
    }
    v
}

/// `m += scale·u vᵀ`.
fn add_outer(m: &mut Mat<f64>, u: &[f64], v: &[f64], scale: f64) {
    for (i, &ui) in u.iter().enumerate() {
        for (j, &vj) in v.iter().enumerate() {
            m[(i, j)] += scale * ui * vj;
        }
    }
}

pub(super) fn mat_from_rows(rows: usize, cols: usize, v: &[f64]) -> Mat<f64> {
    Mat::from_fn(rows, cols, |i, j| v[i * cols + j])
}

pub(super) fn rows_of(m: &Mat<f64>) -> Vec<f64> {
    (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)]))
        .collect()
}

impl CpuCurvature {
    /// Fits KFAC (and, with `ekfac`, the eigenvalue correction) on `data`.
    pub fn fit(
        net: &Network64<'_>,
        data: &Dataset<'_>,
        opts: &Options,
        ekfac: bool,
    ) -> Result<Self> {
        let model = net.model;
        if ekfac {
            opts.validate_ekfac()?;
        } else {
            opts.validate()?;
        }
        if data.num_data == 0 || !data.x.len().is_multiple_of(data.num_data) {
            return Err(Error::Options(format!(
                "the data set must hold at least one example of equal size (N = {}, {} input \
                 values)",
                data.num_data,
                data.x.len()
            )));
        }
        let layout = ParamLayout::from_options(model, opts)?;
        let n = data.num_data as f64;
        let batches = data.batches(opts.batch_size);

        // Per curvature layer: A (None for bias-only) and G.
        let joint = |li: usize| {
            layout.layers[li]
                .blocks
                .iter()
                .any(|&b| layout.blocks[b].kind == BlockKind::Joint)
        };
        let mut a_acc: Vec<Option<Mat<f64>>> = layout
            .layers
            .iter()
            .enumerate()
            .map(|(li, cl)| {
                cl.needs_input_factor(&layout).then(|| {
                    Mat::zeros(
                        cl.d_in + usize::from(joint(li)),
                        cl.d_in + usize::from(joint(li)),
                    )
                })
            })
            .collect();
        let mut g_acc: Vec<Mat<f64>> = layout
            .layers
            .iter()
            .map(|cl| Mat::zeros(cl.d_out, cl.d_out))
            .collect();

        for &(start, end) in &batches {
            let io = batch_io(net, &layout, opts, data, start, end)?;
            let b = end - start;
            let kappa = io.vectors.kappa;
            for (li, cl) in layout.layers.iter().enumerate() {
                let lio = &io.layers[li];
                let s = cl.positions;
                if let Some(a) = a_acc[li].as_mut() {
                    let mut batch_a = Mat::<f64>::zeros(a.nrows(), a.ncols());
                    let rows = lio.patches.chunks_exact(cl.d_in);
                    let scale = match opts.approx {
                        KfacApprox::Expand => {
                            for row in rows {
                                let r = augmented(row, joint(li));
                                add_outer(&mut batch_a, &r, &r, 1.0);
                            }
                            1.0 / (n * s as f64)
                        }
                        KfacApprox::Reduce => {
                            for ex in lio.patches.chunks_exact(s * cl.d_in) {
                                let mean: Vec<f64> = (0..cl.d_in)
                                    .map(|j| {
                                        (0..s).map(|p| ex[p * cl.d_in + j]).sum::<f64>() / s as f64
                                    })
                                    .collect();
                                let r = augmented(&mean, joint(li));
                                add_outer(&mut batch_a, &r, &r, 1.0);
                            }
                            1.0 / n
                        }
                    };
                    *a += batch_a * Scale(scale);
                }
                for v in 0..io.vectors.num_vectors {
                    let gv = &lio.grads[v * b * s * cl.d_out..(v + 1) * b * s * cl.d_out];
                    let mut batch_g = Mat::<f64>::zeros(cl.d_out, cl.d_out);
                    match opts.approx {
                        KfacApprox::Expand => {
                            for row in gv.chunks_exact(cl.d_out) {
                                add_outer(&mut batch_g, row, row, 1.0);
                            }
                        }
                        KfacApprox::Reduce => {
                            for ex in gv.chunks_exact(s * cl.d_out) {
                                let sum: Vec<f64> = (0..cl.d_out)
                                    .map(|o| (0..s).map(|p| ex[p * cl.d_out + o]).sum())
                                    .collect();
                                add_outer(&mut batch_g, &sum, &sum, 1.0);
                            }
                        }
                    }
                    g_acc[li] += batch_g * Scale(kappa);
                }
            }
        }
        if opts.fisher == FisherType::ForwardOnly {
            for g in &mut g_acc {
                *g = Mat::identity(g.nrows(), g.ncols());
            }
        }

        let mut blocks = Vec::with_capacity(layout.blocks.len());
        for block in &layout.blocks {
            let li = layout
                .layers
                .iter()
                .position(|cl| cl.layer == block.layer)
                .expect("every block belongs to a layer");
            let a = block
                .has_input_factor()
                .then(|| a_acc[li].clone())
                .flatten();
            let g = g_acc[li].clone();
            blocks.push(BlockFactors {
                a_eigen: a.as_ref().map(eigh).transpose()?,
                g_eigen: eigh(&g)?,
                a,
                g,
                corrected: None,
            });
        }
        let mut fitted = CpuCurvature {
            layout,
            options: opts.clone(),
            num_data: data.num_data,
            blocks,
        };
        if ekfac {
            fitted.correct(net, data, &batches)?;
        }
        Ok(fitted)
    }

    /// The eigenvalue-correction pass (SPEC §4.3), per example and explicitly.
    fn correct(
        &mut self,
        net: &Network64<'_>,
        data: &Dataset<'_>,
        batches: &[(usize, usize)],
    ) -> Result<()> {
        let mut lambda: Vec<Vec<f64>> = self
            .layout
            .blocks
            .iter()
            .map(|b| vec![0.0; b.len()])
            .collect();
        for &(start, end) in batches {
            let io = batch_io(net, &self.layout, &self.options, data, start, end)?;
            let b = end - start;
            let kappa = io.vectors.kappa;
            for (li, cl) in self.layout.layers.iter().enumerate() {
                let lio = &io.layers[li];
                let s = cl.positions;
                for &bi in &cl.blocks {
                    let block = &self.layout.blocks[bi];
                    let factors = &self.blocks[bi];
                    let joint = block.kind == BlockKind::Joint;
                    for v in 0..io.vectors.num_vectors {
                        for n in 0..b {
                            // Γ_n = Σ_s g_s ãᵀ ([d_out, D]); a bias block uses ã = [1].
                            let mut gamma = Mat::<f64>::zeros(block.d_out, block.d_in);
                            for p in 0..s {
                                let g0 = ((v * b + n) * s + p) * cl.d_out;
                                let g = &lio.grads[g0..g0 + cl.d_out];
                                let a = match block.kind {
                                    BlockKind::Bias => vec![1.0],
                                    _ => {
                                        let a0 = (n * s + p) * cl.d_in;
                                        augmented(&lio.patches[a0..a0 + cl.d_in], joint)
                                    }
                                };
                                add_outer(&mut gamma, g, &a, 1.0);
                            }
                            let qg = &factors.g_eigen.vectors;
                            let rotated = match &factors.a_eigen {
                                Some(ea) => qg.transpose() * &gamma * &ea.vectors,
                                None => qg.transpose() * &gamma,
                            };
                            for (l, r) in lambda[bi].iter_mut().zip(rows_of(&rotated)) {
                                *l += kappa * r * r;
                            }
                        }
                    }
                }
            }
        }
        for (f, l) in self.blocks.iter_mut().zip(lambda) {
            f.corrected = Some(l);
        }
        Ok(())
    }
}

/// The exact block diagonal (SPEC §7 "block_diag") of the GGN (type-2), the MC Fisher
/// with the same samples (mc) or the empirical Fisher (empirical), dense `[P, P]`
/// row-major in model order, from per-example gradients `J_nᵀ u_{n,v}` with
/// `u = √κ·V` (batches of one example). Entries between different blocks are zero.
pub fn exact_block_diagonal(
    net: &Network64<'_>,
    data: &Dataset<'_>,
    opts: &Options,
) -> Result<Vec<f64>> {
    opts.validate_ekfac()?;
    let model = net.model;
    let layout = ParamLayout::from_options(model, opts)?;
    let p = layout.num_params;
    let mut block_of = vec![0usize; p];
    for (bi, block) in layout.blocks.iter().enumerate() {
        for o in 0..block.d_out {
            for j in 0..block.d_in {
                block_of[block.param_index(o, j)] = bi;
            }
        }
    }
    let mut m = vec![0.0; p * p];
    for n in 0..data.num_data {
        let io = batch_io(net, &layout, opts, data, n, n + 1)?;
        let kappa = io.vectors.kappa;
        for v in 0..io.vectors.num_vectors {
            let mut grad = vec![0.0; p];
            for (li, cl) in layout.layers.iter().enumerate() {
                let lio = &io.layers[li];
                let out_len = lio.raw_grads.len() / io.vectors.num_vectors;
                let g = &lio.raw_grads[v * out_len..(v + 1) * out_len];
                let grads = model
                    .graph
                    .layer(cl.layer)
                    .reference_backward(&BackwardArgs {
                        stack: 1,
                        batch: 1,
                        grad_out: g,
                        inputs: &[&lio.input],
                        output: &[],
                        params: net.weights(cl.layer),
                        input_grads: &[false],
                        param_grads: true,
                    });
                let tensors = grads.params.unwrap_or_default();
                for param in layout.params.iter().filter(|q| q.layer == cl.layer) {
                    let values = match param.kind {
                        ParamKind::Weight => &tensors[0],
                        ParamKind::Bias => &tensors[1],
                    };
                    grad[param.offset..param.offset + values.len()].copy_from_slice(values);
                }
            }
            for i in 0..p {
                for j in 0..p {
                    if block_of[i] == block_of[j] {
                        m[i * p + j] += kappa * grad[i] * grad[j];
                    }
                }
            }
        }
    }
    Ok(m)
}
