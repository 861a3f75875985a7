//! The network's parameters: PyTorch `state_dict` names and layouts, f32, row-major,
//! attached to a [`Graph`].

use std::collections::HashMap;
use std::path::Path;

use super::Graph;
use crate::error::{Error, Result};
use crate::model::tensor_file::TensorFile;

/// The parameter (and buffer) tensors of one node, in the order its layer declares
/// them ([`crate::layers::Layer::params`]), each with its suffix (`"weight"`, `"bias"`).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerParams {
    pub tensors: Vec<(&'static str, Vec<f32>)>,
}

impl LayerParams {
    /// The tensor with `suffix`, row-major.
    pub fn get(&self, suffix: &str) -> Option<&[f32]> {
        self.tensors
            .iter()
            .find(|(s, _)| *s == suffix)
            .map(|(_, v)| v.as_slice())
    }

    /// The tensor with `suffix`, mutable.
    pub fn get_mut(&mut self, suffix: &str) -> Option<&mut Vec<f32>> {
        self.tensors
            .iter_mut()
            .find(|(s, _)| *s == suffix)
            .map(|(_, v)| v)
    }

    /// The weight (linear `[out, in]`, conv2d `[C_out, C_in/groups, KH, KW]`); empty
    /// where the layer has none.
    pub fn weight(&self) -> &[f32] {
        self.get("weight").unwrap_or(&[])
    }

    /// The bias `[out]`, where the layer has one.
    pub fn bias(&self) -> Option<&[f32]> {
        self.get("bias")
    }
}

/// A validated network: the graph plus the parameters of every node that has some.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub graph: Graph,
    /// Indexed by node; `None` for parameter-free nodes.
    pub params: Vec<Option<LayerParams>>,
}

impl Model {
    /// Loads a model description (JSON, a chain or a graph) and its weights
    /// (safetensors with keys `"<module>.<suffix>"`; F32, or F16/BF16/F64 converted).
    pub fn load(model_json: impl AsRef<Path>, weights: impl AsRef<Path>) -> Result<Self> {
        let graph = super::json::load(model_json)?;
        // The description is checked before the weights file is read, so its errors
        // come first.
        let file = TensorFile::load(weights)?;
        Self::from_tensor_file(graph, &file)
    }

    /// Builds a model from a graph and the weights of a safetensors file.
    pub fn from_tensor_file(graph: Graph, file: &TensorFile) -> Result<Self> {
        let ignored = ignored_keys(&graph);
        let keys: Vec<String> = file
            .keys()
            .into_iter()
            .filter(|k| !ignored.contains(k))
            .collect();
        check_extra_keys(&graph, keys.iter().cloned(), file.label())?;
        let mut tensors = HashMap::new();
        for key in keys {
            let t = file.get(&key).expect("key listed by the file");
            let shape = t.shape.to_vec();
            tensors.insert(key.clone(), (shape, t.to_f32()?));
        }
        Self::build(graph, tensors, file.label())
    }

    /// Builds a model from Rust: `tensors` maps `"<module>.<suffix>"` to
    /// `(shape, row-major values)` in PyTorch layout. Checks every key and shape.
    pub fn new(
        graph: impl Into<Describe>,
        tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    ) -> Result<Self> {
        let graph = graph.into().0?;
        Self::build(graph, tensors, "weights")
    }

    fn build(
        graph: Graph,
        mut tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
        file: &str,
    ) -> Result<Self> {
        let ignored = ignored_keys(&graph);
        tensors.retain(|k, _| !ignored.contains(k));
        check_extra_keys(&graph, tensors.keys().cloned(), file)?;
        let mut params = Vec::with_capacity(graph.nodes.len());
        for (i, node) in graph.nodes.iter().enumerate() {
            let specs = graph.layer(i).params();
            if specs.is_empty() {
                params.push(None);
                continue;
            }
            let mut layer = Vec::with_capacity(specs.len());
            for spec in specs {
                let (suffix, expected) = (spec.suffix, spec.shape);
                let key = graph.layer(i).param_key(node.module(), suffix);
                let (shape, values) = tensors.remove(&key).ok_or_else(|| {
                    Error::input(
                        file,
                        format!(
                            "missing key \"{key}\" ({suffix} of {}, expected shape {expected:?})",
                            graph.label(i)
                        ),
                    )
                })?;
                if shape != expected {
                    return Err(Error::input(
                        file,
                        format!(
                            "\"{key}\" ({suffix} of {}): expected shape {expected:?}, found \
                             {shape:?}",
                            graph.label(i)
                        ),
                    ));
                }
                if values.len() != expected.iter().product::<usize>() {
                    return Err(Error::input(
                        file,
                        format!(
                            "\"{key}\": shape {shape:?} needs {} values, found {}",
                            expected.iter().product::<usize>(),
                            values.len()
                        ),
                    ));
                }
                layer.push((suffix, values));
            }
            params.push(Some(LayerParams { tensors: layer }));
        }
        Ok(Self { graph, params })
    }

    /// The chain the model was read from, if it is one.
    pub fn chain(&self) -> Option<&super::ModelSpec> {
        self.graph.chain.as_ref()
    }

    /// Indices of the curvature layers (linear, conv2d), in order.
    pub fn curvature_layers(&self) -> Vec<usize> {
        self.graph.curvature_layers()
    }

    /// `C`: the number of network outputs per example.
    pub fn num_outputs(&self) -> usize {
        self.graph.num_outputs()
    }

    /// The per-example shape of every value: the input, then each node's output.
    pub fn shapes(&self) -> Vec<Vec<usize>> {
        self.graph.shapes().to_vec()
    }

    /// The parameters of node `i`, if it has any.
    pub fn layer_params(&self, i: usize) -> Option<&LayerParams> {
        self.params.get(i).and_then(Option::as_ref)
    }

    /// A stable 64-bit FNV-1a hash (16 hex digits) of the description's JSON and every
    /// parameter's bytes (little-endian f32, node order; each tensor after the first
    /// prefixed by its suffix).
    pub fn fingerprint(&self) -> String {
        let mut h = Fnv1a::new();
        h.write(self.graph.to_json().as_bytes());
        for (i, p) in self.params.iter().enumerate() {
            let Some(p) = p else { continue };
            h.write(&(i as u64).to_le_bytes());
            for (k, (suffix, values)) in p.tensors.iter().enumerate() {
                if k > 0 {
                    h.write(suffix.as_bytes());
                }
                for v in values {
                    h.write(&v.to_le_bytes());
                }
            }
        }
        format!("{:016x}", h.0)
    }
}

/// A model description for [`Model::new`]: a [`Graph`], or a chain checked into one.
pub struct Describe(Result<Graph>);

impl From<Graph> for Describe {
    fn from(graph: Graph) -> Self {
        Self(Ok(graph))
    }
}

impl From<super::ModelSpec> for Describe {
    fn from(spec: super::ModelSpec) -> Self {
        Self(spec.to_graph())
    }
}

/// The weights-file keys of entries the nodes accept and ignore
/// ([`crate::layers::Layer::ignored_params`]).
fn ignored_keys(graph: &Graph) -> std::collections::HashSet<String> {
    let mut ignored = std::collections::HashSet::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        for suffix in graph.layer(i).ignored_params() {
            ignored.insert(format!("{}.{suffix}", node.module()));
        }
    }
    ignored
}

/// Errors on keys that are no parameter of a node.
fn check_extra_keys(graph: &Graph, keys: impl Iterator<Item = String>, file: &str) -> Result<()> {
    let mut expected = std::collections::HashSet::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        for spec in graph.layer(i).params() {
            expected.insert(graph.layer(i).param_key(node.module(), spec.suffix));
        }
    }
    let mut extra: Vec<String> = keys.filter(|k| !expected.contains(k)).collect();
    if extra.is_empty() {
        return Ok(());
    }
    extra.sort();
    let key = &extra[0];
    let hint = extra_key_hint(graph, key);
    Err(Error::input(
        file,
        format!(
            "unexpected key \"{key}\"{hint} (keys not belonging to any layer: {})",
            crate::io::cut_list(&extra)
        ),
    ))
}

/// Explains why `key` belongs to no node, where a node of that module exists.
fn extra_key_hint(graph: &Graph, key: &str) -> String {
    let Some((prefix, suffix)) = key.rsplit_once('.') else {
        return String::new();
    };
    let Some(i) = graph.nodes.iter().position(|n| n.module() == prefix) else {
        return String::new();
    };
    let suffixes: Vec<&str> = graph.layer(i).params().iter().map(|p| p.suffix).collect();
    if suffix == "bias" && suffixes.contains(&"weight") {
        format!(": {} has bias = false", graph.label(i))
    } else if suffixes.is_empty() {
        format!(": {} has no parameters", graph.label(i))
    } else {
        format!(": {} has only {}", graph.label(i), suffixes.join(" and "))
    }
}

/// FNV-1a, 64 bit.
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}
