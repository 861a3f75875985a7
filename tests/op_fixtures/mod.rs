//! Reading `tests/fixtures/ops/` (see its README): one PyTorch autograd case per file.
#![allow(dead_code)]

use ekfac::layers::{BackwardArgs, ForwardArgs, Pass};
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

    /// The names of the op's inputs: `x`, or `x0`, `x1`, … for several.
    pub fn input_names(&self) -> Vec<String> {
        if self.file.get("x").is_some() {
            return vec!["x".to_string()];
        }
        (0..)
            .map(|i| format!("x{i}"))
            .take_while(|k| self.file.get(k).is_some())
            .collect()
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

/// Tolerances of a layer against a fixture, relative Frobenius errors (0: exact).
pub struct Tolerances {
    pub forward: f64,
    pub backward: f64,
}

/// The reference reproduces PyTorch's float64 autograd up to float64 rounding.
pub const REFERENCE_TOL: f64 = 1e-12;

/// Builds the fixture's op as a layer through the registry (its attributes are
/// `model.json`'s) and checks it against PyTorch: the f64 reference forward and
/// backward to [`REFERENCE_TOL`], the GPU forward and the backward of the stack of `V`
/// backpropagated vectors to `tol`. Parameters come from the fixture by their suffix
/// (`weight`, `bias`, `running_mean`, `running_var`). Returns the GPU results
/// `(output, input gradients)` for op-specific checks, or `None` without a GPU.
pub fn check_layer(f: &OpFixture, tol: Tolerances) -> Option<(Vec<f64>, Vec<Vec<f64>>)> {
    let names = f.input_names();
    let inputs: Vec<(Vec<f64>, Vec<usize>)> = names.iter().map(|n| f.get(n)).collect();
    let batch = inputs[0].1[0];
    let example_shapes: Vec<&[usize]> = inputs.iter().map(|(_, s)| &s[1..]).collect();
    let attrs = f.attrs.as_object().cloned().unwrap_or_default();
    let node = ekfac::graph::Node::new(&f.name, &f.op, names.clone(), attrs);
    let layer =
        ekfac::layers::build(&node, &example_shapes).unwrap_or_else(|e| panic!("{}: {e}", f.name));
    let (output, out_shape) = f.get("output");
    assert_eq!(
        layer.output_shape(),
        &out_shape[1..],
        "{}: output shape",
        f.name
    );
    let specs = layer.params();
    let params: Vec<Vec<f64>> = specs
        .iter()
        .map(|spec| {
            let (v, shape) = f.get(spec.suffix);
            assert_eq!(shape, spec.shape, "{}: {}", f.name, spec.suffix);
            v
        })
        .collect();
    let want_grads: Vec<Vec<f64>> = names
        .iter()
        .map(|n| f.values(&format!("grad_{n}")))
        .collect();
    let grad_out = f.values("grad_output");
    let all = vec![true; names.len()];

    let x64: Vec<&[f64]> = inputs.iter().map(|(v, _)| &v[..]).collect();
    let y = layer.reference_forward(&ForwardArgs {
        batch,
        inputs: &x64,
        params: &params,
    });
    let e = rel_err64(&y, &output);
    assert!(
        e < REFERENCE_TOL,
        "{}: reference forward error {e:e}",
        f.name
    );
    let grads = layer.reference_backward(&BackwardArgs {
        stack: f.vectors,
        batch,
        grad_out: &grad_out,
        inputs: &x64,
        output: &y,
        params: &params,
        input_grads: &all,
        param_grads: false,
    });
    for ((name, got), want) in names.iter().zip(&grads.inputs).zip(&want_grads) {
        let e = rel_err64(got.as_ref().expect("input gradient"), want);
        assert!(
            e < REFERENCE_TOL,
            "{}: reference grad_{name} error {e:e}",
            f.name
        );
    }

    let ctx = super::common::gpu()?;
    let xs: Vec<_> = names
        .iter()
        .zip(&inputs)
        .map(|(n, (_, s))| ctx.upload(&f.f32(n), s).unwrap())
        .collect();
    let ps: Vec<_> = specs
        .iter()
        .map(|spec| ctx.upload(&f.f32(spec.suffix), &spec.shape).unwrap())
        .collect();
    let g = ctx
        .upload(&f.f32("grad_output"), &f.stacked(&out_shape))
        .unwrap();
    let x_refs: Vec<&ekfac::gpu::GpuTensor> = xs.iter().collect();
    let (y, input_grads) = run_gpu(&ctx, layer.as_ref(), batch, f.vectors, &x_refs, &ps, &g);
    let read = |v: Vec<f32>| -> Vec<f64> { v.into_iter().map(f64::from).collect() };
    let y = read(y);
    let e = rel_err64(&y, &output);
    assert!(e <= tol.forward, "{}: GPU forward error {e:e}", f.name);
    let mut got_grads = Vec::new();
    for ((name, got), want) in names.iter().zip(input_grads).zip(&want_grads) {
        let got = read(got);
        let e = rel_err64(&got, want);
        assert!(e <= tol.backward, "{}: GPU grad_{name} error {e:e}", f.name);
        got_grads.push(got);
    }
    Some((y, got_grads))
}

/// Runs `layer` forward on the GPU over `inputs` (`batch` examples) and then backward for
/// the `stack` vectors `grad_out` (`[stack·batch, *output]`) in one pass; returns the
/// output and the gradient w.r.t. every input, read back.
pub fn run_gpu(
    ctx: &ekfac::gpu::GpuContext,
    layer: &dyn ekfac::layers::Layer,
    batch: usize,
    stack: usize,
    inputs: &[&ekfac::gpu::GpuTensor],
    params: &[ekfac::gpu::GpuTensor],
    grad_out: &ekfac::gpu::GpuTensor,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut pass = Pass::new(ctx);
    let y = layer
        .forward(
            &mut pass,
            &ForwardArgs {
                batch,
                inputs,
                params,
            },
        )
        .unwrap();
    let grads = layer
        .backward(
            &mut pass,
            &BackwardArgs {
                stack,
                batch,
                grad_out,
                inputs,
                output: &y,
                params,
                input_grads: &vec![true; inputs.len()],
                param_grads: false,
            },
        )
        .unwrap();
    pass.submit().unwrap();
    let input_grads = grads
        .inputs
        .iter()
        .map(|g| ctx.read(g.as_ref().expect("input gradient")).unwrap())
        .collect();
    (ctx.read(&y).unwrap(), input_grads)
}
