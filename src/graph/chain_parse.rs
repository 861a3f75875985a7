//! The parser of the chain format (`{"input_shape", "layers"}`): one layer object at a
//! time, unknown keys and unsupported PyTorch options rejected by name.

use serde_json::{Map, Value, json};

use super::chain::{Conv2dSpec, Layer, LinearSpec, PoolSpec};
use crate::error::{Error, Result};

/// A short rendering of a JSON value for error messages.
pub(super) fn brief(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

/// One layer object of the JSON, with error helpers that name it.
struct LayerJson<'a> {
    file: &'a str,
    index: usize,
    kind: &'a str,
    obj: &'a Map<String, Value>,
}

impl LayerJson<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::input(
            self.file,
            format!("layers[{}] ({}): {msg}", self.index, self.kind),
        )
    }

    /// Rejects keys outside `allowed` (besides `type` and `name`).
    fn check_keys(&self, allowed: &[&str]) -> Result<()> {
        for key in self.obj.keys() {
            if key != "type" && key != "name" && !allowed.contains(&key.as_str()) {
                let mut all = vec!["type", "name"];
                all.extend_from_slice(allowed);
                return Err(self.err(format!(
                    "unknown key \"{key}\" (allowed keys: {})",
                    all.join(", ")
                )));
            }
        }
        Ok(())
    }

    fn name(&self) -> Result<String> {
        match self.obj.get("name") {
            None => Ok(self.index.to_string()),
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(v) => Err(self.err(format!(
                "\"name\": expected a non-empty string, found {}",
                brief(v)
            ))),
        }
    }

    fn integer(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64().map(|u| u as usize).ok_or_else(|| {
            self.err(format!(
                "\"{key}\": expected a non-negative integer, found {}",
                brief(v)
            ))
        })
    }

    fn required(&self, key: &str) -> Result<usize> {
        match self.obj.get(key) {
            Some(v) => self.integer(key, v),
            None => Err(self.err(format!("missing key \"{key}\""))),
        }
    }

    fn integer_or(&self, key: &str, default: usize) -> Result<usize> {
        self.obj
            .get(key)
            .map_or(Ok(default), |v| self.integer(key, v))
    }

    fn pair_value(&self, key: &str, v: &Value) -> Result<[usize; 2]> {
        match v {
            Value::Array(items) if items.len() == 2 => {
                Ok([self.integer(key, &items[0])?, self.integer(key, &items[1])?])
            }
            Value::Number(_) => Ok([self.integer(key, v)?; 2]),
            _ => Err(self.err(format!(
                "\"{key}\": expected an integer or a list of 2 integers, found {}",
                brief(v)
            ))),
        }
    }

    fn pair(&self, key: &str) -> Result<Option<[usize; 2]>> {
        self.obj
            .get(key)
            .map(|v| self.pair_value(key, v))
            .transpose()
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(format!(
                "\"{key}\": expected true or false, found {}",
                brief(v)
            ))),
        }
    }

    /// A PyTorch option this crate implements only at one value: absent or equal to
    /// `supported`, else an error saying so.
    fn only(&self, key: &str, supported: Value) -> Result<()> {
        match self.obj.get(key) {
            Some(v) if *v != supported => Err(self.err(format!(
                "{key} = {} is unsupported (only {key} = {supported} is implemented)",
                brief(v)
            ))),
            _ => Ok(()),
        }
    }

    /// Conv2d padding: a pair, or PyTorch's strings "valid" (0) and "same" (stride 1,
    /// symmetric padding only).
    fn conv_padding(&self, kernel: [usize; 2], dilation: [usize; 2]) -> Result<[usize; 2]> {
        match self.obj.get("padding") {
            None => Ok([0, 0]),
            Some(Value::String(s)) if s == "valid" => Ok([0, 0]),
            Some(Value::String(s)) if s == "same" => {
                let mut pad = [0; 2];
                for a in 0..2 {
                    let total = dilation[a] * kernel[a].saturating_sub(1);
                    if !total.is_multiple_of(2) {
                        return Err(self.err(format!(
                            "padding = \"same\" needs asymmetric padding for kernel_size {:?} \
                             and dilation {:?}, which is unsupported",
                            kernel, dilation
                        )));
                    }
                    pad[a] = total / 2;
                }
                Ok(pad)
            }
            Some(v) => self.pair_value("padding", v),
        }
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
    let l = LayerJson {
        file,
        index,
        kind,
        obj,
    };
    match kind {
        "linear" => {
            l.check_keys(&["in_features", "out_features", "bias"])?;
            Ok(Layer::Linear(LinearSpec {
                name: l.name()?,
                in_features: l.required("in_features")?,
                out_features: l.required("out_features")?,
                bias: l.bool_or("bias", true)?,
            }))
        }
        "conv2d" => {
            l.check_keys(&[
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
            let kernel_size = l
                .pair("kernel_size")?
                .ok_or_else(|| l.err("missing key \"kernel_size\""))?;
            let dilation = l.pair("dilation")?.unwrap_or([1, 1]);
            Ok(Layer::Conv2d(Conv2dSpec {
                name: l.name()?,
                in_channels: l.required("in_channels")?,
                out_channels: l.required("out_channels")?,
                kernel_size,
                stride: l.pair("stride")?.unwrap_or([1, 1]),
                padding: l.conv_padding(kernel_size, dilation)?,
                dilation,
                groups: l.integer_or("groups", 1)?,
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
            l.check_keys(&allowed)?;
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
            let kernel_size = l
                .pair("kernel_size")?
                .ok_or_else(|| l.err("missing key \"kernel_size\""))?;
            // PyTorch's `stride=None` means stride = kernel_size.
            let stride = match l.obj.get("stride") {
                None | Some(Value::Null) => kernel_size,
                Some(v) => l.pair_value("stride", v)?,
            };
            l.name()?;
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
            l.check_keys(&["start_dim", "end_dim"])?;
            l.only("start_dim", json!(1))?;
            l.only("end_dim", json!(-1))?;
            l.name()?;
            Ok(Layer::Flatten)
        }
        "relu" | "sigmoid" | "tanh" => {
            l.check_keys(if kind == "relu" { &["inplace"] } else { &[] })?;
            l.bool_or("inplace", false)?;
            l.name()?;
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
