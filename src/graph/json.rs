//! `model.json`: the graph format (format 2, see the README) and the chain format
//! (`{"input_shape", "layers"}`, [`super::chain`]), told apart by the `format` key.
//! Parsing is linear in the file size; errors name the file and the node.

use std::path::Path;

use serde_json::{Map, Value, json};

use super::chain::ModelSpec;
use super::{Graph, GraphInput, InputType, Node};
use crate::error::{Error, Result};
use crate::layers::attrs::brief;

/// The `format` of a graph file.
pub const FORMAT: &str = "ekfac-graph";
/// The `version` of a graph file.
pub const VERSION: u64 = 2;
/// The most nodes a graph file may have.
pub const MAX_NODES: usize = 1_000_000;

/// Reads a model description file, either format: a regular UTF-8 file of at most
/// [`crate::io::MAX_JSON_BYTES`] (anything else is an error naming the file, without
/// blocking on FIFOs or reading endless devices).
pub fn load(path: impl AsRef<Path>) -> Result<Graph> {
    let path = path.as_ref();
    let text = crate::io::read_json_text(path, "a model description")?;
    from_json_str(&text, path.display())
}

/// Parses and checks a model description, either format; `file_label` names it in
/// errors.
pub fn from_json_str(text: &str, file_label: impl std::fmt::Display) -> Result<Graph> {
    let file = file_label.to_string();
    let root: Value = serde_json::from_str(text)
        .map_err(|e| Error::input(&file, format!("invalid JSON: {e}")))?;
    match &root {
        Value::Object(obj) if obj.contains_key("format") => parse_graph(&file, obj),
        _ => ModelSpec::from_json_str(text, &file)?.to_graph(),
    }
}

fn parse_graph(file: &str, root: &Map<String, Value>) -> Result<Graph> {
    let err = |msg: String| Error::input(file, msg);
    const KEYS: [&str; 6] = [
        "format",
        "version",
        "inputs",
        "nodes",
        "output",
        "parameters",
    ];
    if let Some(key) = root.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(err(format!(
            "unknown key \"{key}\" (allowed: {})",
            KEYS.join(", ")
        )));
    }
    if root["format"] != json!(FORMAT) {
        return Err(err(format!(
            "\"format\": expected \"{FORMAT}\", found {}",
            brief(&root["format"])
        )));
    }
    match root.get("version") {
        Some(v) if *v == json!(VERSION) => {}
        v => {
            return Err(err(format!(
                "\"version\": expected {VERSION}, found {}",
                v.map_or("nothing".into(), brief)
            )));
        }
    }
    let input = match root.get("inputs") {
        Some(Value::Array(inputs)) if inputs.len() == 1 => parse_input(file, &inputs[0])?,
        Some(v) => {
            return Err(err(format!(
                "\"inputs\": expected a list of one input (named \"x\"), found {}",
                brief(v)
            )));
        }
        None => return Err(err("missing key \"inputs\"".into())),
    };
    let nodes = match root.get("nodes") {
        Some(Value::Array(nodes)) if nodes.len() <= MAX_NODES => nodes
            .iter()
            .enumerate()
            .map(|(i, v)| parse_node(file, i, v))
            .collect::<Result<Vec<_>>>()?,
        Some(Value::Array(nodes)) => {
            return Err(err(format!(
                "\"nodes\": {} nodes, more than the {MAX_NODES} supported",
                nodes.len()
            )));
        }
        Some(v) => {
            return Err(err(format!(
                "\"nodes\": expected a list, found {}",
                brief(v)
            )));
        }
        None => return Err(err("missing key \"nodes\"".into())),
    };
    let output = match root.get("output") {
        Some(Value::String(s)) => s.as_str(),
        Some(v) => {
            return Err(err(format!(
                "\"output\": expected a node name, found {}",
                brief(v)
            )));
        }
        None => return Err(err("missing key \"output\"".into())),
    };
    let parameters = match root.get("parameters") {
        None => None,
        Some(Value::Array(names)) => Some(
            names
                .iter()
                .map(|n| {
                    n.as_str().map(str::to_string).ok_or_else(|| {
                        err(format!(
                            "\"parameters\": expected parameter names, found {}",
                            brief(n)
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        Some(v) => {
            return Err(err(format!(
                "\"parameters\": expected a list of names, found {}",
                brief(v)
            )));
        }
    };
    Graph::new(input, nodes, output, parameters)
}

fn parse_input(file: &str, v: &Value) -> Result<GraphInput> {
    let err = |msg: String| Error::input(file, format!("inputs[0]: {msg}"));
    let Value::Object(obj) = v else {
        return Err(err(format!("expected an object, found {}", brief(v))));
    };
    if let Some(key) = obj
        .keys()
        .find(|k| !["name", "shape", "dtype"].contains(&k.as_str()))
    {
        return Err(err(format!(
            "unknown key \"{key}\" (allowed: name, shape, dtype)"
        )));
    }
    let name = match obj.get("name") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        v => {
            return Err(err(format!(
                "\"name\": expected a non-empty string, found {}",
                v.map_or("nothing".into(), brief)
            )));
        }
    };
    let shape = match obj.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .map(|d| {
                d.as_u64()
                    .and_then(|d| usize::try_from(d).ok())
                    .filter(|&d| d > 0)
                    .ok_or_else(|| {
                        err(format!(
                            "\"shape\": expected positive integers, found {}",
                            brief(d)
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?,
        v => {
            return Err(err(format!(
                "\"shape\": expected the per-example shape (no batch axis), found {}",
                v.map_or("nothing".into(), brief)
            )));
        }
    };
    let dtype = match obj.get("dtype") {
        None => InputType::F32,
        Some(v) if *v == json!("f32") => InputType::F32,
        Some(v) if *v == json!("i64") => InputType::I64,
        Some(v) => {
            return Err(err(format!(
                "\"dtype\": expected \"f32\" or \"i64\" (token ids), found {}",
                brief(v)
            )));
        }
    };
    Ok(GraphInput { name, shape, dtype })
}

fn parse_node(file: &str, index: usize, v: &Value) -> Result<Node> {
    let err = |msg: String| Error::input(file, format!("nodes[{index}]: {msg}"));
    let Value::Object(obj) = v else {
        return Err(err(format!("expected an object, found {}", brief(v))));
    };
    const KEYS: [&str; 5] = ["name", "op", "inputs", "attrs", "module"];
    let string = |key: &str| match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        v => Err(err(format!(
            "\"{key}\": expected a non-empty string, found {}",
            v.map_or("nothing".into(), brief)
        ))),
    };
    let name = string("name")?;
    let err = |msg: String| Error::input(file, format!("nodes[{index}] \"{name}\": {msg}"));
    if let Some(key) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(err(format!(
            "unknown key \"{key}\" (allowed: {})",
            KEYS.join(", ")
        )));
    }
    let op = string("op")?;
    let inputs = match obj.get("inputs") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| {
                    err(format!(
                        "\"inputs\": expected value names, found {}",
                        brief(i)
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?,
        v => {
            return Err(err(format!(
                "\"inputs\": expected a list of value names, found {}",
                v.map_or("nothing".into(), brief)
            )));
        }
    };
    let attrs = match obj.get("attrs") {
        None => Map::new(),
        Some(Value::Object(a)) => a.clone(),
        Some(v) => {
            return Err(err(format!(
                "\"attrs\": expected an object, found {}",
                brief(v)
            )));
        }
    };
    let mut node = Node::new(name, op, inputs, attrs);
    if obj.contains_key("module") {
        node.module = Some(string("module")?);
    }
    Ok(node)
}

/// The graph as format-2 JSON.
pub fn to_json(graph: &Graph) -> String {
    let nodes: Vec<Value> = graph
        .nodes
        .iter()
        .map(|n| {
            let mut v = json!({"name": n.name, "op": n.op, "inputs": n.inputs, "attrs": n.attrs});
            if let Some(m) = &n.module {
                v["module"] = json!(m);
            }
            v
        })
        .collect();
    let mut root = json!({
        "format": FORMAT,
        "version": VERSION,
        "inputs": [{"name": graph.input.name, "shape": graph.input.shape,
                    "dtype": graph.input.dtype.name()}],
        "nodes": nodes,
        "output": graph.nodes[graph.output].name,
    });
    if let Some(p) = &graph.parameters {
        root["parameters"] = json!(p);
    }
    root.to_string()
}
