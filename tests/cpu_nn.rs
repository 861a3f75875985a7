//! The f64 whole-network reference (`ekfac::reference::nn`): backward against central finite
//! differences of the forward, for an MLP and a CNN with every layer type.
//!
//! For a stack of output gradients `g [V, B, C]`, the backward's output gradient of layer
//! `l` is `∂/∂z_l ⟨g_v, f(x)⟩` per `v` (`z_l` the layer's output), and its parameter
//! gradients are `Σ_v ∂/∂θ ⟨g_v, f(x)⟩`. We differentiate numerically by re-running the
//! network from layer `l` with a perturbed `z_l` or perturbed f64 parameters.
//!
//! Tolerance: central differences with `h = 1e-6` in f64 have truncation error
//! `h²·|f'''|/6 ≈ 1e-13` and rounding error `ε·|f|/h ≈ 1e-16·10/1e-6 = 1e-9` (the
//! objectives here are O(1)–O(10)), against gradients of size O(0.1)–O(1), so relative
//! Frobenius errors near 1e-8 are expected (observed ≤ 5e-8); `1e-6` leaves a 20×
//! margin while a wrong index or factor would give O(1). Inputs are random, so no
//! ReLU input sits within `h` of 0 and no max-pool window has a tie (checked below),
//! where the network is not differentiable.

mod common;

use common::TestRng;
use ekfac::graph::chain::Layer;
use ekfac::graph::{Model, ModelSpec};
use ekfac::reference::{nn, ops};

const H: f64 = 1e-6;
const TOL: f64 = 1e-6;

fn spec(text: &str) -> ModelSpec {
    ModelSpec::from_json_str(text, "test model").unwrap()
}

/// Relative Frobenius error of two f64 vectors.
fn rel(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Layers `l+1..` of `model` applied to `z [rows, *shapes[l+1]]` (identity after the last).
fn tail(model: &Model, l: usize, z: &[f64], rows: usize) -> Vec<f64> {
    if l + 1 == model.chain().unwrap().layers.len() {
        return z.to_vec();
    }
    let shapes = model.shapes();
    let tail = Model {
        graph: ModelSpec {
            input_shape: shapes[l + 1].clone(),
            layers: model.chain().unwrap().layers[l + 1..].to_vec(),
        }
        .to_graph()
        .unwrap(),
        params: model.params[l + 1..].to_vec(),
    };
    nn::forward(&tail, z, rows).activations.pop().unwrap()
}

/// `⟨g_v, out_b⟩` for each `v`, with `out [B, C]`, `g [V, B, C]`.
fn objectives(out: &[f64], g: &[f64], stack: usize) -> Vec<f64> {
    let per_v = out.len();
    (0..stack)
        .map(|v| {
            g[v * per_v..(v + 1) * per_v]
                .iter()
                .zip(out)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

/// Output of linear/conv2d layer `l` on its input `x` with f64 parameters.
fn layer_out(
    model: &Model,
    l: usize,
    x: &[f64],
    batch: usize,
    w: &[f64],
    b: Option<&[f64]>,
) -> Vec<f64> {
    let input = &model.shapes()[l];
    match &model.chain().unwrap().layers[l] {
        Layer::Linear(s) => ops::linear_forward(x, w, b, batch, s.in_features, s.out_features),
        Layer::Conv2d(c) => ops::conv2d_forward(x, w, b, &c.geometry(batch, [input[1], input[2]])),
        other => panic!("{} has no parameters", other.kind()),
    }
}

/// Checks every output and parameter gradient of `model` at a random input against
/// central finite differences.
fn check_against_finite_differences(model: &Model, batch: usize, stack: usize, seed: u64) {
    let mut rng = TestRng::new(seed);
    let shapes = model.shapes();
    let x: Vec<f64> = (0..batch * shapes[0].iter().product::<usize>())
        .map(|_| rng.uniform())
        .collect();
    let c = model.num_outputs();
    let g: Vec<f64> = (0..stack * batch * c).map(|_| rng.uniform()).collect();
    let trace = nn::forward(model, &x, batch);
    assert_eq!(
        trace.activations.len(),
        model.chain().unwrap().layers.len() + 1
    );
    for (a, s) in trace.activations.iter().zip(&shapes) {
        assert_eq!(a.len(), batch * s.iter().product::<usize>());
    }
    assert_no_kinks(model, &trace);
    let back = nn::backward(model, &trace, &g, stack);
    let curvature = model.curvature_layers();
    assert_eq!(back.output_grads.len(), curvature.len());

    for (slot, &l) in curvature.iter().enumerate() {
        let label = model.graph.label(l);
        // Output gradient, per stack entry.
        let z = &trace.activations[l + 1];
        let mut fd = vec![0.0; stack * z.len()];
        for j in 0..z.len() {
            let mut zp = z.clone();
            zp[j] += H;
            let mut zm = z.clone();
            zm[j] -= H;
            let fp = objectives(&tail(model, l, &zp, batch), &g, stack);
            let fm = objectives(&tail(model, l, &zm, batch), &g, stack);
            for v in 0..stack {
                fd[v * z.len() + j] = (fp[v] - fm[v]) / (2.0 * H);
            }
        }
        let e = rel(&back.output_grads[slot], &fd);
        assert!(e < TOL, "{label}: output gradient rel. error {e:e}");

        // Parameter gradients, summed over the stack.
        let p = model.params[l].as_ref().unwrap();
        let w: Vec<f64> = p.weight().iter().map(|&v| v as f64).collect();
        let b: Option<Vec<f64>> = p
            .bias()
            .as_ref()
            .map(|b| b.iter().map(|&v| v as f64).collect());
        let x_l = &trace.activations[l];
        let total = |w: &[f64], b: Option<&[f64]>| -> f64 {
            let z = layer_out(model, l, x_l, batch, w, b);
            objectives(&tail(model, l, &z, batch), &g, stack)
                .iter()
                .sum()
        };
        let fd_w: Vec<f64> = (0..w.len())
            .map(|j| {
                let (mut wp, mut wm) = (w.clone(), w.clone());
                wp[j] += H;
                wm[j] -= H;
                (total(&wp, b.as_deref()) - total(&wm, b.as_deref())) / (2.0 * H)
            })
            .collect();
        let e = rel(&back.weight_grads[slot], &fd_w);
        assert!(e < TOL, "{label}: weight gradient rel. error {e:e}");
        match (&b, &back.bias_grads[slot]) {
            (Some(b), Some(got)) => {
                let fd_b: Vec<f64> = (0..b.len())
                    .map(|j| {
                        let (mut bp, mut bm) = (b.clone(), b.clone());
                        bp[j] += H;
                        bm[j] -= H;
                        (total(&w, Some(&bp)) - total(&w, Some(&bm))) / (2.0 * H)
                    })
                    .collect();
                let e = rel(got, &fd_b);
                assert!(e < TOL, "{label}: bias gradient rel. error {e:e}");
            }
            (None, None) => {}
            _ => panic!("{label}: bias gradient present iff the layer has a bias"),
        }
    }
}

/// Asserts no ReLU input is within 100·h of 0 and no max-pool window has two in-image
/// values within 100·h of each other at its maximum, so finite differences see a smooth
/// function.
fn assert_no_kinks(model: &Model, trace: &nn::ForwardTrace) {
    let shapes = model.shapes();
    for (l, layer) in model.chain().unwrap().layers.iter().enumerate() {
        let x = &trace.activations[l];
        match layer {
            Layer::Relu => assert!(x.iter().all(|v| v.abs() > 100.0 * H), "ReLU input near 0"),
            Layer::MaxPool2d(p) => {
                let [c, h, w] = [shapes[l][0], shapes[l][1], shapes[l][2]];
                let [oh, ow] = p.output_size([h, w]).unwrap();
                for plane in 0..trace.batch * c {
                    for (i, j) in (0..oh).flat_map(|i| (0..ow).map(move |j| (i, j))) {
                        let mut vals = Vec::new();
                        for kh in 0..p.kernel_size[0] {
                            for kw in 0..p.kernel_size[1] {
                                let r = (i * p.stride[0] + kh).checked_sub(p.padding[0]);
                                let s = (j * p.stride[1] + kw).checked_sub(p.padding[1]);
                                if let (Some(r), Some(s)) = (r, s)
                                    && r < h
                                    && s < w
                                {
                                    vals.push(x[(plane * h + r) * w + s]);
                                }
                            }
                        }
                        vals.sort_by(|a, b| b.total_cmp(a));
                        if vals.len() > 1 {
                            assert!(vals[0] - vals[1] > 100.0 * H, "max-pool near-tie");
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

#[test]
fn mlp_backward_matches_finite_differences() {
    let mut rng = TestRng::new(1);
    let model = common::random_model(
        spec(
            r#"{"input_shape": [5], "layers": [
            {"type": "linear", "name": "fc1", "in_features": 5, "out_features": 7},
            {"type": "sigmoid"},
            {"type": "linear", "name": "fc2", "in_features": 7, "out_features": 6, "bias": false},
            {"type": "relu"},
            {"type": "linear", "name": "fc3", "in_features": 6, "out_features": 6},
            {"type": "tanh"},
            {"type": "linear", "name": "out", "in_features": 6, "out_features": 3}]}"#,
        ),
        &mut rng,
    );
    check_against_finite_differences(&model, 3, 2, 11);
}

#[test]
fn cnn_backward_matches_finite_differences() {
    let mut rng = TestRng::new(2);
    let model = common::random_model(spec(common::EVERY_LAYER_CNN), &mut rng);
    assert_eq!(model.shapes()[3], vec![6, 6, 5]);
    assert_eq!(model.shapes()[7], vec![4, 5, 4]);
    check_against_finite_differences(&model, 2, 3, 12);
}

/// The forward of a small MLP against plain loops written here.
#[test]
fn mlp_forward_matches_plain_loops() {
    let mut rng = TestRng::new(3);
    let model = common::random_model(
        spec(
            r#"{"input_shape": [4], "layers": [
            {"type": "linear", "name": "a", "in_features": 4, "out_features": 3},
            {"type": "tanh"},
            {"type": "linear", "name": "b", "in_features": 3, "out_features": 2, "bias": false}]}"#,
        ),
        &mut rng,
    );
    let batch = 3;
    let x: Vec<f64> = (0..batch * 4).map(|_| rng.uniform()).collect();
    let out = nn::forward(&model, &x, batch).activations.pop().unwrap();
    let a = model.params[0].as_ref().unwrap();
    let b = model.params[2].as_ref().unwrap();
    for n in 0..batch {
        let hidden: Vec<f64> = (0..3)
            .map(|o| {
                let s: f64 = (0..4)
                    .map(|i| a.weight()[o * 4 + i] as f64 * x[n * 4 + i])
                    .sum();
                (s + a.bias().as_ref().unwrap()[o] as f64).tanh()
            })
            .collect();
        for o in 0..2 {
            let want: f64 = (0..3)
                .map(|i| b.weight()[o * 3 + i] as f64 * hidden[i])
                .sum();
            assert!((out[n * 2 + o] - want).abs() < 1e-14, "output [{n}, {o}]");
        }
    }
}

/// Forward and backward against the committed PyTorch fixtures (`tests/fixtures/nn/`,
/// computed in float64 on the same float32 weights and inputs). Both sides are f64
/// with different summation orders over at most a few hundred terms, so they agree to
/// ~1e-14 relative; `1e-10` is tight enough to catch any wrong index or tie-break.
fn check_fixture(case: &str) {
    use ekfac::model::{Dataset, TensorFile};
    const FIXTURE_TOL: f64 = 1e-10;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/nn")
        .join(case);
    let model = Model::load(dir.join("model.json"), dir.join("weights.safetensors")).unwrap();
    let data = Dataset::load_checked(dir.join("data.safetensors"), &model.graph, true).unwrap();
    let expected = TensorFile::load(dir.join("expected.safetensors")).unwrap();
    let get = |key: &str| {
        let t = expected
            .get(key)
            .unwrap_or_else(|| panic!("{case}: no {key}"));
        (t.shape.to_vec(), t.to_f64().unwrap())
    };
    let n = data.len;
    let x: Vec<f64> = data.x.iter().map(|&v| v as f64).collect();
    let trace = nn::forward(&model, &x, n);
    let (shape, output) = get("output");
    assert_eq!(shape, vec![n, model.num_outputs()]);
    let e = rel(trace.activations.last().unwrap(), &output);
    assert!(e < FIXTURE_TOL, "{case}: output rel. error {e:e}");

    let (shape, grad_output) = get("grad_output");
    let stack = shape[0];
    let back = nn::backward(&model, &trace, &grad_output, stack);
    for (slot, &l) in model.curvature_layers().iter().enumerate() {
        let name = model.chain().unwrap().layers[l].name().unwrap();
        let checks = [
            ("input", &trace.activations[l]),
            ("output", &trace.activations[l + 1]),
            ("output_grad", &back.output_grads[slot]),
        ];
        for (what, got) in checks {
            let want = get(&format!("layers.{name}.{what}")).1;
            let e = rel(got, &want);
            assert!(
                e < FIXTURE_TOL,
                "{case}: layer {name} {what} rel. error {e:e}"
            );
        }
        let (shape, want) = get(&format!("grads.{name}.weight"));
        assert_eq!(Some(shape), model.chain().unwrap().layers[l].weight_shape());
        let e = rel(&back.weight_grads[slot], &want);
        assert!(
            e < FIXTURE_TOL,
            "{case}: {name}.weight gradient rel. error {e:e}"
        );
        match (
            &back.bias_grads[slot],
            expected.get(&format!("grads.{name}.bias")),
        ) {
            (Some(got), Some(want)) => {
                let e = rel(got, &want.to_f64().unwrap());
                assert!(
                    e < FIXTURE_TOL,
                    "{case}: {name}.bias gradient rel. error {e:e}"
                );
            }
            (None, None) => {}
            _ => panic!("{case}: {name}: bias gradient present on one side only"),
        }
    }
}

#[test]
fn mlp_matches_pytorch_fixture() {
    check_fixture("mlp");
}

#[test]
fn cnn_with_max_pool_ties_matches_pytorch_fixture() {
    check_fixture("cnn");
}

#[test]
fn cnn_b_matches_pytorch_fixture() {
    check_fixture("cnn_b");
}
