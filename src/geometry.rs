//! Sizes of one conv2d or pooling application: what the CPU reference and the GPU
//! kernels need to index NCHW tensors, independent of how a model is described.
//!
//! Every tensor is batch-major and row-major: an image batch is `[B, C, H, W]`.

use crate::error::{Error, Result};

/// One linear layer applied to a batch: input `[batch, in_features]`, weight
/// `[out_features, in_features]`, bias `[out_features]`, output `[batch, out_features]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearGeometry {
    pub batch: usize,
    pub in_features: usize,
    pub out_features: usize,
}

/// One conv2d application to a batch: PyTorch's `Conv2d` hyper-parameters plus the
/// batch size and the input's spatial size.
///
/// Shapes: input `[batch, in_channels, H, W]`, weight
/// `[out_channels, in_channels/groups, KH, KW]`, bias `[out_channels]`, output
/// `[batch, out_channels, OH, OW]` with `O = ⌊(I + 2p − d(K−1) − 1)/s⌋ + 1`.
/// Group `g` maps input channels `g·C/groups ..` to output channels
/// `g·Cout/groups ..` (group-major channels, as PyTorch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dGeometry {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    /// `[H, W]` of the input.
    pub in_size: [usize; 2],
    /// `[KH, KW]`.
    pub kernel_size: [usize; 2],
    pub stride: [usize; 2],
    /// Zero padding on both sides, `[top/bottom, left/right]`.
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
}

/// `⌊(I + 2p − d(K−1) − 1)/s⌋ + 1`, or `None` when the window does not fit.
fn window_count(
    input: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    dil: usize,
) -> Option<usize> {
    let span = dil.checked_mul(kernel.checked_sub(1)?)?.checked_add(1)?;
    let padded = input + 2 * pad;
    if stride == 0 || padded < span {
        return None;
    }
    Some((padded - span) / stride + 1)
}

impl Conv2dGeometry {
    /// Checks that channels divide into groups and that every size is positive;
    /// errors name `layer`.
    pub fn validate(&self, layer: &str) -> Result<()> {
        let positive = [
            ("batch", self.batch),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("groups", self.groups),
            ("kernel height", self.kernel_size[0]),
            ("kernel width", self.kernel_size[1]),
            ("stride height", self.stride[0]),
            ("stride width", self.stride[1]),
            ("dilation height", self.dilation[0]),
            ("dilation width", self.dilation[1]),
            ("input height", self.in_size[0]),
            ("input width", self.in_size[1]),
        ];
        if let Some((what, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(Error::model(
                layer,
                format!("{what} must be positive, got 0"),
            ));
        }
        for (what, channels) in [("in", self.in_channels), ("out", self.out_channels)] {
            if channels % self.groups != 0 {
                return Err(Error::model(
                    layer,
                    format!(
                        "{what}_channels = {channels} is not divisible by groups = {}",
                        self.groups
                    ),
                ));
            }
        }
        for axis in 0..2 {
            if window_count(
                self.in_size[axis],
                self.kernel_size[axis],
                self.stride[axis],
                self.padding[axis],
                self.dilation[axis],
            )
            .is_none()
            {
                return Err(Error::model(
                    layer,
                    format!(
                        "output size ≤ 0: input {:?} with padding {:?}, kernel {:?} and \
                         dilation {:?}",
                        self.in_size, self.padding, self.kernel_size, self.dilation
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `[OH, OW]`; zero along an axis where the (dilated) kernel does not fit.
    pub fn out_size(&self) -> [usize; 2] {
        std::array::from_fn(|a| {
            window_count(
                self.in_size[a],
                self.kernel_size[a],
                self.stride[a],
                self.padding[a],
                self.dilation[a],
            )
            .unwrap_or(0)
        })
    }

    /// Output positions per example, `S = OH·OW`.
    pub fn positions(&self) -> usize {
        let [oh, ow] = self.out_size();
        oh * ow
    }

    /// Input channels per group, `C/groups`.
    pub fn group_in_channels(&self) -> usize {
        self.in_channels / self.groups
    }

    /// Output channels per group, `Cout/groups`.
    pub fn group_out_channels(&self) -> usize {
        self.out_channels / self.groups
    }

    /// Length of one patch, `(C/groups)·KH·KW` (the row length of a weight).
    pub fn patch_len(&self) -> usize {
        self.group_in_channels() * self.kernel_size[0] * self.kernel_size[1]
    }

    /// Elements of the input, `B·C·H·W`.
    pub fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.in_size[0] * self.in_size[1]
    }

    /// Elements of the output, `B·Cout·OH·OW`.
    pub fn output_len(&self) -> usize {
        self.batch * self.out_channels * self.positions()
    }

    /// Elements of the weight, `Cout·(C/groups)·KH·KW`.
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.patch_len()
    }
}

/// One max- or average-pooling application to a batch (`ceil_mode = false`,
/// dilation 1). Input `[batch, channels, H, W]`, output `[batch, channels, OH, OW]`
/// with `O = ⌊(I + 2p − K)/s⌋ + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2dGeometry {
    pub batch: usize,
    pub channels: usize,
    /// `[H, W]` of the input.
    pub in_size: [usize; 2],
    /// `[KH, KW]`.
    pub kernel_size: [usize; 2],
    pub stride: [usize; 2],
    /// Padding on both sides: −∞ for max pooling, zeros (counted in the divisor) for
    /// average pooling.
    pub padding: [usize; 2],
}

impl Pool2dGeometry {
    /// Checks positive sizes, an output size ≥ 1, and PyTorch's rule that padding is
    /// at most half the kernel; errors name `layer`.
    pub fn validate(&self, layer: &str) -> Result<()> {
        for axis in 0..2 {
            let [k, s, p, i] = [
                self.kernel_size[axis],
                self.stride[axis],
                self.padding[axis],
                self.in_size[axis],
            ];
            if k == 0 || s == 0 || i == 0 {
                return Err(Error::model(
                    layer,
                    format!(
                        "kernel {:?}, stride {:?} and input size {:?} must be positive",
                        self.kernel_size, self.stride, self.in_size
                    ),
                ));
            }
            if 2 * p > k {
                return Err(Error::model(
                    layer,
                    format!(
                        "padding {:?} must be at most half the kernel {:?}",
                        self.padding, self.kernel_size
                    ),
                ));
            }
            if window_count(i, k, s, p, 1).is_none() {
                return Err(Error::model(
                    layer,
                    format!(
                        "output size ≤ 0: input {:?} with padding {:?} and kernel {:?}",
                        self.in_size, self.padding, self.kernel_size
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `[OH, OW]`; zero along an axis where the kernel does not fit.
    pub fn out_size(&self) -> [usize; 2] {
        std::array::from_fn(|a| {
            window_count(
                self.in_size[a],
                self.kernel_size[a],
                self.stride[a],
                self.padding[a],
                1,
            )
            .unwrap_or(0)
        })
    }

    /// Elements of the input, `B·C·H·W`.
    pub fn input_len(&self) -> usize {
        self.batch * self.channels * self.in_size[0] * self.in_size[1]
    }

    /// Elements of the output, `B·C·OH·OW`.
    pub fn output_len(&self) -> usize {
        let [oh, ow] = self.out_size();
        self.batch * self.channels * oh * ow
    }
}
