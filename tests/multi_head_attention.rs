//! `multi_head_attention` (PyTorch's `nn.MultiheadAttention`, batch first, eval mode):
//! forward and the backward of a stack of vectors against PyTorch autograd fixtures
//! (`tests/fixtures/ops/mha_*`), the GPU layer against the f64 reference, the same
//! attention written from `linear`, `reshape`, `transpose` and
//! `scaled_dot_product_attention` layers, and the build refusals.

mod common;
mod op_fixtures;

use common::TestRng;
use ekfac::gpu::{GpuContext, GpuTensor};
use ekfac::graph::Node;
use ekfac::layers::{BackwardArgs, ForwardArgs, Layer};
use op_fixtures::{OpFixture, Tolerances, rel_err64};
use serde_json::json;

/// The projections are GEMMs with K = E ≤ 16 and the attention is the scaled
/// dot-product attention's (2e-6 in tests/attention.rs); the output projection and the
/// input gradients add two more GEMMs of K = E, each about `√K·2⁻²⁴` relative: 5e-6
/// forward and backward (about 5e-7 observed).
const MHA_TOL: f64 = 5e-6;

fn node(attrs: serde_json::Value) -> Node {
    Node::new(
        "blocks.0.self_attn",
        "multi_head_attention",
        vec!["q".into(), "k".into(), "v".into()],
        attrs.as_object().cloned().unwrap_or_default(),
    )
}

fn build(attrs: serde_json::Value, shapes: &[&[usize]]) -> ekfac::Result<Box<dyn Layer>> {
    ekfac::layers::build(&node(attrs), shapes)
}

fn f64s(t: &[f32]) -> Vec<f64> {
    t.iter().map(|&x| f64::from(x)).collect()
}

#[test]
fn mha_layers_match_pytorch() {
    let cases = std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ops"),
    )
    .unwrap()
    .filter_map(|e| {
        let name = e.unwrap().file_name().into_string().unwrap();
        name.strip_prefix("mha_")
            .and_then(|n| n.strip_suffix(".safetensors"))
            .map(|n| format!("mha_{n}"))
    })
    .collect::<Vec<_>>();
    assert!(cases.len() >= 4, "the mha_* op fixtures: {cases:?}");
    for name in cases {
        let f = OpFixture::load(&name);
        assert_eq!(f.op, "multi_head_attention");
        op_fixtures::check_layer(
            &f,
            Tolerances {
                forward: MHA_TOL,
                backward: MHA_TOL,
            },
        );
    }
}

/// A random attention: `batch` examples of query `[l, e]` and key/value `[s, e]` (one
/// tensor as all three for `self_attention`, so `l = s`), random parameters, a stack
/// of `stack` output gradients; the GPU output and input gradients against the f64
/// reference.
fn check_random(
    ctx: &GpuContext,
    seed: u64,
    (batch, stack): (usize, usize),
    [l, s, e, heads]: [usize; 4],
    attrs: serde_json::Value,
    self_attention: bool,
) {
    let mut all = json!({"embed_dim": e, "num_heads": heads});
    for (k, v) in attrs.as_object().unwrap() {
        all[k] = v.clone();
    }
    let layer = build(all.clone(), &[&[l, e], &[s, e], &[s, e]]).unwrap();
    let mut rng = TestRng::new(seed);
    let query = rng.vec(batch * l * e);
    let (key, value) = if self_attention {
        (query.clone(), query.clone())
    } else {
        (rng.vec(batch * s * e), rng.vec(batch * s * e))
    };
    let inputs = [
        (query, vec![batch, l, e]),
        (key, vec![batch, s, e]),
        (value, vec![batch, s, e]),
    ];
    let params: Vec<(Vec<f32>, Vec<usize>)> = layer
        .params()
        .iter()
        .map(|p| (rng.vec(p.shape.iter().product()), p.shape.clone()))
        .collect();
    let grad_out = rng.vec(stack * batch * l * e);

    let up = |(v, shape): &(Vec<f32>, Vec<usize>)| ctx.upload(v, shape).unwrap();
    let gpu_inputs: Vec<GpuTensor> = inputs.iter().map(up).collect();
    let gpu_params: Vec<GpuTensor> = params.iter().map(up).collect();
    let g = ctx.upload(&grad_out, &[stack * batch, l, e]).unwrap();
    let refs: Vec<&GpuTensor> = gpu_inputs.iter().collect();
    let (y, grads) =
        op_fixtures::run_gpu(ctx, layer.as_ref(), batch, stack, &refs, &gpu_params, &g);

    let x64: Vec<Vec<f64>> = inputs.iter().map(|(v, _)| f64s(v)).collect();
    let x64: Vec<&[f64]> = x64.iter().map(|v| &v[..]).collect();
    let p64: Vec<Vec<f64>> = params.iter().map(|(v, _)| f64s(v)).collect();
    let want_y = layer.reference_forward(&ForwardArgs {
        batch,
        inputs: &x64,
        params: &p64,
    });
    let g64 = f64s(&grad_out);
    let want = layer.reference_backward(&BackwardArgs {
        stack,
        batch,
        grad_out: &g64,
        inputs: &x64,
        output: &want_y,
        params: &p64,
        input_grads: &[true; 3],
        param_grads: false,
    });
    let e_y = rel_err64(&f64s(&y), &want_y);
    assert!(e_y < MHA_TOL, "{all}: forward error {e_y:e}");
    for (name, (got, want)) in ["query", "key", "value"]
        .iter()
        .zip(grads.iter().zip(&want.inputs))
    {
        let err = rel_err64(&f64s(got), want.as_ref().unwrap());
        assert!(err < MHA_TOL, "{all}: grad {name} error {err:e}");
    }
}

/// The GPU layer against the f64 reference: self-attention with several heads and a
/// stack of 3; cross-attention with fewer queries than keys and no bias; a causal
/// keep mask; one head; more queries and keys than one 64-row tile.
#[test]
fn mha_gpu_matches_reference() {
    let Some(ctx) = common::gpu() else { return };
    let causal: Vec<u8> = (0..36).map(|i| u8::from(i % 6 <= i / 6)).collect();
    check_random(&ctx, 1, (2, 3), [7, 7, 16, 4], json!({}), true);
    check_random(
        &ctx,
        2,
        (3, 2),
        [5, 11, 12, 3],
        json!({"bias": false}),
        false,
    );
    check_random(
        &ctx,
        3,
        (2, 1),
        [6, 6, 8, 2],
        json!({"attn_mask_shape": [6, 6], "attn_mask": causal}),
        true,
    );
    check_random(&ctx, 4, (1, 2), [3, 4, 6, 1], json!({}), false);
    check_random(&ctx, 5, (2, 2), [70, 66, 8, 2], json!({}), false);
}

/// Each refusal names what is wrong.
#[test]
fn mha_refusals() {
    let ok: &[&[usize]] = &[&[4, 8], &[5, 8], &[5, 8]];
    let value_too_short: &[&[usize]] = &[&[4, 8], &[5, 8], &[4, 8]];
    let heads_axis: &[&[usize]] = &[&[2, 4, 8], &[5, 8], &[5, 8]];
    for (attrs, shapes, want) in [
        (
            json!({"embed_dim": 8, "num_heads": 3}),
            ok,
            "divide embed_dim",
        ),
        (
            json!({"embed_dim": 8, "num_heads": 0}),
            ok,
            "divide embed_dim",
        ),
        (
            json!({"embed_dim": 6, "num_heads": 2}),
            ok,
            "needs query [B, L, 6]",
        ),
        (
            json!({"embed_dim": 8, "num_heads": 2}),
            value_too_short,
            "needs query [B, L, 8]",
        ),
        (
            json!({"embed_dim": 8, "num_heads": 2}),
            heads_axis,
            "batch first",
        ),
        (
            json!({"embed_dim": 8, "num_heads": 2, "attn_mask_shape": [4, 5],
                   "attn_mask": [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1]}),
            ok,
            "masks every key of query 1",
        ),
        (
            json!({"embed_dim": 8, "num_heads": 2, "dropout": 0.1}),
            ok,
            "dropout",
        ),
    ] {
        let err = build(attrs.clone(), shapes).unwrap_err().to_string();
        assert!(err.contains(want), "{attrs}: {err}");
        assert!(err.contains("blocks.0.self_attn"), "{attrs}: {err}");
    }
    let err = ekfac::layers::build(&node(json!({"embed_dim": 8, "num_heads": 2})), &ok[..2])
        .unwrap_err()
        .to_string();
    assert!(err.contains("three inputs"), "{err}");
}

/// Its parameters are not curvature parameters (curvlinops cannot see them either):
/// naming one in the selection is an error that says so, for `in_proj_weight` and for
/// `out_proj.weight` (a suffix with a dot); the linear layer after it is selectable.
#[test]
fn mha_parameters_are_not_curvature_parameters() {
    let graph = ekfac::graph::json::from_json_str(
        r#"{"format": "ekfac-graph", "version": 2,
            "inputs": [{"name": "x", "shape": [4, 8]}],
            "nodes": [
              {"name": "enc.self_attn", "op": "multi_head_attention", "inputs": ["x", "x", "x"],
               "attrs": {"embed_dim": 8, "num_heads": 2}},
              {"name": "flatten", "op": "flatten", "inputs": ["enc.self_attn"]},
              {"name": "head", "op": "linear", "inputs": ["flatten"],
               "attrs": {"in_features": 32, "out_features": 3}}
            ],
            "output": "head"}"#,
        "model.json",
    )
    .unwrap();
    use ekfac::curvature::layout::ParamLayout;
    let layout = ParamLayout::new(&graph, None, false).unwrap();
    assert_eq!(layout.num_params, 32 * 3 + 3);
    for name in [
        "enc.self_attn.in_proj_weight",
        "enc.self_attn.in_proj_bias",
        "enc.self_attn.out_proj.weight",
        "enc.self_attn.out_proj.bias",
    ] {
        let err = ParamLayout::new(&graph, Some(&[name.to_string()]), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("\"{name}\"")) && err.contains("is not a curvature parameter"),
            "{name}: {err}"
        );
    }
}
