//! The attention ops of issue 11 — batched `matmul`, `softmax` over the last dim,
//! `masked_fill` with a constant mask and `scaled_dot_product_attention` — forward
//! and the backward of a stack of vectors, against PyTorch autograd fixtures
//! (`tests/fixtures/ops/`), the f64 reference, and each other.

mod common;
mod op_fixtures;

use common::TestRng;
use ekfac::graph::Node;
use ekfac::layers::{BackwardArgs, ForwardArgs};
use ekfac::reference::attention as reference;
use op_fixtures::{OpFixture, Tolerances, rel_err64};
use serde_json::json;

/// GEMM results in f32 with K ≤ 70 products per element: each element's rounding error
/// is at most about `K·2⁻²⁴ ≈ 4e-6` of `Σ|a·b|`; over random signs the errors add
/// like a random walk, `√K·2⁻²⁴ ≈ 5e-7` of `‖a‖‖b‖` (4e-8 relative observed): 1e-6.
const MATMUL_TOL: f64 = 1e-6;

/// Softmax: `x − max` is exact for the entries that matter (Sterbenz), `exp` is within
/// a few ulp over `|x − max| ≲ 20` where the probabilities are not negligible, and the
/// row sum adds `√n·2⁻²⁴` (random-walk rounding, n ≤ 300): 1e-6 forward (6e-8
/// observed). Backward `y ⊙ (g − Σ g y)` adds the dot product's rounding relative to
/// `|g|`, of the same size: 1e-6.
const SOFTMAX_TOL: f64 = 1e-6;

fn node(op: &str, inputs: usize, attrs: serde_json::Value) -> Node {
    let names = (0..inputs).map(|i| format!("x{i}")).collect();
    Node::new(
        "blocks.0.attn",
        op,
        names,
        attrs.as_object().cloned().unwrap_or_default(),
    )
}

fn build_err(op: &str, attrs: serde_json::Value, shapes: &[&[usize]]) -> String {
    ekfac::layers::build(&node(op, shapes.len(), attrs), shapes)
        .unwrap_err()
        .to_string()
}

#[test]
fn matmul_layers_match_pytorch() {
    for name in ["matmul_heads", "matmul_tiles"] {
        let f = OpFixture::load(name);
        assert_eq!(f.op, "matmul");
        let tol = Tolerances {
            forward: MATMUL_TOL,
            backward: MATMUL_TOL,
        };
        op_fixtures::check_layer(&f, tol);
    }
}

/// Shapes that are not `[*, M, K]`·`[*, K, N]` with equal leading dims are refused,
/// naming the node and both shapes.
#[test]
fn matmul_refuses_bad_shapes() {
    for (a, b, why) in [
        (&[2, 3, 4][..], &[2, 5, 6][..], "inner dims differ"),
        (&[2, 3, 4], &[3, 4, 6], "leading dims differ"),
        (&[4], &[4, 6], "at least 2 dims"),
        (&[3, 4, 5], &[5, 6], "leading dims differ"),
    ] {
        let err = build_err("matmul", json!({}), &[a, b]);
        assert!(
            err.contains("node \"blocks.0.attn\"") && err.contains(why) && err.contains("[B, "),
            "{err}"
        );
    }
    let err = build_err("matmul", json!({}), &[&[2, 3]]);
    assert!(err.contains("two inputs"), "{err}");
    let err = build_err("matmul", json!({"transpose": true}), &[&[2, 3], &[3, 2]]);
    assert!(err.contains("unknown attribute \"transpose\""), "{err}");
}

#[test]
fn softmax_layers_match_pytorch() {
    for name in [
        "softmax_rows",
        "softmax_wide",
        "softmax_large_logits",
        "softmax_one_kept",
    ] {
        let f = OpFixture::load(name);
        assert_eq!(f.op, "softmax");
        let tol = Tolerances {
            forward: SOFTMAX_TOL,
            backward: SOFTMAX_TOL,
        };
        let Some((y, _)) = op_fixtures::check_layer(&f, tol) else {
            continue;
        };
        // Entries at float32's lowest value (masked) get exactly 0.
        let x = f.values("x");
        for (i, (&x, &y)) in x.iter().zip(&y).enumerate() {
            if x == f64::from(f32::MIN) {
                assert_eq!(y, 0.0, "{name}: y[{i}] of a masked entry");
            }
        }
    }
}

/// `-inf` entries (what `masked_fill(mask, -inf)` leaves): rows with all but one
/// entry at `-inf` give exactly one-hot probabilities and zero gradients, rows with a
/// few give the f64 reference's values; on the GPU for a stack of 2 gradients.
#[test]
fn softmax_of_minus_infinity_entries() {
    let Some(ctx) = common::gpu() else { return };
    let n = 6;
    let mut rng = TestRng::new(7);
    let mut x = rng.vec(5 * n);
    let kept: [&[usize]; 5] = [&[3], &[0], &[5], &[1, 2], &[0, 2, 4, 5]];
    for (r, keep) in kept.iter().enumerate() {
        for j in 0..n {
            if !keep.contains(&j) {
                x[r * n + j] = f32::NEG_INFINITY;
            }
        }
    }
    let g = rng.vec(2 * x.len());
    let layer = ekfac::layers::build(&node("softmax", 1, json!({"dim": -1})), &[&[n]]).unwrap();
    let xg = ctx.upload(&x, &[5, n]).unwrap();
    let gg = ctx.upload(&g, &[10, n]).unwrap();
    let (y, dx) = op_fixtures::run_gpu(&ctx, layer.as_ref(), 5, 2, &[&xg], &[], &gg);
    let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let g64: Vec<f64> = g.iter().map(|&v| f64::from(v)).collect();
    let want_y = reference::softmax_forward(&x64, n, None);
    let want_dx = reference::softmax_backward(&want_y, &g64, n);
    let y64: Vec<f64> = y.iter().map(|&v| f64::from(v)).collect();
    let dx64: Vec<f64> = dx[0].iter().map(|&v| f64::from(v)).collect();
    for r in 0..3 {
        for j in 0..n {
            let want = if kept[r].contains(&j) { 1.0 } else { 0.0 };
            assert_eq!(y[r * n + j], want, "row {r}");
            for v in 0..2 {
                assert_eq!(dx[0][(v * 5 + r) * n + j], 0.0, "row {r}, vector {v}");
            }
        }
    }
    let e = rel_err64(&y64, &want_y);
    assert!(e < SOFTMAX_TOL, "forward error {e:e}");
    let e = rel_err64(&dx64, &want_dx);
    assert!(e < SOFTMAX_TOL, "backward error {e:e}");
}

/// `dim` must be the last dim; errors name the node and the attribute.
#[test]
fn softmax_refuses_other_dims() {
    for dim in [json!(1), json!(-2), json!(0), json!("last")] {
        let err = build_err("softmax", json!({ "dim": dim }), &[&[3, 4]]);
        assert!(
            err.contains("node \"blocks.0.attn\"") && err.contains("\"dim\""),
            "{err}"
        );
    }
    let err = build_err("softmax", json!({}), &[&[3, 4]]);
    assert!(err.contains("missing attribute \"dim\""), "{err}");
    for dim in [-1, 2] {
        let layer =
            ekfac::layers::build(&node("softmax", 1, json!({ "dim": dim })), &[&[3, 4]]).unwrap();
        assert_eq!(layer.output_shape(), &[3, 4]);
    }
}

/// The reference softmax of one row by hand, and its Jacobian–vector identity: the
/// gradient is orthogonal to the ones vector.
#[test]
fn softmax_reference_by_hand() {
    let y = reference::softmax_forward(&[0.0, 2f64.ln(), f64::NEG_INFINITY], 3, None);
    assert!((y[0] - 1.0 / 3.0).abs() < 1e-15 && (y[1] - 2.0 / 3.0).abs() < 1e-15);
    assert_eq!(y[2], 0.0);
    let gx = reference::softmax_backward(&y, &[1.0, -1.0, 5.0], 3);
    assert!(gx.iter().sum::<f64>().abs() < 1e-15);
    // d y0 / d x0 = y0 (1 − y0), d y1 / d x0 = −y0 y1: (1, −1)·J = (2/9 + 2/9, ...).
    assert!((gx[0] - 4.0 / 9.0).abs() < 1e-15, "{gx:?}");
    let layer = ekfac::layers::build(&node("softmax", 1, json!({"dim": -1})), &[&[3]]).unwrap();
    let out = layer.reference_forward(&ForwardArgs {
        batch: 1,
        inputs: &[&[0.0, 2f64.ln(), f64::NEG_INFINITY]],
        params: &[],
    });
    let back = layer.reference_backward(&BackwardArgs {
        stack: 1,
        batch: 1,
        grad_out: &[1.0, -1.0, 5.0],
        inputs: &[&[0.0, 2f64.ln(), f64::NEG_INFINITY]],
        output: &out,
        params: &[],
        input_grads: &[true],
        param_grads: false,
    });
    assert_eq!(back.inputs[0].as_deref(), Some(&gx[..]));
}

/// Scaled dot-product attention: two GEMMs with K ≤ 8 around a softmax, each within
/// the bounds above; the backward chains four GEMMs and the softmax backward: 2e-6.
const SDPA_TOL: f64 = 2e-6;

/// masked_fill is exact: it copies values or writes the fill value (float32-exact
/// here), and backward copies or zeroes.
#[test]
fn masked_fill_layers_match_pytorch() {
    for name in ["masked_fill_causal", "masked_fill_broadcast"] {
        let f = OpFixture::load(name);
        assert_eq!(f.op, "masked_fill");
        let tol = Tolerances {
            forward: 0.0,
            backward: 0.0,
        };
        op_fixtures::check_layer(&f, tol);
    }
}

/// Causal attention written by hand: `masked_fill(~tril, -inf)` then softmax, on the
/// GPU for a stack of 2 vectors, against the f64 reference: the masked probabilities
/// and their gradients are exactly 0, the first row is exactly one-hot.
#[test]
fn masked_fill_minus_infinity_then_softmax() {
    let Some(ctx) = common::gpu() else { return };
    let (heads, t) = (2, 5);
    let upper: Vec<u8> = (0..t * t).map(|i| u8::from(i % t > i / t)).collect();
    let fill = ekfac::layers::build(
        &node(
            "masked_fill",
            1,
            json!({"mask_shape": [t, t], "mask": upper, "value": "-inf"}),
        ),
        &[&[heads, t, t]],
    )
    .unwrap();
    let softmax =
        ekfac::layers::build(&node("softmax", 1, json!({"dim": -1})), &[&[heads, t, t]]).unwrap();
    let batch = 3;
    let len = batch * heads * t * t;
    let mut rng = TestRng::new(21);
    let x: Vec<f32> = rng.vec(len).iter().map(|v| 4.0 * v).collect();
    let g = rng.vec(2 * len);
    let shape = [batch, heads, t, t];
    let xg = ctx.upload(&x, &shape).unwrap();
    let gg = ctx.upload(&g, &[2 * batch, heads, t, t]).unwrap();
    // Forward through both, then backward through both, in one pass.
    let mut pass = ekfac::layers::Pass::new(&ctx);
    let filled = fill
        .forward(
            &mut pass,
            &ForwardArgs {
                batch,
                inputs: &[&xg],
                params: &[],
            },
        )
        .unwrap();
    let y = softmax
        .forward(
            &mut pass,
            &ForwardArgs {
                batch,
                inputs: &[&filled],
                params: &[],
            },
        )
        .unwrap();
    let backward = |layer: &dyn ekfac::layers::Layer,
                    pass: &mut ekfac::layers::Pass,
                    input: &ekfac::gpu::GpuTensor,
                    output: &ekfac::gpu::GpuTensor,
                    grad_out: &ekfac::gpu::GpuTensor| {
        let args = BackwardArgs {
            stack: 2,
            batch,
            grad_out,
            inputs: &[input],
            output,
            params: &[],
            input_grads: &[true],
            param_grads: false,
        };
        layer
            .backward(pass, &args)
            .unwrap()
            .inputs
            .remove(0)
            .unwrap()
    };
    let g_filled = backward(softmax.as_ref(), &mut pass, &filled, &y, &gg);
    let gx = backward(fill.as_ref(), &mut pass, &xg, &filled, &g_filled);
    pass.submit().unwrap();
    let (y, gx) = (ctx.read(&y).unwrap(), ctx.read(&gx).unwrap());

    let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let g64: Vec<f64> = g.iter().map(|&v| f64::from(v)).collect();
    let filled64 = fill.reference_forward(&ForwardArgs {
        batch,
        inputs: &[&x64],
        params: &[],
    });
    assert!(filled64.contains(&f64::NEG_INFINITY));
    let want_y = reference::softmax_forward(&filled64, t, None);
    let want_gx = reference::masked_fill_backward(
        &reference::softmax_backward(&want_y, &g64, t),
        &upper.iter().map(|&u| u == 1).collect::<Vec<_>>(),
    );
    for i in 0..len {
        if upper[i % (t * t)] == 1 {
            assert_eq!(y[i], 0.0, "y[{i}]");
            assert_eq!((gx[i], gx[len + i]), (0.0, 0.0), "gx[{i}]");
        }
        if i % (t * t) == 0 {
            assert_eq!(y[i], 1.0, "first query attends to itself only");
        }
    }
    let read = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    let e = rel_err64(&read(&y), &want_y);
    assert!(e < SOFTMAX_TOL, "forward error {e:e}");
    let e = rel_err64(&read(&gx), &want_gx);
    assert!(e < SOFTMAX_TOL, "backward error {e:e}");
}

/// Bad masks and values are refused naming the node and the attribute; a row of the
/// last dim filled with -inf entirely (NaN after a softmax) is refused.
#[test]
fn masked_fill_refusals() {
    let shape: &[usize] = &[2, 3, 3];
    let attrs = |mask_shape: serde_json::Value,
                 mask: serde_json::Value,
                 value: serde_json::Value| {
        json!({"mask_shape": mask_shape, "mask": mask, "value": value})
    };
    let tril = json!([1, 0, 0, 1, 1, 0, 1, 1, 1]);
    for (a, want) in [
        (
            attrs(json!([3, 3]), json!([1, 0]), json!(0)),
            "has 2 values",
        ),
        (
            attrs(json!([2, 3]), json!(vec![0; 6]), json!(0)),
            "does not broadcast",
        ),
        (
            attrs(json!([2, 1, 1, 1]), json!([0, 1]), json!(0)),
            "does not broadcast",
        ),
        (
            attrs(json!([1, 1, 2, 3, 3]), json!(vec![0; 18]), json!(0)),
            "does not broadcast",
        ),
        (
            attrs(json!([3, 3]), json!([0, 1, 2, 0, 0, 0, 0, 0, 0]), json!(0)),
            "0 and 1",
        ),
        (attrs(json!([3, 3]), tril.clone(), json!(1e300)), "overflow"),
        (
            attrs(json!([3, 3]), tril.clone(), json!("nan")),
            "\"value\"",
        ),
        (attrs(json!([3, 3]), tril.clone(), json!("-inf")), "row 2"),
        (
            json!({"mask_shape": [3, 3], "mask": tril}),
            "missing attribute \"value\"",
        ),
    ] {
        let err = build_err("masked_fill", a, &[shape]);
        assert!(
            err.contains("node \"blocks.0.attn\"") && err.contains(want),
            "{want}: {err}"
        );
    }
    // -inf is fine where every row keeps an entry; a leading 1 over the batch axis too.
    for mask_shape in [json!([3, 3]), json!([1, 1, 3, 3])] {
        let ok = attrs(
            mask_shape,
            json!([0, 1, 1, 0, 0, 1, 0, 0, 0]),
            json!("-inf"),
        );
        ekfac::layers::build(&node("masked_fill", 1, ok), &[shape]).unwrap();
    }
}

#[test]
fn sdpa_layers_match_pytorch() {
    for name in [
        "sdpa_plain",
        "sdpa_causal",
        "sdpa_causal_rect",
        "sdpa_mask",
        "sdpa_mask_heads",
    ] {
        let f = OpFixture::load(name);
        assert_eq!(f.op, "scaled_dot_product_attention");
        let tol = Tolerances {
            forward: SDPA_TOL,
            backward: SDPA_TOL,
        };
        op_fixtures::check_layer(&f, tol);
    }
}

/// Random q, k, v `[batch, *lead, L, E]` etc. and a stack of `stack` output gradients.
struct Problem {
    batch: usize,
    q: (Vec<f32>, Vec<usize>),
    k: (Vec<f32>, Vec<usize>),
    v: (Vec<f32>, Vec<usize>),
    g: (Vec<f32>, Vec<usize>),
    stack: usize,
}

impl Problem {
    fn new(
        seed: u64,
        batch: usize,
        lead: &[usize],
        [l, s, e, ev]: [usize; 4],
        stack: usize,
    ) -> Self {
        let mut rng = TestRng::new(seed);
        let mut make = |rows: usize, inner: [usize; 2], scale: f32| {
            let mut shape = vec![rows];
            shape.extend(lead);
            shape.extend(inner);
            let len: usize = shape.iter().product();
            let values: Vec<f32> = rng.vec(len).iter().map(|x| x * scale).collect();
            (values, shape)
        };
        Self {
            batch,
            q: make(batch, [l, e], 2.0),
            k: make(batch, [s, e], 2.0),
            v: make(batch, [s, ev], 1.0),
            g: make(stack * batch, [l, ev], 1.0),
            stack,
        }
    }

    fn example(t: &(Vec<f32>, Vec<usize>)) -> &[usize] {
        &t.1[1..]
    }

    fn layer(&self, attrs: serde_json::Value) -> Box<dyn ekfac::layers::Layer> {
        let shapes = [
            Self::example(&self.q),
            Self::example(&self.k),
            Self::example(&self.v),
        ];
        ekfac::layers::build(&node("scaled_dot_product_attention", 3, attrs), &shapes).unwrap()
    }

    /// The layer's output and (dQ, dK, dV) on the GPU.
    fn run_gpu(
        &self,
        ctx: &ekfac::gpu::GpuContext,
        layer: &dyn ekfac::layers::Layer,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let up = |t: &(Vec<f32>, Vec<usize>)| ctx.upload(&t.0, &t.1).unwrap();
        let (q, k, v, g) = (up(&self.q), up(&self.k), up(&self.v), up(&self.g));
        op_fixtures::run_gpu(ctx, layer, self.batch, self.stack, &[&q, &k, &v], &[], &g)
    }
}

/// The GPU layer against the f64 reference on a larger problem than the fixtures
/// (more than one 64-row tile of scores, heads, a stack of 3), with and without a
/// causal mask, and on degenerate sizes where the GEMMs become matrix–vector products
/// (one query, one key, value width 1; rows of 300 keys, longer than the softmax's
/// workgroup).
#[test]
fn sdpa_gpu_matches_reference() {
    let Some(ctx) = common::gpu() else { return };
    let cases = [
        (31, &[3][..], [70, 66, 16, 8], json!({"is_causal": false})),
        (
            31,
            &[3],
            [70, 66, 16, 8],
            json!({"is_causal": true, "scale": 0.2}),
        ),
        (32, &[], [1, 7, 3, 1], json!({})),
        (33, &[2, 2], [6, 1, 5, 2], json!({"is_causal": true})),
        (34, &[], [3, 300, 4, 2], json!({})),
    ];
    for (seed, lead, sizes, attrs) in cases {
        let p = Problem::new(seed, 2, lead, sizes, 3);
        let layer = p.layer(attrs.clone());
        let (y, grads) = p.run_gpu(&ctx, layer.as_ref());
        let f64s = |t: &[f32]| t.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
        let (q, k, v, g) = (f64s(&p.q.0), f64s(&p.k.0), f64s(&p.v.0), f64s(&p.g.0));
        let want_y = layer.reference_forward(&ForwardArgs {
            batch: p.batch,
            inputs: &[&q, &k, &v],
            params: &[],
        });
        let want = layer.reference_backward(&BackwardArgs {
            stack: p.stack,
            batch: p.batch,
            grad_out: &g,
            inputs: &[&q, &k, &v],
            output: &want_y,
            params: &[],
            input_grads: &[true; 3],
            param_grads: false,
        });
        let e = rel_err64(&f64s(&y), &want_y);
        assert!(e < SDPA_TOL, "{attrs}: forward error {e:e}");
        for (name, (got, want)) in ["dQ", "dK", "dV"]
            .iter()
            .zip(grads.iter().zip(&want.inputs))
        {
            let e = rel_err64(&f64s(got), want.as_ref().unwrap());
            // K up to 70 in the backward GEMMs: the matmul bound.
            assert!(e < 1e-5, "{attrs}: {name} error {e:e}");
        }
    }
}

/// The records of one layer's stacked backward: every input gradient.
fn backward_all(
    layer: &dyn ekfac::layers::Layer,
    pass: &mut ekfac::layers::Pass,
    (batch, stack): (usize, usize),
    inputs: &[&ekfac::gpu::GpuTensor],
    output: &ekfac::gpu::GpuTensor,
    grad_out: &ekfac::gpu::GpuTensor,
) -> Vec<ekfac::gpu::GpuTensor> {
    let args = BackwardArgs {
        stack,
        batch,
        grad_out,
        inputs,
        output,
        params: &[],
        input_grads: &vec![true; inputs.len()],
        param_grads: false,
    };
    let grads = layer.backward(pass, &args).unwrap();
    grads.inputs.into_iter().map(Option::unwrap).collect()
}

/// `[rows, a, b]` → `[rows, b, a]` on the host.
fn transpose_last(x: &[f32], rows: usize, a: usize, b: usize) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for r in 0..rows {
        for i in 0..a {
            for j in 0..b {
                y[(r * b + j) * a + i] = x[(r * a + i) * b + j];
            }
        }
    }
    y
}

/// Causal SDPA against the attention a model writes by hand: `matmul(q·scale, kᵀ)`,
/// `masked_fill(~tril, -inf)`, `softmax`, `matmul(·, v)`, all as GPU layers, forward
/// and the backward of a stack of 2. The scale 1/4 is a power of two, so scaling q
/// first or the scores afterwards rounds alike; the two differ only in how the masked
/// entries are skipped (left out vs. exp(-inf) = 0): 1e-6.
#[test]
fn sdpa_equals_matmul_softmax_matmul() {
    let Some(ctx) = common::gpu() else { return };
    let (heads, [l, s, e, ev]) = (2, [5, 6, 4, 3]);
    let p = Problem::new(41, 2, &[heads], [l, s, e, ev], 2);
    let (batch, stack, rows) = (p.batch, p.stack, p.batch * heads);
    let scale = 0.25;
    let sdpa = p.layer(json!({"is_causal": true, "scale": scale}));
    let (y, grads) = p.run_gpu(&ctx, sdpa.as_ref());

    let upper: Vec<u8> = (0..l * s).map(|i| u8::from(i % s > i / s)).collect();
    let build = |op: &str, n: usize, attrs: serde_json::Value, shapes: &[&[usize]]| {
        ekfac::layers::build(&node(op, n, attrs), shapes).unwrap()
    };
    let mm1 = build("matmul", 2, json!({}), &[&[heads, l, e], &[heads, e, s]]);
    let fill = build(
        "masked_fill",
        1,
        json!({"mask_shape": [l, s], "mask": upper, "value": "-inf"}),
        &[&[heads, l, s]],
    );
    let sm = build("softmax", 1, json!({"dim": -1}), &[&[heads, l, s]]);
    let mm2 = build("matmul", 2, json!({}), &[&[heads, l, s], &[heads, s, ev]]);
    let q_scaled: Vec<f32> = p.q.0.iter().map(|x| x * scale as f32).collect();
    let k_t = transpose_last(&p.k.0, rows, s, e);
    let q = ctx.upload(&q_scaled, &p.q.1).unwrap();
    let k = ctx.upload(&k_t, &[batch, heads, e, s]).unwrap();
    let v = ctx.upload(&p.v.0, &p.v.1).unwrap();
    let g = ctx.upload(&p.g.0, &p.g.1).unwrap();
    let mut pass = ekfac::layers::Pass::new(&ctx);
    let fwd = |layer: &dyn ekfac::layers::Layer,
               pass: &mut ekfac::layers::Pass,
               inputs: &[&ekfac::gpu::GpuTensor]| {
        layer
            .forward(
                pass,
                &ForwardArgs {
                    batch,
                    inputs,
                    params: &[],
                },
            )
            .unwrap()
    };
    let scores = fwd(mm1.as_ref(), &mut pass, &[&q, &k]);
    let filled = fwd(fill.as_ref(), &mut pass, &[&scores]);
    let probs = fwd(sm.as_ref(), &mut pass, &[&filled]);
    let out = fwd(mm2.as_ref(), &mut pass, &[&probs, &v]);
    let bs = (batch, stack);
    let d2 = backward_all(mm2.as_ref(), &mut pass, bs, &[&probs, &v], &out, &g);
    let d_sm = backward_all(sm.as_ref(), &mut pass, bs, &[&filled], &probs, &d2[0]);
    let d_fill = backward_all(fill.as_ref(), &mut pass, bs, &[&scores], &filled, &d_sm[0]);
    let d1 = backward_all(mm1.as_ref(), &mut pass, bs, &[&q, &k], &scores, &d_fill[0]);
    pass.submit().unwrap();

    let f64s = |t: &[f32]| t.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    let want_y = ctx.read(&out).unwrap();
    let want_dq: Vec<f32> = ctx
        .read(&d1[0])
        .unwrap()
        .iter()
        .map(|x| x * scale as f32)
        .collect();
    let want_dk = transpose_last(&ctx.read(&d1[1]).unwrap(), stack * rows, e, s);
    let want_dv = ctx.read(&d2[1]).unwrap();
    let e_y = rel_err64(&f64s(&y), &f64s(&want_y));
    assert!(e_y < 1e-6, "forward {e_y:e}");
    for (name, (got, want)) in ["dQ", "dK", "dV"]
        .iter()
        .zip(grads.iter().zip([want_dq, want_dk, want_dv]))
    {
        let err = rel_err64(&f64s(got), &f64s(&want));
        assert!(err < 1e-6, "{name}: {err:e}");
    }
}

/// Under a tiny memory budget the attention runs one problem (example × head) at a
/// time: the same numbers as in one chunk (each score and each output element is
/// computed by the same kernels in the same order; no GEMM here is long enough for
/// split-K), and a peak GPU memory lower by at least the workspace of the other
/// problems (less the parameter words of the extra dispatches, 256 bytes each at most:
/// 90 instead of 15 here, far below the 5 · 15 KiB saved).
#[test]
fn sdpa_chunked_by_memory_budget_equals_unchunked() {
    let Some(ctx) = common::gpu() else { return };
    let (heads, [l, s, e, ev]) = (2, [32, 40, 8, 8]);
    let p = Problem::new(51, 3, &[heads], [l, s, e, ev], 2);
    let keep: Vec<u8> = (0..heads * s).map(|i| u8::from(i % 3 != 1)).collect();
    let layer = p.layer(json!({"attn_mask_shape": [heads, 1, s], "attn_mask": keep}));
    let budget = ctx.memory_budget();
    let per_problem = 3 * 4 * (l * s) as u64;
    assert!(layer.workspace_bytes(&ctx) >= per_problem * (p.batch * heads) as u64);
    ctx.memory().reset_peak();
    let whole = p.run_gpu(&ctx, layer.as_ref());
    let peak_whole = ctx.memory().peak_bytes();
    ctx.set_memory_budget(1);
    assert_eq!(layer.workspace_bytes(&ctx), per_problem);
    ctx.memory().reset_peak();
    let chunked = p.run_gpu(&ctx, layer.as_ref());
    let peak_chunked = ctx.memory().peak_bytes();
    ctx.set_memory_budget(budget);
    assert_eq!(whole.0, chunked.0, "forward");
    for (i, (a, b)) in whole.1.iter().zip(&chunked.1).enumerate() {
        assert_eq!(a, b, "gradient of input {i}");
    }
    let problems = (p.batch * heads) as u64;
    assert!(
        peak_whole >= peak_chunked + (problems - 1) * per_problem,
        "peak {peak_whole} unchunked vs {peak_chunked} chunked"
    );
}

/// A query row with every key masked (NaN in PyTorch) is refused when the layer is
/// built, naming the node and the query; so are `is_causal` with an explicit mask,
/// and shapes that do not fit.
#[test]
fn sdpa_refusals() {
    let (q, k, v): (&[usize], &[usize], &[usize]) = (&[2, 3, 4], &[2, 5, 4], &[2, 5, 6]);
    let mut rows = vec![1u8; 15];
    rows[10..15].fill(0);
    let err = build_err(
        "scaled_dot_product_attention",
        json!({"attn_mask_shape": [3, 5], "attn_mask": rows}),
        &[q, k, v],
    );
    assert!(
        err.contains("node \"blocks.0.attn\"") && err.contains("masks every key of query 2"),
        "{err}"
    );
    // A per-head mask whose second head sees no key.
    let err = build_err(
        "scaled_dot_product_attention",
        json!({"attn_mask_shape": [2, 1, 5], "attn_mask": [0, 1, 0, 0, 0, 0, 0, 0, 0, 0]}),
        &[q, k, v],
    );
    assert!(err.contains("masks every key of query 0"), "{err}");
    for (attrs, shapes, want) in [
        (
            json!({"is_causal": true, "attn_mask_shape": [3, 5], "attn_mask": vec![1; 15]}),
            [q, k, v],
            "is_causal",
        ),
        (json!({}), [q, &[2, 5, 3][..], v], "width"),
        (json!({}), [q, k, &[2, 4, 6][..]], "length"),
        (
            json!({}),
            [q, &[3, 5, 4][..], &[3, 5, 6][..]],
            "leading dims",
        ),
        (json!({}), [&[4][..], k, v], "at least 2 dims"),
        (json!({"scale": "sqrt"}), [q, k, v], "\"scale\""),
        (json!({"is_causal": 1}), [q, k, v], "\"is_causal\""),
        (json!({"dropout_p": 0.1}), [q, k, v], "dropout_p"),
        (
            json!({"attn_mask_shape": [4, 5], "attn_mask": vec![1; 20]}),
            [q, k, v],
            "does not broadcast",
        ),
    ] {
        let err = build_err("scaled_dot_product_attention", attrs, &shapes);
        assert!(
            err.contains("node \"blocks.0.attn\"") && err.contains(want),
            "{want}: {err}"
        );
    }
    // Causal with more queries than keys leaves every query a key (top-left tril).
    ekfac::layers::build(
        &node(
            "scaled_dot_product_attention",
            3,
            json!({"is_causal": true}),
        ),
        &[&[2, 7, 4], k, v],
    )
    .unwrap();
}

/// Through a model description: the graph with an all-keys-masked row is refused when
/// it is read, naming the node; the same graph with that row attending is accepted.
#[test]
fn graph_with_a_fully_masked_attention_row_is_refused() {
    let graph = |mask: &str| {
        format!(
            r#"{{"format": "ekfac-graph", "version": 2,
                "inputs": [{{"name": "x", "shape": [3, 4], "dtype": "f32"}}],
                "nodes": [
                  {{"name": "attn", "op": "scaled_dot_product_attention", "inputs": ["x", "x", "x"],
                    "attrs": {{"is_causal": false, "scale": null, "attn_mask_shape": [3, 3],
                               "attn_mask": {mask}}}}},
                  {{"name": "flat", "op": "flatten", "inputs": ["attn"], "attrs": {{"start_dim": 1}}}},
                  {{"name": "fc", "op": "linear", "inputs": ["flat"],
                    "attrs": {{"in_features": 12, "out_features": 2}}}}],
                "output": "fc"}}"#
        )
    };
    let err = ekfac::graph::json::from_json_str(&graph("[1, 0, 0, 0, 0, 0, 1, 1, 1]"), "m.json")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"attn\"") && err.contains("masks every key of query 1"),
        "{err}"
    );
    let g =
        ekfac::graph::json::from_json_str(&graph("[1, 0, 0, 1, 1, 0, 1, 1, 1]"), "m.json").unwrap();
    assert_eq!(g.shapes()[1], vec![3, 4]);
}
