//! The GPU network (`ekfac::graph::Network`): forward and stacked backward
//! (`V = 3`, with parameter gradients) against
//! (a) the committed PyTorch fixtures under `tests/fixtures/nn/` (float64 on the same
//!     float32 weights and inputs), and
//! (b) the f64 CPU reference `ekfac::reference::nn` on a random MLP and CNN.
//!
//! Tolerance: relative Frobenius error `1e-5` per tensor. The GPU computes in f32
//! (unit roundoff 6e-8); each value is a few chains of dot products of length ≤ 72 with
//! O(1) condition (random weights scaled by 1/√fan_in, smooth activations), so the
//! accumulated relative error is a few hundred ulps at worst (observed ≤ 3.1e-7), while a
//! wrong index, stride or tie-break gives O(1). In `cnn`'s max-pool tie windows the
//! fixture's first conv is exact in f32 (see the fixtures README), so the tied values are
//! bit-identical and the gradient must go to the same (first, row-major) element as in
//! PyTorch; picking another one would move whole gradient entries and fail by O(1).
//!
//! Backward always runs on what `Network::forward` keeps (the other values are
//! released: a layer whose backward reads an undeclared value fails).
//!
//! Also run by hand under `EKFAC_FEATURES=none` (portable features/limits path).

mod common;

use std::path::Path;

use common::TestRng;
use ekfac::gpu::GpuContext;
use ekfac::graph::Network;
use ekfac::graph::{Model, ModelSpec};
use ekfac::model::{Dataset, TensorFile};
use ekfac::reference::nn;

const TOL: f64 = 1e-5;

/// Forward and stacked backward on the GPU: the network output `[B, C]`, then per
/// linear/conv2d layer (model order) its input, output, output gradient `[V, B, *out]`,
/// weight gradient and bias gradient.
struct GpuRun {
    output: Vec<f32>,
    layers: Vec<GpuLayerRun>,
}

struct GpuLayerRun {
    layer: usize,
    input: Vec<f32>,
    output: Vec<f32>,
    output_grad: Vec<f32>,
    weight_grad: Vec<f32>,
    bias_grad: Option<Vec<f32>>,
}

fn run_gpu(
    ctx: &GpuContext,
    model: &Model,
    x: &[f32],
    grad_output: &[f32],
    stack: usize,
) -> GpuRun {
    let network = Network::new(ctx, model).unwrap();
    let shapes = model.shapes();
    let batch = x.len() / shapes[0].iter().product::<usize>();
    let mut shape = vec![batch];
    shape.extend(&shapes[0]);
    // Backward runs on what a forward pass keeps; the values are read from a second
    // forward pass that keeps them all.
    let forward = network
        .forward(ctx, ctx.upload(x, &shape).unwrap())
        .unwrap();
    let values = network
        .forward_keeping_all(ctx, ctx.upload(x, &shape).unwrap())
        .unwrap();
    let c = network.num_outputs();
    let g = ctx.upload(grad_output, &[stack, batch, c]).unwrap();
    let backward = network.backward(ctx, &forward, &g, stack, true).unwrap();
    assert_eq!(backward.stack(), stack);
    let layers = model
        .curvature_layers()
        .into_iter()
        .map(|l| {
            let (w, b) = backward
                .param_grads(l)
                .expect("parameter gradients were requested");
            GpuLayerRun {
                layer: l,
                input: ctx.read(forward.layer_input(l)).unwrap(),
                output: ctx.read(values.layer_output(l)).unwrap(),
                output_grad: ctx.read(backward.output_grad(l)).unwrap(),
                weight_grad: ctx.read(w).unwrap(),
                bias_grad: b.map(|b| ctx.read(b).unwrap()),
            }
        })
        .collect();
    GpuRun {
        output: ctx.read(forward.output()).unwrap(),
        layers,
    }
}

fn check(failures: &mut Vec<String>, what: String, got: &[f32], want: &[f64]) {
    if got.len() != want.len() {
        failures.push(format!("{what}: {} values, want {}", got.len(), want.len()));
        return;
    }
    let e = common::rel_err(got, want);
    if e.is_nan() || e > TOL {
        failures.push(format!("{what}: relative error {e:.3e} > {TOL:e}"));
    }
}

/// Checks a layer's weight gradient and its bias gradient, which both sides must have
/// or neither.
fn check_param_grads(
    failures: &mut Vec<String>,
    label: &str,
    (weight, bias): (&[f32], Option<&[f32]>),
    (want_weight, want_bias): (&[f64], Option<&[f64]>),
) {
    check(
        failures,
        format!("{label} weight grad"),
        weight,
        want_weight,
    );
    match (bias, want_bias) {
        (Some(got), Some(want)) => check(failures, format!("{label} bias grad"), got, want),
        (None, None) => {}
        _ => failures.push(format!("{label}: bias gradient on one side only")),
    }
}

/// The PyTorch fixture `tests/fixtures/nn/<case>`: the model, its data, the expected
/// float64 tensors, and the output gradients `[V, B, C]` they were backpropagated from.
struct NnFixture {
    case: String,
    model: Model,
    data: Dataset,
    expected: TensorFile,
    /// float32-representable (fixtures README), so the cast is exact.
    grad_output: Vec<f32>,
    /// `V`.
    stack: usize,
}

impl NnFixture {
    fn load(case: &str) -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/nn")
            .join(case);
        let model = Model::load(dir.join("model.json"), dir.join("weights.safetensors")).unwrap();
        let data = Dataset::load_checked(dir.join("data.safetensors"), &model.graph, true).unwrap();
        let expected = TensorFile::load(dir.join("expected.safetensors")).unwrap();
        let grad_ref = expected.get("grad_output").unwrap();
        let stack = grad_ref.shape[0];
        let grad_output = grad_ref.to_f32().unwrap();
        NnFixture {
            case: case.into(),
            model,
            data,
            expected,
            grad_output,
            stack,
        }
    }

    /// The expected tensor `key`.
    fn get(&self, key: &str) -> Vec<f64> {
        self.expected
            .get(key)
            .unwrap_or_else(|| panic!("{}: no {key}", self.case))
            .to_f64()
            .unwrap()
    }

    /// The expected gradients of the parameters `<module>.weight` and, if it has one,
    /// `<module>.bias`.
    fn grads(&self, module: &str) -> (Vec<f64>, Option<Vec<f64>>) {
        let bias = format!("grads.{module}.bias");
        let bias = self.expected.get(&bias).map(|t| t.to_f64().unwrap());
        (self.get(&format!("grads.{module}.weight")), bias)
    }
}

fn check_fixture(ctx: &GpuContext, case: &str) {
    let fixture = NnFixture::load(case);
    let model = &fixture.model;
    assert_eq!(fixture.stack, 3);
    let run = run_gpu(
        ctx,
        model,
        &fixture.data.x,
        &fixture.grad_output,
        fixture.stack,
    );
    let mut failures = Vec::new();
    check(
        &mut failures,
        format!("{case}: output"),
        &run.output,
        &fixture.get("output"),
    );
    for l in &run.layers {
        let name = model.chain().unwrap().layers[l.layer].name().unwrap();
        for (what, got) in [
            ("input", &l.input),
            ("output", &l.output),
            ("output_grad", &l.output_grad),
        ] {
            let want = fixture.get(&format!("layers.{name}.{what}"));
            check(&mut failures, format!("{case}: {name}.{what}"), got, &want);
        }
        let (weight, bias) = fixture.grads(name);
        check_param_grads(
            &mut failures,
            &format!("{case}: {name}"),
            (&l.weight_grad, l.bias_grad.as_deref()),
            (&weight, bias.as_deref()),
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn mlp_matches_pytorch_fixture() {
    let Some(ctx) = common::gpu() else { return };
    check_fixture(&ctx, "mlp");
}

#[test]
fn cnn_with_max_pool_ties_matches_pytorch_fixture() {
    let Some(ctx) = common::gpu() else { return };
    check_fixture(&ctx, "cnn");
}

#[test]
fn cnn_b_matches_pytorch_fixture() {
    let Some(ctx) = common::gpu() else { return };
    check_fixture(&ctx, "cnn_b");
}

/// A model with random weights in [-1, 1) scaled by 1.5/√fan_in, biases in [-1, 1).
fn random_model(json: &str, rng: &mut TestRng) -> Model {
    common::random_model(ModelSpec::from_json_str(json, "test model").unwrap(), rng)
}

/// GPU against `cpu::nn` on random inputs and output gradients. Random f32 inputs put
/// no ReLU input within f32 rounding of 0 and no max-pool near-tie with overwhelming
/// probability (the seeds are fixed, so the test is deterministic).
fn check_against_cpu(ctx: &GpuContext, model: &Model, batch: usize, seed: u64) {
    let stack = 3;
    let mut rng = TestRng::new(seed);
    let shapes = model.shapes();
    let x = rng.vec(batch * shapes[0].iter().product::<usize>());
    let grad_output = rng.vec(stack * batch * model.num_outputs());
    let to64 = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<_>>();
    let trace = nn::forward(model, &to64(&x), batch);
    let back = nn::backward(model, &trace, &to64(&grad_output), stack);
    let run = run_gpu(ctx, model, &x, &grad_output, stack);
    let mut failures = Vec::new();
    check(
        &mut failures,
        "output".into(),
        &run.output,
        trace.activations.last().unwrap(),
    );
    for (slot, l) in run.layers.iter().enumerate() {
        let label = model.graph.label(l.layer);
        check(
            &mut failures,
            format!("{label} output"),
            &l.output,
            &trace.activations[l.layer + 1],
        );
        check(
            &mut failures,
            format!("{label} output_grad"),
            &l.output_grad,
            &back.output_grads[slot],
        );
        check_param_grads(
            &mut failures,
            &label,
            (&l.weight_grad, l.bias_grad.as_deref()),
            (&back.weight_grads[slot], back.bias_grads[slot].as_deref()),
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn random_mlp_matches_cpu_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(21);
    let model = random_model(
        r#"{"input_shape": [6], "layers": [
        {"type": "linear", "name": "fc1", "in_features": 6, "out_features": 9},
        {"type": "sigmoid"},
        {"type": "linear", "name": "fc2", "in_features": 9, "out_features": 7, "bias": false},
        {"type": "relu"},
        {"type": "linear", "name": "fc3", "in_features": 7, "out_features": 5},
        {"type": "tanh"},
        {"type": "linear", "name": "out", "in_features": 5, "out_features": 4}]}"#,
        &mut rng,
    );
    check_against_cpu(&ctx, &model, 7, 22);
}

#[test]
fn random_cnn_matches_cpu_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(31);
    let model = random_model(common::EVERY_LAYER_CNN, &mut rng);
    check_against_cpu(&ctx, &model, 3, 32);
}

/// The graph fixtures `nn/diamond` (a value read by three nodes, `add`, `cat`) and
/// `nn/resnet` (BatchNorm in eval mode, a residual `add` with a strided 1×1 conv
/// shortcut, adaptive average pooling): every node's output, on the GPU executor and
/// on the f64 reference; every node's output gradient (summed over all its uses) on
/// the reference, and on the GPU for the curvature layers (the executor keeps only
/// those; each one lies behind the fan-outs, so a wrong sum would show there); the
/// Linear/Conv2d parameter gradients on both. BatchNorm's own parameter gradients are
/// not computed by ekfac (they are not curvature parameters). Same tolerance as the
/// chain cases on the GPU (1e-5); the f64 reference to 1e-10 (both sides f64 on the
/// same inputs: only summation order differs).
fn check_graph_fixture(ctx: &GpuContext, case: &str) {
    let fixture = NnFixture::load(case);
    let (model, data) = (&fixture.model, &fixture.data);
    let (grad_output, stack) = (&fixture.grad_output, fixture.stack);
    assert!(model.chain().is_none(), "{case} is a graph");
    let graph = &model.graph;
    let batch = data.len;
    let mut failures = Vec::new();

    // GPU.
    let network = Network::new(ctx, model).unwrap();
    let mut shape = vec![batch];
    shape.extend(&graph.shapes()[0]);
    // Backward runs on what a forward pass keeps (the rest is released, so a layer that
    // reads a value it did not declare fails); the values are read from a forward pass
    // that keeps them all.
    let forward = network
        .forward(ctx, ctx.upload(&data.x, &shape).unwrap())
        .unwrap();
    let kept = network.kept_values();
    assert!(
        kept.iter().any(|&k| !k),
        "{case}: the forward pass releases some values"
    );
    let values = network
        .forward_keeping_all(ctx, ctx.upload(&data.x, &shape).unwrap())
        .unwrap();
    for (v, &k) in kept.iter().enumerate() {
        assert_eq!(forward.value(v).is_released(), !k, "{case}: value {v}");
    }
    let g = ctx
        .upload(grad_output, &[stack, batch, network.num_outputs()])
        .unwrap();
    let backward = network.backward(ctx, &forward, &g, stack, true).unwrap();
    check(
        &mut failures,
        format!("{case}: GPU output"),
        &ctx.read(forward.output()).unwrap(),
        &fixture.get("output"),
    );
    for (i, node) in graph.nodes.iter().enumerate() {
        let got = ctx.read(values.value(i + 1)).unwrap();
        let want = fixture.get(&format!("nodes.{}.output", node.name));
        check(
            &mut failures,
            format!("{case}: GPU {}", node.name),
            &got,
            &want,
        );
    }
    let curvature = model.curvature_layers();
    assert!(curvature.len() >= 4, "{case}: curvature layers");
    for &l in &curvature {
        let (name, module) = (&graph.nodes[l].name, graph.nodes[l].module());
        let got = ctx.read(backward.output_grad(l)).unwrap();
        let want = fixture.get(&format!("nodes.{name}.output_grad"));
        check(
            &mut failures,
            format!("{case}: GPU {name} output_grad"),
            &got,
            &want,
        );
        let got = ctx.read(forward.layer_input(l)).unwrap();
        let want = fixture.get(&format!("layers.{module}.input"));
        check(
            &mut failures,
            format!("{case}: GPU {module} input"),
            &got,
            &want,
        );
        let (w, b) = backward.param_grads(l).expect("parameter gradients");
        let (weight, bias) = fixture.grads(module);
        check_param_grads(
            &mut failures,
            &format!("{case}: GPU {module}"),
            (
                &ctx.read(w).unwrap(),
                b.map(|b| ctx.read(b).unwrap()).as_deref(),
            ),
            (&weight, bias.as_deref()),
        );
    }

    // f64 reference.
    let net = nn::Network64::new(model);
    let x: Vec<f64> = data.x.iter().map(|&v| f64::from(v)).collect();
    let g64: Vec<f64> = grad_output.iter().map(|&v| f64::from(v)).collect();
    let values = net.forward(&x, batch);
    let (node_grads, param_grads) = net.backward(&values, &g64, batch, stack, true);
    let mut check64 = |what: String, got: &[f64], want: &[f64]| {
        let e = if got.len() == want.len() {
            let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
            let den: f64 = want.iter().map(|b| b * b).sum();
            (num / den.max(1e-300)).sqrt()
        } else {
            f64::INFINITY
        };
        if e.is_nan() || e > 1e-10 {
            failures.push(format!(
                "{case}: reference {what}: relative error {e:.3e} > 1e-10"
            ));
        }
    };
    for (i, node) in graph.nodes.iter().enumerate() {
        let name = &node.name;
        check64(
            format!("{name} output"),
            &values[i + 1],
            &fixture.get(&format!("nodes.{name}.output")),
        );
        check64(
            format!("{name} output_grad"),
            &node_grads[i],
            &fixture.get(&format!("nodes.{name}.output_grad")),
        );
    }
    for &l in &curvature {
        let module = graph.nodes[l].module();
        let p = param_grads[l].as_ref().expect("parameter gradients");
        let (weight, bias) = fixture.grads(module);
        check64(format!("grads.{module}.weight"), &p[0], &weight);
        if let Some(want) = bias {
            check64(
                format!("grads.{module}.bias"),
                p.get(1).map_or(&[][..], |b| &b[..]),
                &want,
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn diamond_graph_matches_pytorch_fixture() {
    let Some(ctx) = common::gpu() else { return };
    check_graph_fixture(&ctx, "diamond");
}

#[test]
fn resnet_graph_matches_pytorch_fixture() {
    let Some(ctx) = common::gpu() else { return };
    check_graph_fixture(&ctx, "resnet");
}

/// A released forward value keeps its shape but no memory: binding it in a kernel or
/// reading it back is an error naming it, never a read of stale memory.
#[test]
fn a_released_tensor_cannot_be_bound_or_read() {
    let Some(ctx) = common::gpu() else { return };
    let t = ctx.upload(&[1.0, 2.0, 3.0], &[3]).unwrap().released();
    assert!(t.is_released());
    assert_eq!(t.shape(), &[3]);
    let err = ctx.read(&t).unwrap_err().to_string();
    assert!(err.contains("released"), "{err}");
    let out = ctx.zeros(&[3]).unwrap();
    let mut rec = ctx.recorder();
    let err = ekfac::ops::reduce::copy(&mut rec, &t, 0, &out, 0, 3)
        .unwrap_err()
        .to_string();
    assert!(err.contains("released") && err.contains("[3]"), "{err}");
}
