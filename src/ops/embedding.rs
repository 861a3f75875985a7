//! Embedding lookup and its table gradient (`shaders/embedding.wgsl`). Token ids are a
//! tensor of u32 words (`GpuContext::upload_u32`), `[B, *shape]`.

use super::check::{expect_len, expect_u32, grid};
use crate::error::{Error, Result};
use crate::gpu::{GpuTensor, Kernel, Recorder};
use crate::kernel_params;

kernel_params! {
    /// `rows` output rows of `dim` features, row `r` reading id `r mod id_rows`.
    pub struct EmbeddingParams {
        rows: u32,
        id_rows: u32,
        dim: u32,
        num_embeddings: u32,
    }
}

fn params(
    op: &str,
    ids: &GpuTensor,
    rows: usize,
    table_len: usize,
    dim: usize,
) -> Result<EmbeddingParams> {
    if dim == 0
        || !table_len.is_multiple_of(dim)
        || ids.is_empty()
        || !rows.is_multiple_of(ids.len())
    {
        return Err(Error::gpu(
            op,
            format!(
                "{rows} rows of ids {:?} with a table of {table_len} values of dim {dim}",
                ids.shape()
            ),
        ));
    }
    expect_u32(op, &[rows * dim, table_len])?;
    Ok(EmbeddingParams {
        rows: rows as u32,
        id_rows: ids.len() as u32,
        dim: dim as u32,
        num_embeddings: (table_len / dim) as u32,
    })
}

/// Records `y[r, :] = table[ids[r], :]`: `ids` `[B, *shape]` (u32), `table`
/// `[num_embeddings, dim]`, `y` `[B, *shape, dim]` (overwritten).
pub fn embedding_forward(
    rec: &mut Recorder,
    ids: &GpuTensor,
    table: &GpuTensor,
    y: &GpuTensor,
) -> Result<()> {
    let op = "embedding forward";
    let dim = *table.shape().last().unwrap_or(&0);
    let p = params(op, ids, ids.len(), table.len(), dim)?;
    expect_len(op, "y", y, ids.len() * dim)?;
    rec.dispatch(
        &Kernel::new(&super::EMBEDDING, "embedding_forward"),
        &[ids, table],
        &[y],
        &p,
        grid(y.len()),
    )
}

/// Records the table gradient `grad_table[j, :] = Σ_{r: ids[r mod n] = j} grad_out[r, :]`
/// for a stack of gradients `grad_out` `[V·B, *shape, dim]` of the ids `[B, *shape]`
/// (`n` ids); `grad_table` `[num_embeddings, dim]` (overwritten).
pub fn embedding_table_grad(
    rec: &mut Recorder,
    ids: &GpuTensor,
    grad_out: &GpuTensor,
    grad_table: &GpuTensor,
) -> Result<()> {
    let op = "embedding table gradient";
    let dim = *grad_table.shape().last().unwrap_or(&0);
    let rows = grad_out.len() / dim.max(1);
    let p = params(op, ids, rows, grad_table.len(), dim)?;
    expect_len(op, "grad_out", grad_out, rows * dim)?;
    rec.dispatch(
        &Kernel::new(&super::EMBEDDING, "embedding_table_grad"),
        &[ids, grad_out],
        &[grad_table],
        &p,
        grid(grad_table.len()),
    )
}
