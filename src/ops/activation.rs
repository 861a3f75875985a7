//! ReLU, sigmoid and tanh, and the activations with constants of [`Pointwise`], forward
//! and backward (`shaders/activation.wgsl`), elementwise over tensors of any shape.
//! Inputs and outputs must be distinct tensors.

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Kernel, Recorder, grid_1d};
use crate::kernel_params;

kernel_params! {
    /// Every activation entry point: elements of the tensors.
    pub struct ActivationParams {
        len: u32,
    }
}

kernel_params! {
    /// The [`Pointwise`] entry points: elements, the activation (`Pointwise::kind`) and
    /// its two constants.
    pub struct PointwiseParams {
        len: u32,
        kind: u32,
        a: f32,
        b: f32,
    }
}

/// An elementwise activation with constants, as PyTorch defines it (branches and the
/// value at the kinks included).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pointwise {
    /// `x > 0 ? x : negative_slope·x` (`nn.LeakyReLU`).
    LeakyRelu { negative_slope: f64 },
    /// `x > 0 ? x : alpha·(eˣ − 1)` (`nn.ELU`).
    Elu { alpha: f64 },
    /// `clamp(x, min, max)`, gradient where `min < x < max` (`nn.Hardtanh`, `nn.ReLU6`).
    Hardtanh { min: f64, max: f64 },
    /// `x·clamp(x + 3, 0, 6)/6` (`nn.Hardswish`).
    Hardswish,
    /// `clamp(x + 3, 0, 6)/6` (`nn.Hardsigmoid`).
    Hardsigmoid,
    /// `βx > threshold ? x : log(1 + e^{βx})/β` (`nn.Softplus`).
    Softplus { beta: f64, threshold: f64 },
    /// `x·tanh(log(1 + eˣ))` (`nn.Mish`).
    Mish,
}

impl Pointwise {
    /// The shader's `kind` and constants `(a, b)`.
    fn params(&self, len: u32) -> PointwiseParams {
        let (kind, a, b) = match *self {
            Pointwise::LeakyRelu { negative_slope } => (0, negative_slope, 0.0),
            Pointwise::Elu { alpha } => (1, alpha, 0.0),
            Pointwise::Hardtanh { min, max } => (2, min, max),
            Pointwise::Hardswish => (3, 0.0, 0.0),
            Pointwise::Hardsigmoid => (4, 0.0, 0.0),
            Pointwise::Softplus { beta, threshold } => (5, beta, threshold),
            Pointwise::Mish => (6, 0.0, 0.0),
        };
        PointwiseParams {
            len,
            kind,
            a: a as f32,
            b: b as f32,
        }
    }

    /// Records `y = f(x)`.
    pub fn forward(&self, rec: &mut Recorder, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
        let len = same_len("pointwise_forward", &[("x", x), ("y", y)])?;
        rec.dispatch(
            &Kernel::new(&super::ACTIVATION, "pointwise_forward"),
            &[x],
            &[y],
            &self.params(len),
            grid_1d(len.div_ceil(256)),
        )
    }

    /// Records `grad_in = grad_out·f'(x)` from the forward input `x`.
    pub fn backward(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        grad_out: &GpuTensor,
        grad_in: &GpuTensor,
    ) -> Result<()> {
        let len = same_len(
            "pointwise_backward",
            &[("x", x), ("grad_out", grad_out), ("grad_in", grad_in)],
        )?;
        rec.dispatch(
            &Kernel::new(&super::ACTIVATION, "pointwise_backward"),
            &[x, grad_out],
            &[grad_in],
            &self.params(len),
            grid_1d(len.div_ceil(256)),
        )
    }
}

/// Errors unless every tensor has the length of the first, and that fits in `u32`.
fn same_len(op: &str, tensors: &[(&str, &GpuTensor)]) -> Result<u32> {
    let (first, t0) = tensors[0];
    for (name, t) in &tensors[1..] {
        if t.len() != t0.len() {
            return Err(Error::gpu(
                op,
                format!(
                    "{name} {:?} must have as many elements as {first} {:?} ({})",
                    t.shape(),
                    t0.shape(),
                    t0.len()
                ),
            ));
        }
    }
    u32::try_from(t0.len())
        .map_err(|_| Error::gpu(op, format!("{} elements exceed 32-bit indices", t0.len())))
}

fn forward(rec: &mut Recorder, entry: &'static str, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
    let len = same_len(entry, &[("x", x), ("y", y)])?;
    rec.dispatch(
        &Kernel::new(&super::ACTIVATION, entry),
        &[x],
        &[y],
        &ActivationParams { len },
        grid_1d(len.div_ceil(256)),
    )
}

fn backward(
    rec: &mut Recorder,
    entry: &'static str,
    saved: &GpuTensor,
    grad_out: &GpuTensor,
    grad_in: &GpuTensor,
) -> Result<()> {
    let len = same_len(
        entry,
        &[
            ("saved activation", saved),
            ("grad_out", grad_out),
            ("grad_in", grad_in),
        ],
    )?;
    rec.dispatch(
        &Kernel::new(&super::ACTIVATION, entry),
        &[saved, grad_out],
        &[grad_in],
        &ActivationParams { len },
        grid_1d(len.div_ceil(256)),
    )
}

/// Records `y = max(x, 0)`.
pub fn relu_forward(rec: &mut Recorder, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
    forward(rec, "relu_forward", x, y)
}

/// Records `grad_in = grad_out` where the forward input `x > 0`, else 0 (derivative 0
/// at 0, as PyTorch).
pub fn relu_backward(
    rec: &mut Recorder,
    x: &GpuTensor,
    grad_out: &GpuTensor,
    grad_in: &GpuTensor,
) -> Result<()> {
    backward(rec, "relu_backward", x, grad_out, grad_in)
}

/// Records `y = 1/(1 + e^{−x})` (no overflow for any finite `x`).
pub fn sigmoid_forward(rec: &mut Recorder, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
    forward(rec, "sigmoid_forward", x, y)
}

/// Records `grad_in = grad_out·y·(1 − y)` from the forward output `y`.
pub fn sigmoid_backward(
    rec: &mut Recorder,
    y: &GpuTensor,
    grad_out: &GpuTensor,
    grad_in: &GpuTensor,
) -> Result<()> {
    backward(rec, "sigmoid_backward", y, grad_out, grad_in)
}

/// Records `y = tanh(x)`, computed without overflow for large `|x|` and without
/// cancellation near 0 (the WGSL builtin has neither guarantee on every driver).
pub fn tanh_forward(rec: &mut Recorder, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
    forward(rec, "tanh_forward", x, y)
}

/// Records `grad_in = grad_out·(1 − y²)` from the forward output `y`.
pub fn tanh_backward(
    rec: &mut Recorder,
    y: &GpuTensor,
    grad_out: &GpuTensor,
    grad_in: &GpuTensor,
) -> Result<()> {
    backward(rec, "tanh_backward", y, grad_out, grad_in)
}

/// `relu(x)` as a new tensor, submitted at once.
pub fn relu(ctx: &GpuContext, x: &GpuTensor) -> Result<GpuTensor> {
    let y = ctx.zeros(x.shape())?;
    let mut rec = ctx.recorder();
    relu_forward(&mut rec, x, &y)?;
    rec.submit()?;
    Ok(y)
}
