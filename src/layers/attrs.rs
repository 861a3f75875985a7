//! Reading a node's attributes: PyTorch's names and defaults, pairs as an integer or a
//! 2-list; errors name the node and the attribute.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::graph::Node;

/// The attributes of one node, with error helpers that name it.
pub struct Attrs<'a> {
    node: &'a Node,
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
        let attrs = Self { node };
        if let Some(key) = node.attrs.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(attrs.err(format!(
                "unknown attribute \"{key}\" (allowed: {})",
                allowed.join(", ")
            )));
        }
        Ok(attrs)
    }

    /// An error naming the node.
    pub fn err(&self, msg: impl Into<String>) -> Error {
        Error::model(self.node.label(), msg)
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
        match self.node.attrs.get(key) {
            Some(v) => self.integer(key, v),
            None => Err(self.err(format!("missing attribute \"{key}\""))),
        }
    }

    /// A non-negative integer with a default.
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        self.node
            .attrs
            .get(key)
            .map_or(Ok(default), |v| self.integer(key, v))
    }

    /// A pair given as an integer or a 2-list; `None` when absent or null.
    pub fn pair(&self, key: &str) -> Result<Option<[usize; 2]>> {
        match self.node.attrs.get(key) {
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
        self.pair(key)?
            .ok_or_else(|| self.err(format!("missing attribute \"{key}\"")))
    }

    /// A boolean with a default.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.node.attrs.get(key) {
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
        match self.node.attrs.get(key) {
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
        match self.node.attrs.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| {
                self.err(format!("\"{key}\": expected a number, found {}", brief(v)))
            }),
        }
    }

    /// A PyTorch option implemented only at one value: absent or equal to `supported`.
    pub fn only(&self, key: &str, supported: Value) -> Result<()> {
        match self.node.attrs.get(key) {
            Some(v) if *v != supported => Err(self.err(format!(
                "{key} = {} is unsupported (only {key} = {supported} is implemented)",
                brief(v)
            ))),
            _ => Ok(()),
        }
    }
}
