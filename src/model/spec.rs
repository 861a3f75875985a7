//! The model description: a `torch.nn.Sequential` as a JSON layer list, or built in Rust.
//!
//! JSON format (issue 2):
//! `{"input_shape": [3, 32, 32], "layers": [{"type": "conv2d", "name": "0", "in_channels": 3,
//! "out_channels": 16, "kernel_size": [3, 3], "stride": 1, "padding": 1}, {"type": "relu"},
//! {"type": "max_pool2d", "kernel_size": 2}, {"type": "flatten"},
//! {"type": "linear", "name": "4", "in_features": 4096, "out_features": 10}]}`.
//!
//! Pairs may be one integer or a 2-list; omitted fields take PyTorch's defaults; `name`
//! defaults to the layer's index. Unknown keys are errors, and PyTorch options this crate
//! does not implement (`ceil_mode: true`, `count_include_pad: false`, ...) are rejected by
//! name. Shapes are per example (no batch axis): `[C, H, W]` entering a conv2d or pool,
//! `[features]` entering a linear layer.

use std::collections::HashSet;
use std::path::Path;

use serde_json::{Map, Value, json};

use crate::error::{Error, Result};
use crate::geometry::{Conv2dGeometry, LinearGeometry, Pool2dGeometry};

/// A sequential network: the per-example input shape and the layers in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// Shape of one example, without the batch axis (`[C, H, W]` or `[features]`).
    pub input_shape: Vec<usize>,
    /// Layer `i` is module `i` of the `torch.nn.Sequential`.
    pub layers: Vec<Layer>,
}

/// One module of the sequential network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layer {
    /// `torch.nn.Linear`: `[B, in] → [B, out]`, weight `[out, in]`.
    Linear(LinearSpec),
    /// `torch.nn.Conv2d`: `[B, C_in, H, W] → [B, C_out, OH, OW]`, weight
    /// `[C_out, C_in/groups, KH, KW]`.
    Conv2d(Conv2dSpec),
    /// Elementwise `max(x, 0)`.
    Relu,
    /// Elementwise `1 / (1 + e^{-x})`.
    Sigmoid,
    /// Elementwise `tanh(x)`.
    Tanh,
    /// `[B, *shape] → [B, prod(shape)]` in row-major (PyTorch's `(c, h, w)`) order.
    Flatten,
    /// `torch.nn.MaxPool2d` with `ceil_mode = false`, `dilation = 1`; padding counts as −∞.
    MaxPool2d(PoolSpec),
    /// `torch.nn.AvgPool2d` with `ceil_mode = false`, `count_include_pad = true`.
    AvgPool2d(PoolSpec),
}

/// A linear layer `y = x Wᵀ + b`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearSpec {
    /// The `state_dict` prefix of the parameters: `"<name>.weight"`, `"<name>.bias"`.
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
}

/// A 2-D convolution; pairs are `[height, width]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conv2dSpec {
    /// The `state_dict` prefix of the parameters: `"<name>.weight"`, `"<name>.bias"`.
    pub name: String,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel_size: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
    pub bias: bool,
}

/// A 2-D pooling window; pairs are `[height, width]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    pub kernel_size: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
}

impl LinearSpec {
    /// A linear layer with bias.
    pub fn new(name: impl Into<String>, in_features: usize, out_features: usize) -> Self {
        Self {
            name: name.into(),
            in_features,
            out_features,
            bias: true,
        }
    }

    /// The sizes of this layer applied to `batch` rows.
    pub fn geometry(&self, batch: usize) -> LinearGeometry {
        LinearGeometry {
            batch,
            in_features: self.in_features,
            out_features: self.out_features,
        }
    }

    /// The weight's PyTorch shape `[out, in]`.
    pub fn weight_shape(&self) -> Vec<usize> {
        vec![self.out_features, self.in_features]
    }
}

impl Conv2dSpec {
    /// A conv2d layer with PyTorch's defaults: stride 1, padding 0, dilation 1, groups 1, bias.
    pub fn new(
        name: impl Into<String>,
        in_channels: usize,
        out_channels: usize,
        kernel_size: [usize; 2],
    ) -> Self {
        Self {
            name: name.into(),
            in_channels,
            out_channels,
            kernel_size,
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
            bias: true,
        }
    }

    /// The weight's PyTorch shape `[C_out, C_in/groups, KH, KW]`.
    pub fn weight_shape(&self) -> Vec<usize> {
        vec![
            self.out_channels,
            self.in_channels / self.groups.max(1),
            self.kernel_size[0],
            self.kernel_size[1],
        ]
    }

    /// The sizes of this layer applied to `batch` inputs of spatial size `in_size = [H, W]`.
    pub fn geometry(&self, batch: usize, in_size: [usize; 2]) -> Conv2dGeometry {
        Conv2dGeometry {
            batch,
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            in_size,
            kernel_size: self.kernel_size,
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
            groups: self.groups,
        }
    }

    /// Output `[OH, OW]` for an `[H, W]` input: `⌊(H + 2p − d(k−1) − 1)/s⌋ + 1` per axis,
    /// or `None` where that is ≤ 0 (or the spec has a zero kernel, stride or dilation).
    pub fn output_size(&self, input: [usize; 2]) -> Option<[usize; 2]> {
        let out = self.geometry(1, input).out_size();
        let degenerate = self.dilation.contains(&0) || out.contains(&0);
        (!degenerate).then_some(out)
    }
}

impl PoolSpec {
    /// A pooling window with PyTorch's defaults: stride = kernel, padding 0.
    pub fn new(kernel_size: [usize; 2]) -> Self {
        Self {
            kernel_size,
            stride: kernel_size,
            padding: [0, 0],
        }
    }

    /// The sizes of this pooling applied to `batch` inputs of shape `[channels, H, W]`.
    pub fn geometry(&self, batch: usize, channels: usize, in_size: [usize; 2]) -> Pool2dGeometry {
        Pool2dGeometry {
            batch,
            channels,
            in_size,
            kernel_size: self.kernel_size,
            stride: self.stride,
            padding: self.padding,
        }
    }

    /// Output `[OH, OW]` for an `[H, W]` input: `⌊(H + 2p − k)/s⌋ + 1` per axis
    /// (`ceil_mode = false`), or `None` where that is ≤ 0.
    pub fn output_size(&self, input: [usize; 2]) -> Option<[usize; 2]> {
        let out = self.geometry(1, 1, input).out_size();
        (!out.contains(&0)).then_some(out)
    }
}

impl Layer {
    /// The JSON `type` of the layer.
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Linear(_) => "linear",
            Layer::Conv2d(_) => "conv2d",
            Layer::Relu => "relu",
            Layer::Sigmoid => "sigmoid",
            Layer::Tanh => "tanh",
            Layer::Flatten => "flatten",
            Layer::MaxPool2d(_) => "max_pool2d",
            Layer::AvgPool2d(_) => "avg_pool2d",
        }
    }

    /// The parameter prefix of a linear or conv2d layer; `None` for parameter-free layers.
    pub fn name(&self) -> Option<&str> {
        match self {
            Layer::Linear(l) => Some(&l.name),
            Layer::Conv2d(c) => Some(&c.name),
            _ => None,
        }
    }

    /// Whether the layer has a bias parameter.
    pub fn has_bias(&self) -> bool {
        match self {
            Layer::Linear(l) => l.bias,
            Layer::Conv2d(c) => c.bias,
            _ => false,
        }
    }

    /// The weight's PyTorch shape for linear/conv2d layers.
    pub fn weight_shape(&self) -> Option<Vec<usize>> {
        match self {
            Layer::Linear(l) => Some(l.weight_shape()),
            Layer::Conv2d(c) => Some(c.weight_shape()),
            _ => None,
        }
    }

    /// The bias shape `[out]` for linear/conv2d layers that have one.
    pub fn bias_shape(&self) -> Option<Vec<usize>> {
        match self {
            Layer::Linear(l) if l.bias => Some(vec![l.out_features]),
            Layer::Conv2d(c) if c.bias => Some(vec![c.out_channels]),
            _ => None,
        }
    }

    fn to_json_value(&self) -> Value {
        match self {
            Layer::Linear(l) => json!({
                "type": "linear", "name": l.name, "in_features": l.in_features,
                "out_features": l.out_features, "bias": l.bias,
            }),
            Layer::Conv2d(c) => json!({
                "type": "conv2d", "name": c.name, "in_channels": c.in_channels,
                "out_channels": c.out_channels, "kernel_size": c.kernel_size,
                "stride": c.stride, "padding": c.padding, "dilation": c.dilation,
                "groups": c.groups, "bias": c.bias,
            }),
            Layer::MaxPool2d(p) | Layer::AvgPool2d(p) => json!({
                "type": self.kind(), "kernel_size": p.kernel_size, "stride": p.stride,
                "padding": p.padding,
            }),
            _ => json!({ "type": self.kind() }),
        }
    }
}

/// Formats a per-example shape with its batch axis, e.g. `[B, 16, 8, 8]`.
pub fn batched_shape(shape: &[usize]) -> String {
    let mut s = String::from("[B");
    for d in shape {
        s.push_str(&format!(", {d}"));
    }
    s.push(']');
    s
}

impl ModelSpec {
    /// Reads and parses a model JSON file (see the module docs for the format).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path.display())
    }

    /// Parses the JSON text of a model description; `file_label` names it in errors.
    /// Parsing checks the format; [`ModelSpec::shapes`] checks that the layers fit together.
    pub fn from_json_str(text: &str, file_label: impl std::fmt::Display) -> Result<Self> {
        let file = file_label.to_string();
        let root: Value = serde_json::from_str(text)
            .map_err(|e| Error::input(&file, format!("invalid JSON: {e}")))?;
        let Value::Object(root) = root else {
            return Err(Error::input(
                &file,
                format!(
                    "expected a JSON object with keys \"input_shape\" and \"layers\", found {}",
                    brief(&root)
                ),
            ));
        };
        if let Some(key) = root.keys().find(|k| *k != "input_shape" && *k != "layers") {
            return Err(Error::input(
                &file,
                format!("unknown key \"{key}\" (allowed: \"input_shape\", \"layers\")"),
            ));
        }
        let input_shape = match root.get("input_shape") {
            Some(Value::Array(dims)) if !dims.is_empty() => dims
                .iter()
                .map(|d| {
                    d.as_u64().map(|d| d as usize).ok_or_else(|| {
                        Error::input(
                            &file,
                            format!(
                                "\"input_shape\": expected non-negative integers, found {}",
                                brief(d)
                            ),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            Some(v) => {
                return Err(Error::input(
                    &file,
                    format!(
                        "\"input_shape\": expected a non-empty list of integers (the shape of one \
                         example without the batch axis, e.g. [3, 32, 32]), found {}",
                        brief(v)
                    ),
                ));
            }
            None => return Err(Error::input(&file, "missing key \"input_shape\"")),
        };
        let layers = match root.get("layers") {
            Some(Value::Array(layers)) => layers
                .iter()
                .enumerate()
                .map(|(index, v)| parse_layer(&file, index, v))
                .collect::<Result<Vec<_>>>()?,
            Some(v) => {
                return Err(Error::input(
                    &file,
                    format!("\"layers\": expected a list of layers, found {}", brief(v)),
                ));
            }
            None => return Err(Error::input(&file, "missing key \"layers\"")),
        };
        Ok(Self {
            input_shape,
            layers,
        })
    }

    /// The description as JSON in the explicit form (every field given, pairs as 2-lists).
    /// `from_json_str(to_json())` gives back the same spec.
    pub fn to_json(&self) -> String {
        let value = json!({
            "input_shape": self.input_shape,
            "layers": self.layers.iter().map(Layer::to_json_value).collect::<Vec<_>>(),
        });
        value.to_string()
    }

    /// How errors name layer `i`: `layers[i] "name" (type)` or `layers[i] (type)`.
    pub fn label(&self, i: usize) -> String {
        match self.layers.get(i) {
            Some(layer) => match layer.name() {
                Some(name) => format!("layers[{i}] \"{name}\" ({})", layer.kind()),
                None => format!("layers[{i}] ({})", layer.kind()),
            },
            None => format!("layers[{i}]"),
        }
    }

    /// Indices of the linear and conv2d layers (those with parameters), in order.
    pub fn curvature_layers(&self) -> Vec<usize> {
        (0..self.layers.len())
            .filter(|&i| self.layers[i].name().is_some())
            .collect()
    }

    /// Checks the whole network; the same as `shapes().map(|_| ())`.
    pub fn validate(&self) -> Result<()> {
        self.shapes().map(|_| ())
    }

    /// The per-example shape entering each layer, then the network's output shape
    /// (`layers.len() + 1` entries), after checking that every layer fits its input:
    /// channel and feature counts, groups, positive output sizes, pooling padding, a 2-D
    /// input to linear layers, unique parameter names, and a `[B, C]` network output.
    pub fn shapes(&self) -> Result<Vec<Vec<usize>>> {
        if self.input_shape.is_empty() || self.input_shape.contains(&0) {
            return Err(Error::model(
                "input",
                format!(
                    "input_shape must be non-empty with positive entries, found {:?}",
                    self.input_shape
                ),
            ));
        }
        if self.layers.is_empty() {
            return Err(Error::model("input", "the model has no layers"));
        }
        let mut names = HashSet::new();
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(name) = layer.name() {
                if name.is_empty() {
                    return Err(Error::model(self.label(i), "name must not be empty"));
                }
                if !names.insert(name) {
                    return Err(Error::model(
                        self.label(i),
                        format!("name \"{name}\" is used by an earlier layer too"),
                    ));
                }
            }
        }
        let mut shapes = vec![self.input_shape.clone()];
        for i in 0..self.layers.len() {
            let next = self.output_shape(i, &shapes[i])?;
            shapes.push(next);
        }
        let out = &shapes[self.layers.len()];
        if out.len() != 1 {
            return Err(Error::model(
                self.label(self.layers.len() - 1),
                format!(
                    "the network output must be 2-D [B, C], but the last layer gives {}; add a \
                     flatten at the end",
                    batched_shape(out)
                ),
            ));
        }
        Ok(shapes)
    }

    /// The per-example output shape of layer `i` for per-example input `input`.
    fn output_shape(&self, i: usize, input: &[usize]) -> Result<Vec<usize>> {
        let err = |msg: String| Error::model(self.label(i), msg);
        match &self.layers[i] {
            Layer::Linear(l) => {
                if l.in_features == 0 || l.out_features == 0 {
                    return Err(err(format!(
                        "in_features and out_features must be positive, found {} and {}",
                        l.in_features, l.out_features
                    )));
                }
                if input.len() != 1 {
                    return Err(err(format!(
                        "a linear layer takes a 2-D input [B, in_features], but its input is {}; \
                         add a flatten before it",
                        batched_shape(input)
                    )));
                }
                if input[0] != l.in_features {
                    return Err(err(format!(
                        "in_features is {} but the input has {} features (input {})",
                        l.in_features,
                        input[0],
                        batched_shape(input)
                    )));
                }
                Ok(vec![l.out_features])
            }
            Layer::Conv2d(c) => {
                let (h, w) = spatial_input(input).ok_or_else(|| {
                    err(format!(
                        "conv2d takes a 4-D input [B, C, H, W], but its input is {}",
                        batched_shape(input)
                    ))
                })?;
                check_conv(c).map_err(err)?;
                if input[0] != c.in_channels {
                    return Err(err(format!(
                        "in_channels is {} but the input has {} channels (input {})",
                        c.in_channels,
                        input[0],
                        batched_shape(input)
                    )));
                }
                let [oh, ow] = c.output_size([h, w]).ok_or_else(|| {
                    err(format!(
                        "output size would be ≤ 0: input [H, W] = [{h}, {w}], kernel_size {:?}, \
                         stride {:?}, padding {:?}, dilation {:?} (the dilated kernel must fit \
                         the padded input)",
                        c.kernel_size, c.stride, c.padding, c.dilation
                    ))
                })?;
                Ok(vec![c.out_channels, oh, ow])
            }
            Layer::MaxPool2d(p) | Layer::AvgPool2d(p) => {
                let (h, w) = spatial_input(input).ok_or_else(|| {
                    err(format!(
                        "pooling takes a 4-D input [B, C, H, W], but its input is {}",
                        batched_shape(input)
                    ))
                })?;
                if p.kernel_size.contains(&0) || p.stride.contains(&0) {
                    return Err(err(format!(
                        "kernel_size and stride must be positive, found {:?} and {:?}",
                        p.kernel_size, p.stride
                    )));
                }
                if (0..2).any(|a| 2 * p.padding[a] > p.kernel_size[a]) {
                    return Err(err(format!(
                        "padding must be at most half the kernel size (as PyTorch requires), \
                         found padding {:?} for kernel_size {:?}",
                        p.padding, p.kernel_size
                    )));
                }
                let [oh, ow] = p.output_size([h, w]).ok_or_else(|| {
                    err(format!(
                        "output size would be ≤ 0: input [H, W] = [{h}, {w}], kernel_size {:?}, \
                         stride {:?}, padding {:?}",
                        p.kernel_size, p.stride, p.padding
                    ))
                })?;
                Ok(vec![input[0], oh, ow])
            }
            Layer::Flatten => Ok(vec![input.iter().product()]),
            Layer::Relu | Layer::Sigmoid | Layer::Tanh => Ok(input.to_vec()),
        }
    }
}

/// `(H, W)` of a per-example `[C, H, W]` shape.
fn spatial_input(input: &[usize]) -> Option<(usize, usize)> {
    match input {
        [_, h, w] => Some((*h, *w)),
        _ => None,
    }
}

/// The conv2d checks that do not depend on the input.
fn check_conv(c: &Conv2dSpec) -> std::result::Result<(), String> {
    if c.in_channels == 0 || c.out_channels == 0 || c.groups == 0 {
        return Err(format!(
            "in_channels, out_channels and groups must be positive, found {}, {} and {}",
            c.in_channels, c.out_channels, c.groups
        ));
    }
    if c.kernel_size.contains(&0) || c.stride.contains(&0) || c.dilation.contains(&0) {
        return Err(format!(
            "kernel_size, stride and dilation must be positive, found {:?}, {:?} and {:?}",
            c.kernel_size, c.stride, c.dilation
        ));
    }
    if !c.in_channels.is_multiple_of(c.groups) {
        return Err(format!(
            "in_channels ({}) is not divisible by groups ({})",
            c.in_channels, c.groups
        ));
    }
    if !c.out_channels.is_multiple_of(c.groups) {
        return Err(format!(
            "out_channels ({}) is not divisible by groups ({})",
            c.out_channels, c.groups
        ));
    }
    Ok(())
}

/// A short rendering of a JSON value for error messages.
fn brief(v: &Value) -> String {
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

fn parse_layer(file: &str, index: usize, v: &Value) -> Result<Layer> {
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
