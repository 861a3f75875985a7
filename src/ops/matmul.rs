//! Batched matrix products of two activations, `C[i] = A[i]·B[i]` for `A` `[batch, m,
//! k]`, `B` `[batch, k, n]` (`aten.matmul` over equal leading dims), and their
//! vector–Jacobian products for a `V`-major stack of output gradients, all through the
//! tiled GEMM of [`super::gemm`] with batch strides (one GEMM per stacked vector in
//! backward; the saved operands are never repeated).

use super::check::expect_lens;
use super::gemm::{Gemm, gemm};
use crate::error::Result;
use crate::gpu::{GpuTensor, Recorder};

/// The shape of a batched product: `batch` products of `[m, k]·[k, n]`, operands and
/// result packed row-major one matrix after the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchedMatmul {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl BatchedMatmul {
    /// Records `c = a·b` (`a` `[batch, m, k]`, `b` `[batch, k, n]`, `c` `[batch, m, n]`).
    pub fn forward(
        &self,
        rec: &mut Recorder,
        a: &GpuTensor,
        b: &GpuTensor,
        c: &GpuTensor,
    ) -> Result<()> {
        let Self { batch, m, k, n } = *self;
        expect_lens(
            "matmul forward",
            self,
            &[
                ("A", a, batch * m * k),
                ("B", b, batch * k * n),
                ("C", c, batch * m * n),
            ],
        )?;
        gemm(
            rec,
            &Gemm::new(m, n, k, false, false).batched(batch),
            a,
            b,
            c,
        )
    }

    /// Records `grad_a = G·bᵀ` for every one of the `stack` gradients `G` in
    /// `grad_out` (`[stack·batch, m, n]`, `V`-major); `grad_a` is `[stack·batch, m, k]`.
    pub fn backward_a(
        &self,
        rec: &mut Recorder,
        stack: usize,
        grad_out: &GpuTensor,
        b: &GpuTensor,
        grad_a: &GpuTensor,
    ) -> Result<()> {
        let Self { batch, m, k, n } = *self;
        expect_lens(
            "matmul backward",
            self,
            &[
                ("grad_out", grad_out, stack * batch * m * n),
                ("B", b, batch * k * n),
                ("grad_A", grad_a, stack * batch * m * k),
            ],
        )?;
        for v in 0..stack {
            let mut g = Gemm::new(m, k, n, false, true).batched(batch);
            g.offset_a = v * batch * m * n;
            g.offset_c = v * batch * m * k;
            gemm(rec, &g, grad_out, b, grad_a)?;
        }
        Ok(())
    }

    /// Records `grad_b = aᵀ·G` for every one of the `stack` gradients `G` in
    /// `grad_out`; `grad_b` is `[stack·batch, k, n]`.
    pub fn backward_b(
        &self,
        rec: &mut Recorder,
        stack: usize,
        a: &GpuTensor,
        grad_out: &GpuTensor,
        grad_b: &GpuTensor,
    ) -> Result<()> {
        let Self { batch, m, k, n } = *self;
        expect_lens(
            "matmul backward",
            self,
            &[
                ("A", a, batch * m * k),
                ("grad_out", grad_out, stack * batch * m * n),
                ("grad_B", grad_b, stack * batch * k * n),
            ],
        )?;
        for v in 0..stack {
            let mut g = Gemm::new(k, n, m, true, false).batched(batch);
            g.offset_b = v * batch * m * n;
            g.offset_c = v * batch * k * n;
            gemm(rec, &g, a, grad_out, grad_b)?;
        }
        Ok(())
    }
}
