//! The whole-network f64 reference: forward through every node of the graph keeping
//! each value, and backward of a stack of `V` output gradients per example in reverse
//! topological order (gradients summed where a value fans out), composed from the
//! layers' f64 maths ([`crate::layers::Layer::reference_forward`], which calls
//! [`super::ops`]).
//!
//! Activations are batch-major and row-major: `[B, *shape]` with the per-example shapes
//! of [`Graph::shapes`](crate::graph::Graph::shapes). A stack of gradients is
//! `[V, B, *shape]`: stack entry `v` of example `b` is row `v·B + b`, so the backward
//! treats the stack as a batch of `V·B` rows whose activations repeat every `B` rows.

use crate::error::{Error, Result};
use crate::graph::Model;
use crate::layers::{BackwardArgs, ForwardArgs};

/// What a forward pass keeps.
#[derive(Clone, Debug)]
pub struct ForwardTrace {
    /// `B`, the number of examples.
    pub batch: usize,
    /// Every value: the input, then each node's output; entry `v` is `[B, *shapes[v]]`.
    /// For a chain, the input of each layer, then the network output.
    pub activations: Vec<Vec<f64>>,
}

/// What a backward pass returns, per curvature layer in model order
/// ([`Model::curvature_layers`]).
#[derive(Clone, Debug)]
pub struct Backward {
    /// The gradient w.r.t. the layer's output (before any activation), `[V, B, *out_shape]`.
    pub output_grads: Vec<Vec<f64>>,
    /// The weight gradient summed over the stack and the batch, PyTorch layout.
    pub weight_grads: Vec<Vec<f64>>,
    /// The bias gradient `[out]` summed over the stack and the batch; `None` without bias.
    pub bias_grads: Vec<Option<Vec<f64>>>,
}

/// Per node: the gradient w.r.t. its output (empty where none flows) and its
/// parameter gradients (where asked for).
pub type NodeGrads = (Vec<Vec<f64>>, Vec<Option<Vec<Vec<f64>>>>);

/// A node's weight and optional bias in f64, PyTorch layouts, row-major.
pub type LayerWeights = (Vec<f64>, Option<Vec<f64>>);

/// The network in f64. Its weights are exact f64 copies of the model's f32 weights, or
/// any f64 values of the same shapes: problems stated in f64 (SPEC §8's golden
/// numbers, 12 digits) need weights that f32 cannot hold.
pub struct Network64<'m> {
    pub(crate) model: &'m Model,
    /// Per node, its parameter tensors in the layer's order.
    weights: Vec<Vec<Vec<f64>>>,
}

impl<'m> Network64<'m> {
    /// The model with its own weights.
    pub fn new(model: &'m Model) -> Self {
        let weights = model
            .params
            .iter()
            .map(|p| {
                p.as_ref().map_or_else(Vec::new, |lp| {
                    lp.tensors
                        .iter()
                        .map(|(_, v)| v.iter().map(|&x| f64::from(x)).collect())
                        .collect()
                })
            })
            .collect();
        Network64 { model, weights }
    }

    /// The model's architecture with f64 weights and biases, indexed by node (`None`
    /// for parameter-free nodes); every shape must match the model's.
    pub fn with_weights(model: &'m Model, weights: Vec<Option<LayerWeights>>) -> Result<Self> {
        let fits = weights.len() == model.params.len()
            && weights
                .iter()
                .zip(&model.params)
                .all(|(w, p)| match (w, p) {
                    (None, None) => true,
                    (Some((w, b)), Some(p)) => {
                        w.len() == p.weight().len()
                            && b.as_ref().map(Vec::len) == p.bias().map(<[f32]>::len)
                    }
                    _ => false,
                });
        if !fits {
            return Err(Error::model(
                "weights",
                "f64 weights do not match the model's parameter shapes",
            ));
        }
        let weights = weights
            .into_iter()
            .map(|w| match w {
                None => Vec::new(),
                Some((w, None)) => vec![w],
                Some((w, Some(b))) => vec![w, b],
            })
            .collect();
        Ok(Network64 { model, weights })
    }

    /// The parameter tensors of node `i` in the layer's order.
    pub fn weights(&self, i: usize) -> &[Vec<f64>] {
        &self.weights[i]
    }

    /// The network outputs `[B, C]` of `x [B, *input_shape]`.
    pub fn outputs(&self, x: &[f64], batch: usize) -> Vec<f64> {
        let mut values = self.forward(x, batch);
        values.swap_remove(self.model.graph.output + 1)
    }

    /// Every value for `x [B, *input_shape]`: the input, then each node's output.
    pub fn forward(&self, x: &[f64], batch: usize) -> Vec<Vec<f64>> {
        let graph = &self.model.graph;
        let mut values = vec![x.to_vec()];
        for i in 0..graph.nodes.len() {
            let inputs: Vec<&[f64]> = graph
                .node_inputs(i)
                .iter()
                .map(|&v| values[v].as_slice())
                .collect();
            let y = graph.layer(i).reference_forward(&ForwardArgs {
                batch,
                inputs: &inputs,
                params: &self.weights[i],
            });
            values.push(y);
        }
        values
    }

    /// Backpropagates `grad_output [V·B, C]` through the values of
    /// [`Network64::forward`]: per node, the gradient w.r.t. its output
    /// (`[V·B, *out]`, empty where none flows) and, with `param_grads`, its parameter
    /// gradients summed over `V·B`.
    pub fn backward(
        &self,
        values: &[Vec<f64>],
        grad_output: &[f64],
        batch: usize,
        stack: usize,
        param_grads: bool,
    ) -> NodeGrads {
        let graph = &self.model.graph;
        let nodes = graph.nodes.len();
        let mut requires = vec![false; nodes + 1];
        for i in 0..nodes {
            requires[i + 1] =
                !self.weights[i].is_empty() || graph.node_inputs(i).iter().any(|&v| requires[v]);
        }
        let mut grads: Vec<Vec<f64>> = vec![Vec::new(); nodes + 1];
        let mut params = vec![None; nodes];
        grads[graph.output + 1] = grad_output.to_vec();
        let mut out_grads = vec![Vec::new(); nodes];
        for i in (0..nodes).rev() {
            if !requires[i + 1] || grads[i + 1].is_empty() {
                continue;
            }
            let reads = graph.node_inputs(i);
            let inputs: Vec<&[f64]> = reads.iter().map(|&v| values[v].as_slice()).collect();
            let input_grads: Vec<bool> = reads.iter().map(|&v| requires[v]).collect();
            let result = graph.layer(i).reference_backward(&BackwardArgs {
                stack,
                batch,
                grad_out: &grads[i + 1],
                inputs: &inputs,
                output: &values[i + 1],
                params: &self.weights[i],
                input_grads: &input_grads,
                param_grads,
            });
            for (&v, g) in reads.iter().zip(result.inputs) {
                let Some(g) = g else { continue };
                if grads[v].is_empty() {
                    grads[v] = g;
                } else {
                    grads[v].iter_mut().zip(&g).for_each(|(s, x)| *s += x);
                }
            }
            params[i] = result.params;
            out_grads[i] = std::mem::take(&mut grads[i + 1]);
        }
        (out_grads, params)
    }
}

/// Runs the network on `x [batch, *input_shape]`, keeping every value.
///
/// Panics if `x` does not hold `batch` examples (callers check user data first).
pub fn forward(model: &Model, x: &[f64], batch: usize) -> ForwardTrace {
    let example: usize = model.graph.shapes()[0].iter().product();
    assert_eq!(
        x.len(),
        batch * example,
        "forward: x must be [batch, *input_shape]"
    );
    ForwardTrace {
        batch,
        activations: Network64::new(model).forward(x, batch),
    }
}

/// Backpropagates `grad_output [V, B, C]` (a stack of `V` gradients w.r.t. the network
/// output per example) through the network of `trace`.
///
/// Panics if `grad_output` is not `[stack, trace.batch, C]`.
pub fn backward(
    model: &Model,
    trace: &ForwardTrace,
    grad_output: &[f64],
    stack: usize,
) -> Backward {
    let rows = stack * trace.batch;
    assert_eq!(
        grad_output.len(),
        rows * model.num_outputs(),
        "backward: grad_output must be [V, B, C]"
    );
    let net = Network64::new(model);
    let (mut out_grads, mut params) =
        net.backward(&trace.activations, grad_output, trace.batch, stack, true);
    let curvature = model.curvature_layers();
    let mut result = Backward {
        output_grads: Vec::new(),
        weight_grads: Vec::new(),
        bias_grads: Vec::new(),
    };
    for &i in &curvature {
        let mut p = params[i].take().unwrap_or_default().into_iter();
        result.output_grads.push(std::mem::take(&mut out_grads[i]));
        result.weight_grads.push(p.next().unwrap_or_default());
        result.bias_grads.push(p.next());
    }
    result
}
