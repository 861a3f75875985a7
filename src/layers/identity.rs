//! `identity`: the value unchanged (what eval-mode `Dropout`, `nn.Identity` and an empty
//! `nn.Sequential` compute): a [`View`] to the same shape.

use crate::error::Result;
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::view::View;
use crate::layers::{Layer, one_input};

/// Builds an identity of one input (no attributes).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    Attrs::new(node, &[])?;
    Ok(View::boxed("identity", input, input.to_vec()))
}
