//! Shared helpers for the integration tests: one GPU device per test binary.
#![allow(dead_code)]

pub mod child;
pub mod curvlinops;
pub mod golden_cnn;
pub mod reference;

use std::sync::{Mutex, MutexGuard, OnceLock};

use ekfac::gpu::GpuContext;

static GPU: OnceLock<Option<Mutex<GpuContext>>> = OnceLock::new();

/// The test binary's shared device, locked for the calling test. Without an adapter
/// the test is skipped loudly, unless `EKFAC_REQUIRE_GPU=1`, where it fails.
pub fn gpu() -> Option<MutexGuard<'static, GpuContext>> {
    shared(&GPU, || GpuContext::new().map_err(|e| e.to_string()))
}

/// The device in `slot`, opened by `open` on first use, locked for the calling test;
/// `None` (skip) or a panic under `EKFAC_REQUIRE_GPU=1` when it cannot be opened.
fn shared(
    slot: &'static OnceLock<Option<Mutex<GpuContext>>>,
    open: impl FnOnce() -> Result<GpuContext, String>,
) -> Option<MutexGuard<'static, GpuContext>> {
    let slot = slot.get_or_init(|| match open() {
        Ok(ctx) => Some(Mutex::new(ctx)),
        Err(e) => {
            if std::env::var("EKFAC_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("EKFAC_REQUIRE_GPU=1 but no GPU is available: {e}");
            }
            eprintln!("SKIPPING GPU TEST: {e}");
            None
        }
    });
    slot.as_ref()
        .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
}

static SMALL_BINDING_GPU: OnceLock<Option<Mutex<GpuContext>>> = OnceLock::new();

/// Bytes of one storage binding on [`small_binding_gpu`]: 16384 floats, so that a
/// factor of `n > 128` needs several binding windows, as `n > 5790` does on WebGPU's
/// default 128 MiB.
pub const SMALL_BINDING: u64 = 64 << 10;

/// A device the way a host application would open one (high-performance adapter of
/// the backends in `WGPU_BACKEND`), with `limits`, wrapped by
/// `GpuContext::from_device`; an error when there is no adapter.
pub fn host_device(limits: wgpu::Limits) -> Result<GpuContext, String> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        force_fallback_adapter: false,
        compatible_surface: None,
        apply_limit_buckets: false,
    }))
    .map_err(|e| e.to_string())?;
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_limits: limits,
        ..wgpu::DeviceDescriptor::default()
    }))
    .map_err(|e| e.to_string())?;
    Ok(GpuContext::from_device(device, queue, adapter.get_info()))
}

/// A second device of the test binary whose `max_storage_buffer_binding_size` is
/// lowered to [`SMALL_BINDING`], to test the paths for tensors larger than one binding
/// at sizes the software driver runs quickly. Skipped or failed like [`gpu`].
pub fn small_binding_gpu() -> Option<MutexGuard<'static, GpuContext>> {
    shared(&SMALL_BINDING_GPU, || {
        host_device(wgpu::Limits {
            max_storage_buffer_binding_size: SMALL_BINDING,
            ..wgpu::Limits::default()
        })
    })
}

/// A small deterministic generator (SplitMix64) for test inputs.
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform() as f32).collect()
    }
}

/// `v` widened to f64.
pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| f64::from(a)).collect()
}

/// Relative Frobenius error ‖got − want‖ / max(‖want‖, tiny).
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Asserts that each `(name, tensor, want)` read back from `ctx` is within relative
/// Frobenius error `tol` of `want`, naming the tensor and `case` otherwise.
pub fn assert_close(
    ctx: &GpuContext,
    results: &[(&str, &ekfac::gpu::GpuTensor, &[f64])],
    tol: f64,
    case: &str,
) {
    for (name, tensor, want) in results {
        let e = rel_err(&ctx.read(tensor).unwrap(), want);
        assert!(e < tol, "{name} {case}: relative error {e:.2e} ≥ {tol:.0e}");
    }
}

/// `want` plus `prior` (the values an accumulating kernel adds to) when `accumulate`,
/// else `want`.
pub fn plus_prior(want: &[f64], prior: &[f32], accumulate: bool) -> Vec<f64> {
    want.iter()
        .zip(prior)
        .map(|(w, &p)| w + if accumulate { f64::from(p) } else { 0.0 })
        .collect()
}

/// Asserts a weighted layer's GPU results `[y, dx, dw, db]` against the f64 reference
/// `want` (same order) within relative Frobenius error `tol`, the parameter gradients
/// having started from `[prior_w, prior_b]` (added to the reference when `accumulate`).
pub fn assert_layer_close(
    ctx: &GpuContext,
    [y, dx, dw, db]: [&ekfac::gpu::GpuTensor; 4],
    [want_y, want_dx, want_dw, want_db]: [&[f64]; 4],
    [prior_w, prior_b]: [&[f32]; 2],
    accumulate: bool,
    tol: f64,
    case: &str,
) {
    assert_close(
        ctx,
        &[
            ("y", y, want_y),
            ("dx", dx, want_dx),
            ("dw", dw, &plus_prior(want_dw, prior_w, accumulate)),
            ("db", db, &plus_prior(want_db, prior_b, accumulate)),
        ],
        tol,
        case,
    );
}

/// The error of building the layer of node `name` (`op` with `attrs`, one input of
/// per-example `shape`); panics if it builds.
pub fn build_error(name: &str, op: &str, attrs: &serde_json::Value, shape: &[usize]) -> String {
    let node = ekfac::graph::Node::new(
        name,
        op,
        vec!["x".into()],
        attrs.as_object().unwrap().clone(),
    );
    match ekfac::layers::build(&node, &[shape]) {
        Ok(_) => panic!("{op} {attrs} on {shape:?} built"),
        Err(e) => e.to_string(),
    }
}

/// One case of `tests/fixtures/curvature/` (see its README): the model, data and
/// options curvlinops was run with, and its expected values.
pub struct FixtureCase {
    pub name: String,
    pub expected: serde_json::Value,
    pub model: ekfac::graph::Model,
    pub data: ekfac::model::Dataset,
    pub options: ekfac::curvature::options::Options,
    pub damping: f64,
    /// `expected.safetensors`: `vectors` and the expected products (F64).
    pub products: ekfac::model::TensorFile,
    /// The fixture's random `[P, K]` test vectors as f32 (they are f32-representable).
    pub vectors: Vec<f32>,
    /// `K`.
    pub columns: usize,
}

/// The chain cases (`torch.nn.Sequential` models, issues 3 and 4).
pub const CHAIN_FIXTURES: &str = "curvature";
/// The graph cases (residual networks, BatchNorm, LayerNorm, cat, upsample; issue 9).
pub const GRAPH_FIXTURES: &str = "curvature_graph";

fn fixture_root(folder: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(folder)
}

/// The names of every chain curvature fixture case, sorted.
pub fn fixture_names() -> Vec<String> {
    fixture_names_in(CHAIN_FIXTURES)
}

/// The names of every case under `tests/fixtures/<folder>/`, sorted.
pub fn fixture_names_in(folder: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixture_root(folder))
        .expect("fixture directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("expected.json").exists())
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no curvature fixtures in {folder}");
    names
}

/// Loads the chain curvature fixture case `name`.
pub fn fixture(name: &str) -> FixtureCase {
    fixture_in(CHAIN_FIXTURES, name)
}

/// Loads the case `name` of `tests/fixtures/<folder>/`.
pub fn fixture_in(folder: &str, name: &str) -> FixtureCase {
    let dir = fixture_root(folder).join(name);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let text = |key: &str| expected[key].as_str().unwrap().to_string();
    let options = ekfac::curvature::options::Options {
        loss: text("loss").parse().unwrap(),
        reduction: text("reduction").parse().unwrap(),
        fisher: text("fisher").parse().unwrap(),
        approx: text("approx").parse().unwrap(),
        joint_bias: expected["joint_bias"].as_bool().unwrap(),
        params: Some(
            expected["params"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_string())
                .collect(),
        ),
        batch_size: expected["batch_size"].as_u64().unwrap() as usize,
        ..Default::default()
    };
    let model =
        ekfac::graph::Model::load(dir.join("model.json"), dir.join("weights.safetensors")).unwrap();
    let data = ekfac::model::Dataset::load(dir.join("data.safetensors")).unwrap();
    let products = ekfac::model::TensorFile::load(dir.join("expected.safetensors")).unwrap();
    let (vectors, columns) = {
        let v = products.require("vectors", "test vectors").unwrap();
        (v.to_f32().unwrap(), v.shape[1])
    };
    FixtureCase {
        name: name.to_string(),
        damping: expected["damping"].as_f64().unwrap(),
        expected,
        model,
        data,
        options,
        products,
        vectors,
        columns,
    }
}

/// A chain CNN of every chain layer type, input `[4, 9, 8]`: a grouped conv with a
/// rectangular kernel and stride 2 (`[6, 5, 4]`), tanh before an overlapping max-pool
/// (`[6, 6, 5]`), a dilated bias-free conv (`[4, 4, 3]`), relu, avg-pool with padding
/// (`[4, 5, 4]`), sigmoid, flatten (`[80]`) and a linear layer (`[5]`).
pub const EVERY_LAYER_CNN: &str = r#"{"input_shape": [4, 9, 8], "layers": [
    {"type": "conv2d", "name": "c1", "in_channels": 4, "out_channels": 6,
     "kernel_size": [3, 2], "stride": 2, "padding": [1, 0], "groups": 2},
    {"type": "tanh"},
    {"type": "max_pool2d", "kernel_size": 2, "stride": 1, "padding": 1},
    {"type": "conv2d", "name": "c2", "in_channels": 6, "out_channels": 4,
     "kernel_size": 3, "dilation": 2, "padding": 1, "bias": false},
    {"type": "relu"},
    {"type": "avg_pool2d", "kernel_size": 2, "stride": 1, "padding": 1},
    {"type": "sigmoid"},
    {"type": "flatten"},
    {"type": "linear", "name": "fc", "in_features": 80, "out_features": 5}]}"#;

/// A model with random weights in [-1.5, 1.5)/√fan_in and biases in [-1, 1).
pub fn random_model(spec: ekfac::graph::ModelSpec, rng: &mut TestRng) -> ekfac::graph::Model {
    let mut tensors = std::collections::HashMap::new();
    for layer in &spec.layers {
        let (Some(name), Some(shape)) = (layer.name(), layer.weight_shape()) else {
            continue;
        };
        let fan_in: usize = shape[1..].iter().product();
        let scale = 1.5 / (fan_in as f64).sqrt();
        let n: usize = shape.iter().product();
        let w = (0..n).map(|_| (rng.uniform() * scale) as f32).collect();
        tensors.insert(format!("{name}.weight"), (shape, w));
        if let Some(shape) = layer.bias_shape() {
            tensors.insert(format!("{name}.bias"), (shape.clone(), rng.vec(shape[0])));
        }
    }
    ekfac::graph::Model::new(spec, tensors).unwrap()
}

/// `n` examples of `example_shape` with inputs uniform in [-1, 1) and class targets
/// uniform over `classes`.
pub fn random_classification(
    rng: &mut TestRng,
    n: usize,
    example_shape: &[usize],
    classes: u64,
) -> ekfac::model::Dataset {
    let x = rng.vec(n * example_shape.iter().product::<usize>());
    let y = (0..n).map(|_| (rng.next_u64() % classes) as i64).collect();
    ekfac::model::Dataset::new(x, example_shape.to_vec(), ekfac::model::Targets::Classes(y))
        .unwrap()
}

/// A validated conv2d geometry for kernel tests.
#[allow(clippy::too_many_arguments)]
pub fn conv_geometry(
    batch: usize,
    in_channels: usize,
    out_channels: usize,
    in_size: [usize; 2],
    kernel_size: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
) -> ekfac::geometry::Conv2dGeometry {
    let geo = ekfac::geometry::Conv2dGeometry {
        batch,
        in_channels,
        out_channels,
        in_size,
        kernel_size,
        stride,
        padding,
        dilation,
        groups,
    };
    geo.validate("test").expect("valid test geometry");
    geo
}
