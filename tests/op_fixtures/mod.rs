//! Reading `tests/fixtures/ops/` (see its README): one PyTorch autograd case per file.
#![allow(dead_code)]

use ekfac::model::TensorFile;

/// One case: the op, its attributes and its tensors (all F64).
pub struct OpFixture {
    pub name: String,
    pub op: String,
    pub attrs: serde_json::Value,
    /// `V`, the number of backpropagated vectors.
    pub vectors: usize,
    file: TensorFile,
}

impl OpFixture {
    /// Loads `tests/fixtures/ops/<name>.safetensors`.
    pub fn load(name: &str) -> Self {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/ops")
            .join(format!("{name}.safetensors"));
        let file = TensorFile::load(&path).unwrap();
        let case: serde_json::Value =
            serde_json::from_str(file.string_metadata("case").expect("case metadata")).unwrap();
        let vectors = file.string_metadata("vectors").unwrap().parse().unwrap();
        Self {
            name: name.to_string(),
            op: case["op"].as_str().unwrap().to_string(),
            attrs: case["attrs"].clone(),
            vectors,
            file,
        }
    }

    /// The values and shape of `key`.
    pub fn get(&self, key: &str) -> (Vec<f64>, Vec<usize>) {
        let t = self
            .file
            .require(key, "fixture tensor")
            .unwrap_or_else(|e| panic!("{}: {e}", self.name));
        (t.to_f64().unwrap(), t.shape.to_vec())
    }

    /// The values of `key`.
    pub fn values(&self, key: &str) -> Vec<f64> {
        self.get(key).0
    }

    /// The values of `key` as f32 (exact: every input is float32-representable).
    pub fn f32(&self, key: &str) -> Vec<f32> {
        let v = self.values(key);
        let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        assert!(
            f.iter().zip(&v).all(|(&a, &b)| f64::from(a) == b),
            "{}: {key} is not float32-representable",
            self.name
        );
        f
    }

    /// The attribute `key` as f64.
    pub fn attr_f64(&self, key: &str) -> f64 {
        self.attrs[key].as_f64().unwrap()
    }

    /// The attribute `key` as a boolean.
    pub fn attr_bool(&self, key: &str) -> bool {
        self.attrs[key].as_bool().unwrap()
    }

    /// `shape` with its leading (batch) axis multiplied by `V`: the shape of a stack of
    /// gradients as the backward passes take it.
    pub fn stacked(&self, shape: &[usize]) -> Vec<usize> {
        let mut s = shape.to_vec();
        s[0] *= self.vectors;
        s
    }
}

/// Relative Frobenius error ‖got − want‖ / ‖want‖ of f64 values.
pub fn rel_err64(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(1e-300)).sqrt()
}
