//! The graph on the GPU: forward over a batch in topological order keeping what
//! backward and the curvature read (each layer declares it, [`crate::layers::Saved`]),
//! and backward of a stack of output gradients in reverse order, summing
//! gradients where a value fans out; each pass is recorded into one compute pass.
//!
//! Layouts: activations are batch-major, NCHW for images and `[B, features]` after a
//! flatten. The backward pass takes `V` gradients w.r.t. the network output at once,
//! `[V, B, C]`, and treats them as a batch of `V·B` examples: layers repeat saved
//! forward tensors `V` times where their backward needs them.

use std::rc::Rc;

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor};
use crate::graph::{Graph, Model};
use crate::layers::{BackwardArgs, ForwardArgs, Pass, batched};
use crate::ops::reduce;

/// A [`Model`] uploaded to the GPU.
pub struct Network {
    graph: Graph,
    /// Per node, its parameter tensors in the order of [`crate::layers::Layer::params`].
    params: Vec<Vec<GpuTensor>>,
}

/// What a forward pass over one batch keeps: the network output, the curvature layers'
/// inputs and what the layers' backward reads; every other value is released (its
/// shape stays, binding it is an error).
pub struct Forward {
    batch: usize,
    /// `values[0]` is the input, `values[i + 1]` node `i`'s output, `[B, *shape]`.
    values: Vec<Rc<GpuTensor>>,
    /// Per node, the value of its first input.
    first_inputs: Vec<usize>,
    /// The output node.
    output: usize,
}

impl Forward {
    /// Examples in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The network output `[B, C]`.
    pub fn output(&self) -> &GpuTensor {
        &self.values[self.output + 1]
    }

    /// Value `v` (0: the input, `i + 1`: node `i`'s output), `[B, *shape]`.
    pub fn value(&self, v: usize) -> &GpuTensor {
        &self.values[v]
    }

    /// The (first) input of node `layer`, `[B, *shape]`.
    pub fn layer_input(&self, layer: usize) -> &GpuTensor {
        &self.values[self.first_inputs[layer]]
    }

    /// The output of node `layer` (pre-activation for linear/conv2d), `[B, *shape]`.
    pub fn layer_output(&self, layer: usize) -> &GpuTensor {
        &self.values[layer + 1]
    }
}

/// Gradients of one stacked backward pass.
pub struct Backward {
    stack: usize,
    /// Per node: for curvature layers the gradient w.r.t. the node's output,
    /// `[V·B, *out_shape]` (`V`-major).
    output_grads: Vec<Option<GpuTensor>>,
    /// Per node: parameter gradients summed over the stack and the batch (PyTorch
    /// layout), when requested.
    param_grads: Vec<Option<Vec<GpuTensor>>>,
}

impl Backward {
    /// `V`.
    pub fn stack(&self) -> usize {
        self.stack
    }

    /// Gradient w.r.t. the output of curvature layer `layer`, `[V·B, *out]`.
    pub fn output_grad(&self, layer: usize) -> &GpuTensor {
        self.output_grads[layer]
            .as_ref()
            .expect("output gradients exist for curvature layers")
    }

    /// Weight and bias gradients of node `layer`, if parameter gradients were requested.
    pub fn param_grads(&self, layer: usize) -> Option<(&GpuTensor, Option<&GpuTensor>)> {
        self.param_grads[layer].as_ref().map(|p| (&p[0], p.get(1)))
    }
}

impl Network {
    /// Uploads the parameters of `model`.
    pub fn new(ctx: &GpuContext, model: &Model) -> Result<Self> {
        let graph = model.graph.clone();
        let mut params = Vec::with_capacity(graph.nodes.len());
        for i in 0..graph.nodes.len() {
            let specs = graph.layer(i).params();
            if specs.is_empty() {
                params.push(Vec::new());
                continue;
            }
            let p = model
                .layer_params(i)
                .ok_or_else(|| Error::model(graph.label(i), "parameters missing"))?;
            params.push(
                specs
                    .iter()
                    .zip(&p.tensors)
                    .map(|(spec, (_, values))| ctx.upload(values, &spec.shape))
                    .collect::<Result<_>>()?,
            );
        }
        Ok(Self { graph, params })
    }

    /// The graph.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Elements of every value of one example, plus the layers' scratch
    /// ([`crate::layers::Layer::scratch_elements`]): what a forward pass holds while it
    /// runs, and about what a backward pass holds per stacked vector.
    pub fn activation_elements(&self) -> usize {
        let values: usize = self
            .graph
            .shapes()
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum();
        let scratch: usize = (0..self.graph.nodes.len())
            .map(|i| self.graph.layer(i).scratch_elements())
            .sum();
        values + scratch
    }

    /// Per value (0: the input, `i + 1`: node `i`'s output), whether a forward pass
    /// keeps it for backward and the curvature: the network output, every curvature
    /// layer's first input, and the values the layers' [`crate::layers::Layer::saved`]
    /// declare.
    pub fn kept_values(&self) -> Vec<bool> {
        let graph = &self.graph;
        let nodes = graph.nodes.len();
        let mut kept = vec![false; nodes + 1];
        kept[graph.output + 1] = true;
        for i in 0..nodes {
            let layer = graph.layer(i);
            let saved = layer.saved();
            let reads = graph.node_inputs(i);
            if saved.inputs {
                for &v in reads {
                    kept[v] = true;
                }
            }
            if saved.output {
                kept[i + 1] = true;
            }
            if layer.curvature().is_some()
                && let Some(&v) = reads.first()
            {
                kept[v] = true;
            }
        }
        kept
    }

    /// Elements of the values one example keeps between forward and backward
    /// ([`Self::kept_values`]; a kept view counts as if it were a copy).
    pub fn kept_elements(&self) -> usize {
        let shapes = self.graph.shapes();
        self.kept_values()
            .iter()
            .zip(shapes)
            .filter(|&(&kept, _)| kept)
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Bytes the layers' scratch workspaces (conv im2col) hold at once during a pass:
    /// each 64 MiB or a sixteenth of the memory budget, unless one example's patches
    /// alone need more.
    pub fn workspace_bytes(&self, ctx: &GpuContext) -> u64 {
        (0..self.graph.nodes.len())
            .map(|i| self.graph.layer(i).workspace_bytes(ctx))
            .sum()
    }

    /// Elements of the largest value of one example.
    pub fn largest_activation(&self) -> usize {
        self.graph
            .shapes()
            .iter()
            .map(|s| s.iter().product::<usize>())
            .max()
            .unwrap_or(0)
    }

    /// `C`, the number of network outputs per example.
    pub fn num_outputs(&self) -> usize {
        self.graph.num_outputs()
    }

    /// Runs the network on `x` (`[B, *input_shape]`), recording every node into one
    /// compute pass, and keeps what backward and the curvature read
    /// ([`Self::kept_values`]; `x` is the first value).
    pub fn forward(&self, ctx: &GpuContext, x: GpuTensor) -> Result<Forward> {
        let mut forward = self.forward_keeping_all(ctx, x)?;
        for (value, kept) in forward.values.iter_mut().zip(self.kept_values()) {
            if !kept {
                *value = Rc::new(value.released());
            }
        }
        Ok(forward)
    }

    /// Like [`Self::forward`], keeping every value (to inspect them).
    pub fn forward_keeping_all(&self, ctx: &GpuContext, x: GpuTensor) -> Result<Forward> {
        let shapes = self.graph.shapes();
        let example: usize = shapes[0].iter().product();
        if example == 0 || !x.len().is_multiple_of(example) {
            return Err(Error::gpu(
                "forward",
                format!(
                    "input of {} values is not a batch of examples of shape {:?}",
                    x.len(),
                    shapes[0]
                ),
            ));
        }
        let batch = x.len() / example;
        let input = x.reshape(&batched(batch, &shapes[0]))?;
        let mut pass = Pass::new(ctx);
        let mut values = vec![Rc::new(input)];
        for (i, params) in self.params.iter().enumerate() {
            let inputs: Vec<&GpuTensor> = self
                .graph
                .node_inputs(i)
                .iter()
                .map(|&v| values[v].as_ref())
                .collect();
            let y = self.graph.layer(i).forward(
                &mut pass,
                &ForwardArgs {
                    batch,
                    inputs: &inputs,
                    params,
                },
            )?;
            values.push(Rc::new(y));
        }
        pass.submit()?;
        let first_inputs = (0..self.params.len())
            .map(|i| self.graph.node_inputs(i).first().copied().unwrap_or(0))
            .collect();
        Ok(Forward {
            batch,
            values,
            first_inputs,
            output: self.graph.output,
        })
    }

    /// Backpropagates `grad_output` (`[V, B, C]`, the gradients of `V` scalar functions
    /// w.r.t. the network output) through the network recorded by `forward`, in one
    /// compute pass: nodes in reverse topological order, from the output back to the
    /// first node with parameters, a value's gradients summed over the nodes that read
    /// it. Returns the gradient w.r.t. every curvature layer's output and, with
    /// `param_grads`, the parameter gradients summed over `V` and `B`.
    pub fn backward(
        &self,
        ctx: &GpuContext,
        forward: &Forward,
        grad_output: &GpuTensor,
        stack: usize,
        param_grads: bool,
    ) -> Result<Backward> {
        let graph = &self.graph;
        let nodes = graph.nodes.len();
        let batch = forward.batch;
        let rows = stack * batch;
        if stack == 0 || grad_output.len() != rows * self.num_outputs() {
            return Err(Error::gpu(
                "backward",
                format!(
                    "expected gradients [{stack}, {batch}, {}], found {} values",
                    self.num_outputs(),
                    grad_output.len()
                ),
            ));
        }
        // A value needs a gradient when a node with parameters computes it or a value
        // it depends on.
        let mut requires = vec![false; nodes + 1];
        for i in 0..nodes {
            requires[i + 1] =
                !self.params[i].is_empty() || graph.node_inputs(i).iter().any(|&v| requires[v]);
        }
        let mut output_grads: Vec<Option<GpuTensor>> = (0..nodes).map(|_| None).collect();
        let mut all_param_grads: Vec<Option<Vec<GpuTensor>>> = (0..nodes).map(|_| None).collect();
        let mut grads: Vec<Option<GpuTensor>> = (0..=nodes).map(|_| None).collect();
        let mut pass = Pass::new(ctx);
        let out = graph.output + 1;
        let start = pass.zeros(&batched(rows, &graph.shapes()[out]))?;
        reduce::copy(&mut pass.rec, grad_output, 0, &start, 0, grad_output.len())?;
        grads[out] = Some(start);
        for i in (0..nodes).rev() {
            if !requires[i + 1] {
                continue;
            }
            let Some(grad_out) = grads[i + 1].take() else {
                continue;
            };
            let reads = graph.node_inputs(i);
            let inputs: Vec<&GpuTensor> = reads.iter().map(|&v| forward.value(v)).collect();
            let input_grads: Vec<bool> = reads.iter().map(|&v| requires[v]).collect();
            let layer = graph.layer(i);
            let result = layer.backward(
                &mut pass,
                &BackwardArgs {
                    stack,
                    batch,
                    grad_out: &grad_out,
                    inputs: &inputs,
                    output: forward.value(i + 1),
                    params: &self.params[i],
                    input_grads: &input_grads,
                    param_grads,
                },
            )?;
            for (&v, g) in reads.iter().zip(result.inputs) {
                let Some(g) = g else { continue };
                match &grads[v] {
                    Some(sum) => {
                        reduce::axpy(&mut pass.rec, 1.0, &g, 1.0, sum)?;
                        pass.keep(g);
                    }
                    None => grads[v] = Some(g),
                }
            }
            all_param_grads[i] = result.params;
            if layer.curvature().is_some() {
                output_grads[i] = Some(grad_out);
            } else {
                pass.keep(grad_out);
            }
        }
        pass.keep(grads);
        pass.submit()?;
        Ok(Backward {
            stack,
            output_grads,
            param_grads: all_param_grads,
        })
    }
}
