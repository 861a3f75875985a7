//! `torch.flatten(x, start_dim, end_dim)` (dims count the batch axis, as in PyTorch;
//! `start_dim` ≥ 1): a [`View`], row-major order unchanged.

use crate::error::Result;
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::view::View;
use crate::layers::{Layer, one_input};

/// Builds a flatten from `start_dim` (default 1) and `end_dim` (default −1).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["start_dim", "end_dim"])?;
    let rank = input.len() as i64 + 1;
    let dim = |key: &str, default: i64| -> Result<usize> {
        let d = a.i64_or(key, default)?;
        let d = if d < 0 { d + rank } else { d };
        if d < 1 || d >= rank {
            return Err(a.err(format!(
                "{key} = {} is out of range for an input of {rank} dimensions (the batch \
                 axis, dim 0, cannot be flattened)",
                a.i64_or(key, default)?
            )));
        }
        Ok(d as usize - 1)
    };
    let (start, end) = (dim("start_dim", 1)?, dim("end_dim", -1)?);
    if start > end {
        return Err(a.err("start_dim must not come after end_dim"));
    }
    let mut output = input[..start].to_vec();
    output.push(input[start..=end].iter().product());
    output.extend(&input[end + 1..]);
    Ok(View::boxed("flatten", input, output))
}
