//! Gated activations `x·c(x)` (`shaders/gated.wgsl`): SiLU and GELU in PyTorch's two
//! forms, forward and backward, elementwise over tensors of any shape; one kernel pair
//! with the gate chosen by the pipeline constant `GATE`. Backward takes a `V`-major
//! stack of gradients and reads the saved forward input without repeating it.

use super::check::{expect_len, expect_u32, grid};
use crate::error::{Error, Result};
use crate::gpu::{GpuTensor, Kernel, Recorder};
use crate::kernel_params;

kernel_params! {
    /// Forward: `len` elements.
    pub struct ElementwiseParams {
        len: u32,
    }
}

kernel_params! {
    /// Backward: `len` gradient elements, a stack of gradients of the `x_len` saved
    /// inputs (element `i` reads `x[i mod x_len]`).
    pub struct StackedParams {
        len: u32,
        x_len: u32,
    }
}

/// The gate `c` of `x·c(x)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// SiLU: `x·σ(x)`, `σ` the logistic function.
    Silu,
    /// GELU (`approximate="none"`): `x·Φ(x)`, `Φ` the standard normal CDF (through erfc).
    GeluErf,
    /// GELU (`approximate="tanh"`): `x·(1 + tanh(√(2/π)(x + 0.044715x³)))/2`.
    GeluTanh,
}

impl Gate {
    /// PyTorch's name of the activation.
    pub fn op(self) -> &'static str {
        match self {
            Gate::Silu => "silu",
            Gate::GeluErf | Gate::GeluTanh => "gelu",
        }
    }

    /// The entry point `entry` of `shaders/gated.wgsl` with `GATE` set.
    fn kernel(self, entry: &'static str) -> Kernel {
        let code = match self {
            Gate::Silu => 0.0,
            Gate::GeluErf => 1.0,
            Gate::GeluTanh => 2.0,
        };
        Kernel::new(&super::GATED, entry).with("GATE", code)
    }
}

/// Records `y = x·c(x)`; `y` has as many elements as `x`.
pub fn gated_forward(rec: &mut Recorder, gate: Gate, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
    let op = "gated forward";
    expect_len(op, "y", y, x.len())?;
    expect_u32(op, &[x.len()])?;
    rec.dispatch(
        &gate.kernel("gated_forward"),
        &[x],
        &[y],
        &ElementwiseParams {
            len: x.len() as u32,
        },
        grid(x.len()),
    )
}

/// Records `grad_in = grad_out·(c(x) + x·c′(x))` for a stack of gradients: `x` the
/// saved forward input, `grad_out` `V` times as long (`V`-major), `grad_in` like
/// `grad_out` (overwritten).
pub fn gated_backward(
    rec: &mut Recorder,
    gate: Gate,
    x: &GpuTensor,
    grad_out: &GpuTensor,
    grad_in: &GpuTensor,
) -> Result<()> {
    let op = "gated backward";
    if x.is_empty() || !grad_out.len().is_multiple_of(x.len()) {
        return Err(Error::gpu(
            op,
            format!(
                "grad_out {:?} must be a stack of gradients shaped like x {:?}",
                grad_out.shape(),
                x.shape()
            ),
        ));
    }
    expect_len(op, "grad_in", grad_in, grad_out.len())?;
    expect_u32(op, &[grad_out.len()])?;
    rec.dispatch(
        &gate.kernel("gated_backward"),
        &[x, grad_out],
        &[grad_in],
        &StackedParams {
            len: grad_out.len() as u32,
            x_len: x.len() as u32,
        },
        grid(grad_out.len()),
    )
}
