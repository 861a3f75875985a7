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

use serde_json::{Value, json};

use super::chain_parse::parse_layer;
use super::{Graph, GraphInput, Node};
use crate::error::{Error, Result};
use crate::geometry::{Conv2dGeometry, LinearGeometry, Pool2dGeometry};
use crate::layers::attrs::brief;

/// The name of the graph input of a chain.
const INPUT: &str = "x";

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

    pub(super) fn to_json_value(&self) -> Value {
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

impl ModelSpec {
    /// Reads and parses a model JSON file (see the module docs for the format), bounded
    /// as [`crate::graph::json::load`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = crate::io::read_json_text(path, "a model description")?;
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
        self.to_graph().map(|_| ())
    }

    /// The per-example shape entering each layer, then the network's output shape
    /// (`layers.len() + 1` entries), after checking that every layer fits its input:
    /// channel and feature counts, groups, positive output sizes, pooling padding, a 2-D
    /// input to linear layers, unique parameter names, and a `[B, C]` network output.
    pub fn shapes(&self) -> Result<Vec<Vec<usize>>> {
        Ok(self.to_graph()?.shapes().to_vec())
    }

    /// The chain as a graph: node `i` is layer `i` reading the previous layer's output
    /// (the first reads the input `x`); parameter-free layers are named by their index.
    pub fn to_graph(&self) -> Result<Graph> {
        let named: HashSet<&str> = self.layers.iter().filter_map(Layer::name).collect();
        let mut nodes = Vec::with_capacity(self.layers.len());
        let mut previous = INPUT.to_string();
        for (i, layer) in self.layers.iter().enumerate() {
            let name = match layer.name() {
                Some(name) => name.to_string(),
                None if named.contains(i.to_string().as_str()) => format!("{i}.{}", layer.kind()),
                None => i.to_string(),
            };
            let Value::Object(mut attrs) = layer.to_json_value() else {
                unreachable!("a layer is a JSON object")
            };
            attrs.remove("type");
            attrs.remove("name");
            let mut node = Node::new(name, layer.kind(), vec![previous], attrs);
            node.set_label(self.label(i));
            previous = node.name.clone();
            nodes.push(node);
        }
        let input = GraphInput {
            name: INPUT.into(),
            shape: self.input_shape.clone(),
            dtype: super::InputType::F32,
        };
        let mut graph = Graph::new(input, nodes, &previous, None)?;
        graph.chain = Some(self.clone());
        Ok(graph)
    }
}
