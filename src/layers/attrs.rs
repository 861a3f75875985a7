//! Reading a layer's attributes: PyTorch's names and defaults, pairs as an integer or a
//! 2-list; errors name the layer and the attribute. One reader serves both model
//! formats: a graph node's `attrs` ([`Attrs::new`]) and a chain-format layer object
//! ([`Attrs::chain_layer`]).

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::graph::Node;

/// The attributes of one layer, with error helpers that name it.
pub struct Attrs<'a> {
    map: &'a Map<String, Value>,
    origin: Origin<'a>,
}

/// Where the attributes come from, for error messages.
enum Origin<'a> {
    /// A graph node: errors name the node.
    Node(&'a Node),
    /// Entry `index` (of type `kind`) of a chain-format file's `layers`: errors name the
    /// file and the entry; its attributes are called keys.
    Chain {
        file: &'a str,
        index: usize,
        kind: &'a str,
    },
}

/// A short rendering of a JSON value for error messages.
pub fn brief(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

impl<'a> Attrs<'a> {
    /// The attributes of `node`, after checking that every key is in `allowed`.
    pub fn new(node: &'a Node, allowed: &[&str]) -> Result<Self> {
        let attrs = Self {
            map: &node.attrs,
            origin: Origin::Node(node),
        };
        attrs.check_keys(allowed)?;
        Ok(attrs)
    }

    /// Entry `index` of a chain-format file's `layers`, of type `kind`, after checking
    /// that every key is `type`, `name` or in `allowed`.
    pub fn chain_layer(
        file: &'a str,
        index: usize,
        kind: &'a str,
        map: &'a Map<String, Value>,
        allowed: &[&str],
    ) -> Result<Self> {
        let attrs = Self {
            map,
            origin: Origin::Chain { file, index, kind },
        };
        let mut all = vec!["type", "name"];
        all.extend_from_slice(allowed);
        attrs.check_keys(&all)?;
        Ok(attrs)
    }

    /// What an attribute is called in this format.
    fn noun(&self) -> &'static str {
        match self.origin {
            Origin::Node(_) => "attribute",
            Origin::Chain { .. } => "key",
        }
    }

    fn check_keys(&self, allowed: &[&str]) -> Result<()> {
        match self.map.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(key) => Err(self.err(format!(
                "unknown {} \"{key}\" (allowed: {})",
                self.noun(),
                allowed.join(", ")
            ))),
            None => Ok(()),
        }
    }

    /// The raw value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    /// An error naming the layer.
    pub fn err(&self, msg: impl Into<String>) -> Error {
        match self.origin {
            Origin::Node(node) => Error::model(node.label(), msg),
            Origin::Chain { file, index, kind } => {
                Error::input(file, format!("layers[{index}] ({kind}): {}", msg.into()))
            }
        }
    }

    fn missing(&self, key: &str) -> Error {
        self.err(format!("missing {} \"{key}\"", self.noun()))
    }

    fn integer(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .and_then(|u| usize::try_from(u).ok())
            .ok_or_else(|| {
                self.err(format!(
                    "\"{key}\": expected a non-negative integer, found {}",
                    brief(v)
                ))
            })
    }

    /// A required non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        match self.map.get(key) {
            Some(v) => self.integer(key, v),
            None => Err(self.missing(key)),
        }
    }

    /// A non-negative integer with a default.
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        self.map
            .get(key)
            .map_or(Ok(default), |v| self.integer(key, v))
    }

    /// A pair given as an integer or a 2-list; `None` when absent or null.
    pub fn pair(&self, key: &str) -> Result<Option<[usize; 2]>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) if items.len() == 2 => Ok(Some([
                self.integer(key, &items[0])?,
                self.integer(key, &items[1])?,
            ])),
            Some(v @ Value::Number(_)) => Ok(Some([self.integer(key, v)?; 2])),
            Some(v) => Err(self.err(format!(
                "\"{key}\": expected an integer or a list of 2 integers, found {}",
                brief(v)
            ))),
        }
    }

    /// A required pair.
    pub fn required_pair(&self, key: &str) -> Result<[usize; 2]> {
        self.pair(key)?.ok_or_else(|| self.missing(key))
    }

    /// Conv2d's `padding`: a pair, or PyTorch's strings `"valid"` (0) and `"same"`
    /// (stride 1 and symmetric padding `d·(k − 1)/2` per axis only).
    pub fn conv_padding(
        &self,
        kernel: [usize; 2],
        stride: [usize; 2],
        dilation: [usize; 2],
    ) -> Result<[usize; 2]> {
        match self.map.get("padding") {
            Some(Value::String(s)) if s == "valid" => Ok([0, 0]),
            Some(Value::String(s)) if s == "same" => {
                if stride != [1, 1] {
                    return Err(self.err("padding = \"same\" needs stride 1, as in PyTorch"));
                }
                let mut pad = [0; 2];
                for axis in 0..2 {
                    let total = dilation[axis]
                        .checked_mul(kernel[axis].saturating_sub(1))
                        .ok_or_else(|| self.err("kernel_size and dilation overflow"))?;
                    if !total.is_multiple_of(2) {
                        return Err(self.err(format!(
                            "padding = \"same\" needs asymmetric padding for kernel_size \
                             {kernel:?} and dilation {dilation:?}, which is unsupported"
                        )));
                    }
                    pad[axis] = total / 2;
                }
                Ok(pad)
            }
            _ => Ok(self.pair("padding")?.unwrap_or([0, 0])),
        }
    }

    /// A boolean with a default.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.map.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(format!(
                "\"{key}\": expected true or false, found {}",
                brief(v)
            ))),
        }
    }

    /// A signed integer with a default.
    pub fn i64_or(&self, key: &str, default: i64) -> Result<i64> {
        match self.map.get(key) {
            None => Ok(default),
            Some(v) => v.as_i64().ok_or_else(|| {
                self.err(format!(
                    "\"{key}\": expected an integer, found {}",
                    brief(v)
                ))
            }),
        }
    }

    /// A number with a default.
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.map.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| {
                self.err(format!("\"{key}\": expected a number, found {}", brief(v)))
            }),
        }
    }

    /// A normalisation's `eps` (default 1e-5): finite, ≥ 0 and within f32.
    pub fn eps(&self) -> Result<f64> {
        let eps = self.f64_or("eps", 1e-5)?;
        if !(eps >= 0.0 && eps.is_finite() && (eps as f32).is_finite()) {
            return Err(self.err(format!("eps = {eps} must be finite and ≥ 0")));
        }
        Ok(eps)
    }

    /// A PyTorch option implemented only at one value: absent or equal to `supported`.
    pub fn only(&self, key: &str, supported: Value) -> Result<()> {
        match self.map.get(key) {
            Some(v) if *v != supported => Err(self.err(format!(
                "{key} = {} is unsupported (only {key} = {supported} is implemented)",
                brief(v)
            ))),
            _ => Ok(()),
        }
    }
}
