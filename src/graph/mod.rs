//! The model as a graph: named values, nodes that compute one value each from named
//! inputs, one output (wonnx-style). A `torch.nn.Sequential` chain
//! ([`chain::ModelSpec`]) is read as the graph whose nodes are its layers in order.
//!
//! Values are numbered: value 0 is the graph input, value `i + 1` the output of node
//! `i`. Nodes are kept in topological order. Shapes are per example (no batch axis),
//! so one graph serves any batch size.

pub mod chain;
mod chain_parse;
pub mod executor;
pub mod json;
pub mod model;

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::layers::{self, Layer, batched_shape};

pub use chain::ModelSpec;
pub use executor::{Backward, Forward, Network};
pub use model::{LayerParams, Model};

/// One node: an op applied to named values.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The node's name, also the name of the value it computes.
    pub name: String,
    /// The layer type ([`layers::REGISTRY`]).
    pub op: String,
    /// Names of the values it reads: the graph input or other nodes.
    pub inputs: Vec<String>,
    /// The op's attributes, PyTorch's names.
    pub attrs: Map<String, Value>,
    /// The PyTorch module path of its parameters, when it differs from `name`.
    pub module: Option<String>,
    /// How errors name the node.
    label: String,
}

impl Node {
    /// A node of a graph file: errors call it `node "name" (op)`.
    pub fn new(
        name: impl Into<String>,
        op: impl Into<String>,
        inputs: Vec<String>,
        attrs: Map<String, Value>,
    ) -> Self {
        let (name, op) = (name.into(), op.into());
        Self {
            label: format!("node \"{name}\" ({op})"),
            name,
            op,
            inputs,
            attrs,
            module: None,
        }
    }

    /// Sets how errors name the node.
    pub(crate) fn set_label(&mut self, label: String) {
        self.label = label;
    }

    /// How errors name the node.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The prefix of its parameters in the weights file: `module`, else `name`.
    pub fn module(&self) -> &str {
        self.module.as_deref().unwrap_or(&self.name)
    }
}

/// The element type of the graph input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InputType {
    /// Float inputs (`"f32"`).
    #[default]
    F32,
    /// Token ids (`"i64"`): the data file's `x` is I64 or I32, uploaded as u32 words;
    /// only `embedding` nodes may read them.
    I64,
}

impl InputType {
    /// The name in `model.json`.
    pub fn name(self) -> &'static str {
        match self {
            InputType::F32 => "f32",
            InputType::I64 => "i64",
        }
    }
}

/// The graph input: one example's shape and element type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphInput {
    pub name: String,
    /// Per-example shape, e.g. `[3, 32, 32]`.
    pub shape: Vec<usize>,
    pub dtype: InputType,
}

/// A validated graph: nodes in topological order with their layers and shapes.
#[derive(Clone, Debug)]
pub struct Graph {
    pub input: GraphInput,
    /// In topological order.
    pub nodes: Vec<Node>,
    /// The node whose value the loss is applied to, `[C]` per example.
    pub output: usize,
    /// Every parameter name in `model.named_parameters()` order, when the file gives it.
    pub parameters: Option<Vec<String>>,
    /// The chain this graph was read from, if any (its JSON is the model's description).
    pub chain: Option<ModelSpec>,
    layers: Vec<Arc<dyn Layer>>,
    /// Per node, the values it reads.
    node_inputs: Vec<Vec<usize>>,
    /// Per value, its per-example shape.
    shapes: Vec<Vec<usize>>,
}

impl PartialEq for Graph {
    fn eq(&self, other: &Self) -> bool {
        self.input == other.input
            && self.nodes == other.nodes
            && self.output == other.output
            && self.parameters == other.parameters
            && self.chain == other.chain
    }
}

impl Graph {
    /// Sorts `nodes` topologically, builds every layer from its input shapes and checks
    /// that `output` names a node with a 1-D per-example value. Errors name the node.
    /// Linear in the number of nodes and edges.
    pub fn new(
        input: GraphInput,
        nodes: Vec<Node>,
        output: &str,
        parameters: Option<Vec<String>>,
    ) -> Result<Self> {
        if input.shape.is_empty() || input.shape.contains(&0) {
            return Err(Error::model(
                "input",
                format!(
                    "input_shape must be non-empty with positive entries, found {:?}",
                    input.shape
                ),
            ));
        }
        if nodes.is_empty() {
            return Err(Error::model("input", "the model has no layers"));
        }
        let nodes = topological_order(&input, nodes)?;
        let index: HashMap<&str, usize> = std::iter::once((input.name.as_str(), 0))
            .chain(
                nodes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n.name.as_str(), i + 1)),
            )
            .collect();
        let mut shapes = vec![input.shape.clone()];
        let mut layers: Vec<Arc<dyn Layer>> = Vec::with_capacity(nodes.len());
        let mut node_inputs = Vec::with_capacity(nodes.len());
        for node in &nodes {
            let reads: Vec<usize> = node.inputs.iter().map(|n| index[n.as_str()]).collect();
            check_token_reads(&input, node, &reads)?;
            let in_shapes: Vec<&[usize]> = reads.iter().map(|&v| shapes[v].as_slice()).collect();
            let layer = layers::build(node, &in_shapes)?;
            shapes.push(layer.output_shape().to_vec());
            layers.push(Arc::from(layer));
            node_inputs.push(reads);
        }
        let out = match index.get(output) {
            Some(&v) if v > 0 => v - 1,
            _ => {
                return Err(Error::model(
                    "output",
                    format!("\"{output}\" is not the name of a node"),
                ));
            }
        };
        if shapes[out + 1].len() != 1 {
            return Err(Error::model(
                nodes[out].label(),
                format!(
                    "the network output must be 2-D [B, C] (KFAC and EKFAC take one vector of \
                     C outputs per example, as curvlinops 3.0.1's EKFAC; per-token outputs are \
                     not supported), but this node gives {}; pool it (mean) or add a flatten",
                    batched_shape(&shapes[out + 1])
                ),
            ));
        }
        // Tied weights: one weights-file key read by two nodes (a module called twice,
        // or one learned tensor added twice).
        let mut keys: HashMap<String, usize> = HashMap::new();
        for (i, node) in nodes.iter().enumerate() {
            for spec in layers[i].params() {
                let key = layers[i].param_key(node.module(), spec.suffix);
                if let Some(&first) = keys.get(&key) {
                    let what = if nodes[first].module() == node.module() {
                        format!("module \"{}\"", node.module())
                    } else {
                        format!("parameter \"{key}\"")
                    };
                    return Err(Error::model(
                        node.label(),
                        format!(
                            "{what} is also used by {}: a layer called twice (tied weights) is \
                             not supported, as curvlinops would mix the two uses",
                            nodes[first].label()
                        ),
                    ));
                }
                keys.insert(key, i);
            }
        }
        Ok(Self {
            input,
            nodes,
            output: out,
            parameters,
            chain: None,
            layers,
            node_inputs,
            shapes,
        })
    }

    /// How errors name node `i`.
    pub fn label(&self, i: usize) -> String {
        self.nodes
            .get(i)
            .map_or_else(|| format!("node {i}"), |n| n.label().to_string())
    }

    /// The layer of node `i`.
    pub fn layer(&self, i: usize) -> &dyn Layer {
        self.layers[i].as_ref()
    }

    /// The values node `i` reads (0 is the graph input, `j + 1` node `j`'s output).
    pub fn node_inputs(&self, i: usize) -> &[usize] {
        &self.node_inputs[i]
    }

    /// Per-example shape of every value: the input, then each node's output.
    pub fn shapes(&self) -> &[Vec<usize>] {
        &self.shapes
    }

    /// `C`, outputs per example.
    pub fn num_outputs(&self) -> usize {
        self.shapes[self.output + 1].iter().product()
    }

    /// For token inputs, the smallest table that reads them: the embedding node and its
    /// `num_embeddings` (every id must lie in `[0, num_embeddings)`).
    pub fn token_limit(&self) -> Option<(&Node, u64)> {
        self.nodes
            .iter()
            .filter(|n| n.op == "embedding")
            .filter_map(|n| Some((n, n.attrs.get("num_embeddings")?.as_u64()?)))
            .min_by_key(|&(_, k)| k)
    }

    /// Indices of the nodes KFAC approximates (linear, conv2d), in order.
    pub fn curvature_layers(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.layers[i].curvature().is_some())
            .collect()
    }

    /// The description as JSON: the chain's own format for a chain, else format 2.
    pub fn to_json(&self) -> String {
        match &self.chain {
            Some(chain) => chain.to_json(),
            None => json::to_json(self),
        }
    }
}

/// Token ids (an `i64` graph input) are read by `embedding` nodes only, and an
/// `embedding` reads nothing else: any other op would take the ids' u32 words for
/// floats.
fn check_token_reads(input: &GraphInput, node: &Node, reads: &[usize]) -> Result<()> {
    let embedding = node.op == "embedding";
    let tokens = input.dtype == InputType::I64;
    if tokens && !embedding && reads.contains(&0) {
        return Err(Error::model(
            node.label(),
            format!(
                "reads the token ids \"{}\" (dtype i64); only an embedding may read token ids",
                input.name
            ),
        ));
    }
    if embedding && (!tokens || reads.iter().any(|&v| v != 0)) {
        return Err(Error::model(
            node.label(),
            format!(
                "an embedding reads the graph input's token ids: its input must be \"{}\" \
                 with dtype \"i64\" (found {} of dtype \"{}\")",
                input.name,
                node.inputs.join(", "),
                if reads.iter().all(|&v| v == 0) {
                    input.dtype.name()
                } else {
                    "f32"
                }
            ),
        ));
    }
    Ok(())
}

/// Kahn's algorithm, keeping the given order among ready nodes. Errors on duplicate
/// names, unknown inputs and cycles, naming a node.
fn topological_order(input: &GraphInput, nodes: Vec<Node>) -> Result<Vec<Node>> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        if node.name.is_empty() {
            return Err(Error::model(node.label(), "name must not be empty"));
        }
        if node.name == input.name || index.insert(&node.name, i).is_some() {
            return Err(Error::model(
                node.label(),
                format!("name \"{}\" is used by an earlier layer too", node.name),
            ));
        }
    }
    let mut pending = vec![0usize; nodes.len()];
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, node) in nodes.iter().enumerate() {
        for name in &node.inputs {
            if *name == input.name {
                continue;
            }
            let Some(&j) = index.get(name.as_str()) else {
                return Err(Error::model(
                    node.label(),
                    format!(
                        "input \"{name}\" is neither the graph input \"{}\" nor a node",
                        input.name
                    ),
                ));
            };
            pending[i] += 1;
            users[j].push(i);
        }
    }
    let mut ready: std::collections::VecDeque<usize> =
        (0..nodes.len()).filter(|&i| pending[i] == 0).collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for &u in &users[i] {
            pending[u] -= 1;
            if pending[u] == 0 {
                ready.push_back(u);
            }
        }
    }
    if order.len() < nodes.len() {
        let stuck = (0..nodes.len())
            .find(|&i| pending[i] > 0)
            .expect("a node is left");
        return Err(Error::model(
            nodes[stuck].label(),
            "the graph has a cycle through this node",
        ));
    }
    let mut slots: Vec<Option<Node>> = nodes.into_iter().map(Some).collect();
    Ok(order
        .into_iter()
        .map(|i| slots[i].take().expect("each node once"))
        .collect())
}
