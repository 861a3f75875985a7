//! The parser of the chain format (`{"input_shape", "layers"}`): one layer object at a
//! time, unknown keys and unsupported PyTorch options rejected by name.

use serde_json::{Value, json};

use super::chain::{Conv2dSpec, Layer, LinearSpec, PoolSpec};
use crate::error::{Error, Result};
use crate::layers::attrs::{Attrs, brief};

/// The name of a chain-format layer: its `"name"`, or its index as
/// `torch.nn.Sequential` names it.
fn name(l: &Attrs, index: usize) -> Result<String> {
    match l.get("name") {
        None => Ok(index.to_string()),
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(v) => Err(l.err(format!(
            "\"name\": expected a non-empty string, found {}",
            brief(v)
        ))),
    }
}

pub(super) fn parse_layer(file: &str, index: usize, v: &Value) -> Result<Layer> {
    let Value::Object(obj) = v else {
        return Err(Error::input(
            file,
            format!(
                "layers[{index}]: expected an object with a \"type\", found {}",
                brief(v)
            ),
        ));
    };
    let kind = match obj.get("type") {
        Some(Value::String(s)) => s.as_str(),
        Some(v) => {
            return Err(Error::input(
                file,
                format!(
                    "layers[{index}]: \"type\" must be a string, found {}",
                    brief(v)
                ),
            ));
        }
        None => {
            return Err(Error::input(
                file,
                format!("layers[{index}]: missing key \"type\""),
            ));
        }
    };
    let layer = |allowed: &[&str]| Attrs::chain_layer(file, index, kind, obj, allowed);
    match kind {
        "linear" => {
            let l = layer(&["in_features", "out_features", "bias"])?;
            Ok(Layer::Linear(LinearSpec {
                name: name(&l, index)?,
                in_features: l.usize("in_features")?,
                out_features: l.usize("out_features")?,
                bias: l.bool_or("bias", true)?,
            }))
        }
        "conv2d" => {
            let l = layer(&[
                "in_channels",
                "out_channels",
                "kernel_size",
                "stride",
                "padding",
                "dilation",
                "groups",
                "bias",
                "padding_mode",
            ])?;
            l.only("padding_mode", json!("zeros"))?;
            let kernel_size = l.required_pair("kernel_size")?;
            let stride = l.pair("stride")?.unwrap_or([1, 1]);
            let dilation = l.pair("dilation")?.unwrap_or([1, 1]);
            Ok(Layer::Conv2d(Conv2dSpec {
                name: name(&l, index)?,
                in_channels: l.usize("in_channels")?,
                out_channels: l.usize("out_channels")?,
                kernel_size,
                stride,
                padding: l.conv_padding(kernel_size, stride, dilation)?,
                dilation,
                groups: l.usize_or("groups", 1)?,
                bias: l.bool_or("bias", true)?,
            }))
        }
        "max_pool2d" | "avg_pool2d" => {
            let max = kind == "max_pool2d";
            let options: &[&str] = if max {
                &["dilation", "ceil_mode", "return_indices"]
            } else {
                &["ceil_mode", "count_include_pad", "divisor_override"]
            };
            let mut allowed = vec!["kernel_size", "stride", "padding"];
            allowed.extend_from_slice(options);
            let l = layer(&allowed)?;
            l.only("ceil_mode", json!(false))?;
            if max {
                if l.pair("dilation")?.is_some_and(|d| d != [1, 1]) {
                    return Err(l.err("dilation other than 1 is unsupported for max_pool2d"));
                }
                l.only("return_indices", json!(false))?;
            } else {
                l.only("count_include_pad", json!(true))?;
                l.only("divisor_override", Value::Null)?;
            }
            let kernel_size = l.required_pair("kernel_size")?;
            // PyTorch's `stride=None` means stride = kernel_size.
            let stride = l.pair("stride")?.unwrap_or(kernel_size);
            name(&l, index)?;
            let pool = PoolSpec {
                kernel_size,
                stride,
                padding: l.pair("padding")?.unwrap_or([0, 0]),
            };
            Ok(if max {
                Layer::MaxPool2d(pool)
            } else {
                Layer::AvgPool2d(pool)
            })
        }
        "flatten" => {
            let l = layer(&["start_dim", "end_dim"])?;
            l.only("start_dim", json!(1))?;
            l.only("end_dim", json!(-1))?;
            name(&l, index)?;
            Ok(Layer::Flatten)
        }
        "relu" | "sigmoid" | "tanh" => {
            let l = layer(if kind == "relu" { &["inplace"] } else { &[] })?;
            l.bool_or("inplace", false)?;
            name(&l, index)?;
            Ok(match kind {
                "relu" => Layer::Relu,
                "sigmoid" => Layer::Sigmoid,
                _ => Layer::Tanh,
            })
        }
        other => Err(Error::input(
            file,
            format!(
                "layers[{index}]: unknown layer type \"{other}\" (supported: linear, conv2d, \
                 relu, sigmoid, tanh, flatten, max_pool2d, avg_pool2d)"
            ),
        )),
    }
}
