//! What `ekfac influence` writes: the scores file (safetensors) and the Markdown
//! report with the top helpful and harmful training examples per query.

use std::fmt::Write;
use std::path::Path;

use crate::curvature::influence::{Influence, top_k};
use crate::data::{BatchBuffer, DataSource, TargetBuffer};
use crate::error::{Error, Result};

/// The top-`k` tables of an influence result, `[Q, k]` each.
pub struct TopK {
    pub k: usize,
    pub helpful_indices: Vec<i64>,
    pub helpful_scores: Vec<f32>,
    pub harmful_indices: Vec<i64>,
    pub harmful_scores: Vec<f32>,
}

impl TopK {
    /// The `k` largest and most negative scores of each query of `result` over `n`
    /// training examples; an error unless `1 ≤ k ≤ n`.
    pub fn new(result: &Influence, n: usize, k: usize) -> Result<Self> {
        if k == 0 || k > n {
            return Err(Error::Options(format!(
                "--top-k must be between 1 and the number of training examples ({n}), found {k}"
            )));
        }
        let [
            (helpful_indices, helpful_scores),
            (harmful_indices, harmful_scores),
        ] = top_k(&result.scores, n, k);
        Ok(Self {
            k,
            helpful_indices,
            helpful_scores,
            harmful_indices,
            harmful_scores,
        })
    }
}

/// The safetensors bytes of `scores` (F32 `[Q, N]`), `self_influence` (F32 `[N]`) when
/// computed, and the `top_*` tables (I64 indices, F32 scores, `[Q, K]`); `path` names
/// the output in errors.
pub fn influence_file(
    path: &Path,
    result: &Influence,
    queries: usize,
    n: usize,
    top: Option<&TopK>,
) -> Result<Vec<u8>> {
    use safetensors::Dtype;
    use safetensors::tensor::TensorView;
    let mut tensors: Vec<(&str, Dtype, Vec<usize>, &[u8])> = vec![(
        "scores",
        Dtype::F32,
        vec![queries, n],
        bytemuck::cast_slice(&result.scores),
    )];
    if let Some(s) = &result.self_influence {
        tensors.push((
            "self_influence",
            Dtype::F32,
            vec![n],
            bytemuck::cast_slice(s),
        ));
    }
    if let Some(t) = top {
        let shape = vec![queries, t.k];
        tensors.extend([
            (
                "top_helpful_indices",
                Dtype::I64,
                shape.clone(),
                bytemuck::cast_slice(&t.helpful_indices),
            ),
            (
                "top_helpful_scores",
                Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(&t.helpful_scores),
            ),
            (
                "top_harmful_indices",
                Dtype::I64,
                shape.clone(),
                bytemuck::cast_slice(&t.harmful_indices),
            ),
            (
                "top_harmful_scores",
                Dtype::F32,
                shape,
                bytemuck::cast_slice(&t.harmful_scores),
            ),
        ]);
    }
    let views = tensors
        .into_iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(dtype, shape, bytes).map(|v| (name.to_string(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::input(path.display(), format!("building the output: {e}")))?;
    let metadata = [("damping".to_string(), result.damping.to_string())].into();
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::input(path.display(), format!("serialising: {e}")))
}

/// Example `i` of `data`, read from the source (the report reads only the examples it
/// shows).
fn example(data: &dyn DataSource, i: usize) -> Result<BatchBuffer> {
    let mut buffer = BatchBuffer::new(data);
    buffer.read(data, i, i + 1)?;
    Ok(buffer)
}

/// A label of example `i` of `data`: its class, or its first target values.
pub fn label(data: &dyn DataSource, i: usize) -> Result<String> {
    Ok(match example(data, i)?.y {
        TargetBuffer::Classes(y) => y[0].to_string(),
        TargetBuffer::Values { data: row, .. } => {
            let shown: Vec<String> = row.iter().take(3).map(|v| format!("{v:.3}")).collect();
            let more = if row.len() > 3 { ", …" } else { "" };
            format!("[{}{more}]", shown.join(", "))
        }
    })
}

/// The Markdown report: per query its label and tables of the top helpful and harmful
/// training examples (index, label, score), with `images[q]` (a file name in the
/// report's directory) shown where given.
pub fn influence_markdown(
    train: &dyn DataSource,
    query: &dyn DataSource,
    result: &Influence,
    top: &TopK,
    images: &[Option<String>],
) -> Result<String> {
    let mut md = String::new();
    let k = top.k;
    let _ = writeln!(
        md,
        "# Influence report\n\n{} queries, {} training examples, damping δ = {:e}.\n\n\
         `score[q, n] = ∇ℓ_qᵀ (F + δI)⁻¹ ∇ℓ_n`: positive = helpful (training on example n \
         lowers the query's loss), negative = harmful.\n",
        query.len(),
        train.len(),
        result.damping
    );
    if let Some(s) = &result.self_influence {
        let mut order: Vec<usize> = (0..s.len()).collect();
        order.sort_by(|&i, &j| s[j].total_cmp(&s[i]).then(i.cmp(&j)));
        let _ = writeln!(
            md,
            "## Largest self-influence (candidates for mislabelled data)\n\n\
             | rank | training example | label | self-influence |\n|---|---|---|---|"
        );
        for (rank, &i) in order.iter().take(k).enumerate() {
            let _ = writeln!(
                md,
                "| {} | {i} | {} | {:.4e} |",
                rank + 1,
                label(train, i)?,
                s[i]
            );
        }
        md.push('\n');
    }
    for q in 0..query.len() {
        let _ = writeln!(md, "## Query {q} (label {})\n", label(query, q)?);
        if let Some(Some(image)) = images.get(q) {
            let _ = writeln!(
                md,
                "![query {q}: the query, then its top helpful and harmful training images]\
                 ({image})\n"
            );
        }
        let _ = writeln!(
            md,
            "| rank | helpful | label | score | harmful | label | score |\n\
             |---|---|---|---|---|---|---|"
        );
        for r in 0..k {
            let (h, x) = (
                top.helpful_indices[q * k + r] as usize,
                top.harmful_indices[q * k + r] as usize,
            );
            let _ = writeln!(
                md,
                "| {} | {h} | {} | {:+.4e} | {x} | {} | {:+.4e} |",
                r + 1,
                label(train, h)?,
                top.helpful_scores[q * k + r],
                label(train, x)?,
                top.harmful_scores[q * k + r]
            );
        }
        md.push('\n');
    }
    Ok(md)
}

/// The image grid of query `q`: the query, then its top helpful and its top harmful
/// training images with labels and scores, in one row (`shape` = `[C, H, W]`).
pub fn influence_grid(
    train: &dyn DataSource,
    query: &dyn DataSource,
    top: &TopK,
    q: usize,
    shape: [usize; 3],
) -> Result<crate::plot::Picture> {
    let k = top.k;
    let mut shown = vec![(
        example(query, q)?,
        ["query".into(), format!("label {}", label(query, q)?)],
    )];
    for (indices, scores) in [
        (&top.helpful_indices, &top.helpful_scores),
        (&top.harmful_indices, &top.harmful_scores),
    ] {
        for r in 0..k {
            let n = indices[q * k + r] as usize;
            let caption = [
                format!("{:+.2e}", scores[q * k + r]),
                format!("#{n} label {}", label(train, n)?),
            ];
            shown.push((example(train, n)?, caption));
        }
    }
    let tiles: Vec<crate::plot::Tile> = shown
        .iter()
        .map(|(example, caption)| crate::plot::Tile {
            pixels: example.x_f32(),
            shape,
            caption: caption.clone(),
        })
        .collect();
    Ok(crate::plot::image_grid(
        &format!("query {q}: the query, its {k} most helpful, then its {k} most harmful"),
        &tiles,
        tiles.len(),
    ))
}
