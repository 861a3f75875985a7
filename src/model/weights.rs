//! The network's parameters: PyTorch `state_dict` names and layouts, f32, row-major.

use std::collections::HashMap;
use std::path::Path;

use super::spec::{Layer, ModelSpec};
use super::tensor_file::TensorFile;
use crate::error::{Error, Result};

/// The parameters of one linear or conv2d layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerParams {
    /// Linear `[out, in]`, conv2d `[C_out, C_in/groups, KH, KW]`, row-major.
    pub weight: Vec<f32>,
    /// `[out]` where the layer has a bias.
    pub bias: Option<Vec<f32>>,
}

/// A validated network: the description plus the parameters of every linear/conv2d layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub spec: ModelSpec,
    /// Indexed by layer index; `None` for parameter-free layers.
    pub params: Vec<Option<LayerParams>>,
}

impl Model {
    /// Loads a model description (JSON) and its weights (safetensors with keys
    /// `"<name>.weight"` and `"<name>.bias"`; F32, or F16/BF16/F64 converted to f32).
    pub fn load(model_json: impl AsRef<Path>, weights: impl AsRef<Path>) -> Result<Self> {
        let spec = ModelSpec::load(model_json)?;
        spec.validate()?;
        // The spec is checked before the weights file is read, so its errors come first.
        let file = TensorFile::load(weights)?;
        Self::from_tensor_file(spec, &file)
    }

    /// Builds a model from a description and the weights of a safetensors file.
    pub fn from_tensor_file(spec: ModelSpec, file: &TensorFile) -> Result<Self> {
        spec.validate()?;
        let keys = file.keys();
        check_extra_keys(&spec, keys.iter().cloned(), file.label())?;
        let mut tensors = HashMap::new();
        for key in keys {
            let t = file.get(&key).expect("key listed by the file");
            let shape = t.shape.to_vec();
            tensors.insert(key.clone(), (shape, t.to_f32()?));
        }
        Self::build(spec, tensors, file.label())
    }

    /// Builds a model from Rust: `tensors` maps `"<name>.weight"` / `"<name>.bias"` to
    /// `(shape, row-major values)` in PyTorch layout. Checks the spec and every key and shape.
    pub fn new(spec: ModelSpec, tensors: HashMap<String, (Vec<usize>, Vec<f32>)>) -> Result<Self> {
        spec.validate()?;
        Self::build(spec, tensors, "weights")
    }

    fn build(
        spec: ModelSpec,
        mut tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
        file: &str,
    ) -> Result<Self> {
        check_extra_keys(&spec, tensors.keys().cloned(), file)?;
        let mut params = Vec::with_capacity(spec.layers.len());
        for (i, layer) in spec.layers.iter().enumerate() {
            let (Some(name), Some(weight_shape)) = (layer.name(), layer.weight_shape()) else {
                params.push(None);
                continue;
            };
            let mut take = |suffix: &str, expected: Vec<usize>| -> Result<Vec<f32>> {
                let key = format!("{name}.{suffix}");
                let (shape, values) = tensors.remove(&key).ok_or_else(|| {
                    Error::input(
                        file,
                        format!(
                            "missing key \"{key}\" ({suffix} of {}, expected shape {expected:?})",
                            spec.label(i)
                        ),
                    )
                })?;
                if shape != expected {
                    return Err(Error::input(
                        file,
                        format!(
                            "\"{key}\" ({suffix} of {}): expected shape {expected:?}, found \
                             {shape:?}",
                            spec.label(i)
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
                Ok(values)
            };
            let weight = take("weight", weight_shape)?;
            let bias = match layer.bias_shape() {
                Some(shape) => Some(take("bias", shape)?),
                None => None,
            };
            params.push(Some(LayerParams { weight, bias }));
        }
        Ok(Self { spec, params })
    }

    /// Indices of the linear and conv2d layers, in order.
    pub fn curvature_layers(&self) -> Vec<usize> {
        self.spec.curvature_layers()
    }

    /// `C`: the number of network outputs per example.
    pub fn num_outputs(&self) -> usize {
        self.shapes().last().map_or(0, |s| s.iter().product())
    }

    /// The per-example shapes entering each layer, then the output (see
    /// [`ModelSpec::shapes`]); the spec was validated when the model was built.
    pub fn shapes(&self) -> Vec<Vec<usize>> {
        self.spec
            .shapes()
            .expect("a Model's spec is validated when it is built")
    }

    /// The parameters of layer `i`, if it is a linear or conv2d layer.
    pub fn layer_params(&self, i: usize) -> Option<&LayerParams> {
        self.params.get(i).and_then(Option::as_ref)
    }

    /// A stable 64-bit FNV-1a hash (16 hex digits) of the spec's JSON and every parameter's
    /// bytes (little-endian f32, layer order, weight then bias).
    pub fn fingerprint(&self) -> String {
        let mut h = Fnv1a::new();
        h.write(self.spec.to_json().as_bytes());
        for (i, p) in self.params.iter().enumerate() {
            let Some(p) = p else { continue };
            h.write(&(i as u64).to_le_bytes());
            for v in &p.weight {
                h.write(&v.to_le_bytes());
            }
            if let Some(b) = &p.bias {
                h.write(b"bias");
                for v in b {
                    h.write(&v.to_le_bytes());
                }
            }
        }
        format!("{:016x}", h.0)
    }
}

/// Errors on keys that are not `"<name>.weight"` / `"<name>.bias"` of a layer with those
/// parameters.
fn check_extra_keys(
    spec: &ModelSpec,
    keys: impl Iterator<Item = String>,
    file: &str,
) -> Result<()> {
    let mut expected = Vec::new();
    for layer in &spec.layers {
        if let Some(name) = layer.name() {
            expected.push(format!("{name}.weight"));
            if layer.has_bias() {
                expected.push(format!("{name}.bias"));
            }
        }
    }
    let mut extra: Vec<String> = keys.filter(|k| !expected.contains(k)).collect();
    if extra.is_empty() {
        return Ok(());
    }
    extra.sort();
    let key = &extra[0];
    let hint = extra_key_hint(spec, key);
    Err(Error::input(
        file,
        format!(
            "unexpected key \"{key}\"{hint} (keys not belonging to any layer: {})",
            crate::io::cut_list(&extra)
        ),
    ))
}

/// Explains why `key` belongs to no layer, where a layer of that name exists.
fn extra_key_hint(spec: &ModelSpec, key: &str) -> String {
    let Some((prefix, suffix)) = key.rsplit_once('.') else {
        return String::new();
    };
    let Some(i) = spec
        .layers
        .iter()
        .position(|l: &Layer| l.name() == Some(prefix))
    else {
        return String::new();
    };
    if suffix == "bias" {
        format!(": {} has bias = false", spec.label(i))
    } else {
        format!(": {} has only weight and bias", spec.label(i))
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
