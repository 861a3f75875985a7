//! The whole-network f64 reference: forward through every layer keeping each layer's
//! input, and backward of a stack of `V` output gradients per example, composed from
//! the per-layer maths of [`super::ops`].
//!
//! Activations are batch-major and row-major: `[B, *shape]` with the per-example shapes
//! of [`ModelSpec::shapes`](crate::model::ModelSpec::shapes). A stack of gradients is
//! `[V, B, *shape]`: stack entry `v` of example `b` is row `v·B + b`, so the backward
//! treats the stack as a batch of `V·B` rows whose activations repeat every `B` rows.

use super::ops;
use crate::model::{Layer, Model};

/// What a forward pass keeps.
#[derive(Clone, Debug)]
pub struct ForwardTrace {
    /// `B`, the number of examples.
    pub batch: usize,
    /// `layers + 1` entries: the input of each layer, then the network output;
    /// entry `i` is `[B, *shapes[i]]`.
    pub activations: Vec<Vec<f64>>,
}

/// What a backward pass returns, per linear/conv2d layer in model order
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

/// `[H, W]` of a per-example `[C, H, W]` shape.
fn spatial(shape: &[usize]) -> [usize; 2] {
    [shape[1], shape[2]]
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// Layer `i` applied to `x [rows, *shapes[i]]`.
fn layer_forward(
    model: &Model,
    shapes: &[Vec<usize>],
    i: usize,
    x: &[f64],
    rows: usize,
) -> Vec<f64> {
    let input = &shapes[i];
    match &model.spec.layers[i] {
        Layer::Linear(l) => {
            let p = model.params[i]
                .as_ref()
                .expect("linear layer has parameters");
            let bias = p.bias.as_deref().map(to_f64);
            ops::linear_forward(
                x,
                &to_f64(&p.weight),
                bias.as_deref(),
                rows,
                l.in_features,
                l.out_features,
            )
        }
        Layer::Conv2d(c) => {
            let p = model.params[i]
                .as_ref()
                .expect("conv2d layer has parameters");
            let bias = p.bias.as_deref().map(to_f64);
            let geo = c.geometry(rows, spatial(input));
            ops::conv2d_forward(x, &to_f64(&p.weight), bias.as_deref(), &geo)
        }
        Layer::Relu => ops::relu_forward(x),
        Layer::Sigmoid => ops::sigmoid_forward(x),
        Layer::Tanh => ops::tanh_forward(x),
        Layer::Flatten => x.to_vec(),
        Layer::MaxPool2d(p) => {
            ops::max_pool2d_forward(x, &p.geometry(rows, input[0], spatial(input))).0
        }
        Layer::AvgPool2d(p) => {
            ops::avg_pool2d_forward(x, &p.geometry(rows, input[0], spatial(input)))
        }
    }
}

/// Runs the network on `x [batch, *input_shape]`, keeping every layer's input.
///
/// Panics if `x` does not hold `batch` examples (callers check user data first).
pub fn forward(model: &Model, x: &[f64], batch: usize) -> ForwardTrace {
    let shapes = model.shapes();
    let example: usize = shapes[0].iter().product();
    assert_eq!(
        x.len(),
        batch * example,
        "forward: x must be [batch, *input_shape]"
    );
    let mut activations = vec![x.to_vec()];
    for i in 0..model.spec.layers.len() {
        let next = layer_forward(model, &shapes, i, &activations[i], batch);
        activations.push(next);
    }
    ForwardTrace { batch, activations }
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
    let shapes = model.shapes();
    let layers = &model.spec.layers;
    let b = trace.batch;
    let rows = stack * b;
    let out_len: usize = shapes[layers.len()].iter().product();
    assert_eq!(
        grad_output.len(),
        rows * out_len,
        "backward: grad_output must be [V, B, C]"
    );
    let curvature = model.curvature_layers();
    let mut output_grads = vec![Vec::new(); curvature.len()];
    let mut weight_grads = vec![Vec::new(); curvature.len()];
    let mut bias_grads = vec![None; curvature.len()];
    let mut grad = grad_output.to_vec();
    for i in (0..layers.len()).rev() {
        let input = &shapes[i];
        let x = trace.activations[i].repeat(stack);
        let slot = curvature.iter().position(|&c| c == i);
        grad = match &layers[i] {
            Layer::Linear(l) => {
                let p = model.params[i]
                    .as_ref()
                    .expect("linear layer has parameters");
                let slot = slot.expect("linear layers are curvature layers");
                let (n_in, n_out) = (l.in_features, l.out_features);
                weight_grads[slot] = ops::linear_backward_weight(&grad, &x, rows, n_in, n_out);
                bias_grads[slot] = p
                    .bias
                    .is_some()
                    .then(|| ops::linear_backward_bias(&grad, rows, n_out));
                let dx = ops::linear_backward_input(&grad, &to_f64(&p.weight), rows, n_in, n_out);
                output_grads[slot] = std::mem::replace(&mut grad, dx);
                grad
            }
            Layer::Conv2d(c) => {
                let p = model.params[i]
                    .as_ref()
                    .expect("conv2d layer has parameters");
                let slot = slot.expect("conv2d layers are curvature layers");
                let geo = c.geometry(rows, spatial(input));
                weight_grads[slot] = ops::conv2d_backward_weight(&grad, &x, &geo);
                bias_grads[slot] = p
                    .bias
                    .is_some()
                    .then(|| ops::conv2d_backward_bias(&grad, &geo));
                let dx = ops::conv2d_backward_input(&grad, &to_f64(&p.weight), &geo);
                output_grads[slot] = std::mem::replace(&mut grad, dx);
                grad
            }
            Layer::Relu => ops::relu_backward(&x, &grad),
            Layer::Sigmoid => ops::sigmoid_backward(&trace.activations[i + 1].repeat(stack), &grad),
            Layer::Tanh => ops::tanh_backward(&trace.activations[i + 1].repeat(stack), &grad),
            Layer::Flatten => grad,
            Layer::MaxPool2d(p) => {
                let geo = p.geometry(rows, input[0], spatial(input));
                let (_, argmax) = ops::max_pool2d_forward(&x, &geo);
                ops::max_pool2d_backward(&grad, &argmax, &geo)
            }
            Layer::AvgPool2d(p) => {
                ops::avg_pool2d_backward(&grad, &p.geometry(rows, input[0], spatial(input)))
            }
        };
    }
    Backward {
        output_grads,
        weight_grads,
        bias_grads,
    }
}
