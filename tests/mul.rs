//! `mul` of two activations (gating, squeeze-and-excitation) with PyTorch's
//! broadcasting: the layer against PyTorch autograd fixtures (`tests/fixtures/ops/mul_*`:
//! equal shapes, one input broadcast along trailing dims, each input broadcast along a
//! different dim), and the build refusals.

mod common;
mod op_fixtures;

use op_fixtures::{OpFixture, Tolerances};

/// Each product and each gradient is one rounding of exact f32 products, and the
/// broadcast gradients add at most 9 of them (`reduce::sum_cols`): 1e-6.
#[test]
fn mul_layers_match_pytorch() {
    for name in ["mul_same", "mul_excite", "mul_outer"] {
        let f = OpFixture::load(name);
        assert_eq!(f.op, "mul");
        op_fixtures::check_layer(
            &f,
            Tolerances {
                forward: 1e-6,
                backward: 1e-6,
            },
        );
    }
}

#[test]
fn mul_refusals() {
    let build = |shapes: &[&[usize]]| {
        let names = (0..shapes.len()).map(|i| format!("x{i}")).collect();
        let node = ekfac::graph::Node::new("gate", "mul", names, Default::default());
        ekfac::layers::build(&node, shapes).map(|l| l.output_shape().to_vec())
    };
    assert_eq!(build(&[&[4, 1, 3], &[1, 2, 3]]).unwrap(), [4, 2, 3]);
    for (shapes, want) in [
        (&[&[4, 3][..], &[4, 2][..]][..], "PyTorch's broadcasting"),
        (&[&[4, 3][..], &[3][..]][..], "same number of dims"),
        (&[&[4, 3][..]][..], "two inputs"),
    ] {
        let err = build(shapes).unwrap_err().to_string();
        assert!(
            err.contains(want) && err.contains("gate"),
            "{shapes:?}: {err}"
        );
    }
}
