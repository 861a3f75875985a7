//! SPEC §8's CNN problem and its RNG-free golden numbers, checked on the f64 reference
//! (`tests/cpu_curvature.rs`) and on the GPU (`tests/golden.rs`):
//! Conv2d(2,2,2,padding=1) → ReLU → Flatten → Linear(32,2), MSE sum, three examples.

use ekfac::curvature::{FisherType, KfacApprox};
use ekfac::graph::chain::{Conv2dSpec, Layer, LinearSpec};

/// `n` evenly spaced values from `a` to `b` (NumPy's `linspace`).
pub fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| a + (b - a) * i as f64 / (n - 1) as f64)
        .collect()
}

/// The per-example input shape.
pub fn input_shape() -> Vec<usize> {
    vec![2, 3, 3]
}

pub fn layers() -> Vec<Layer> {
    let mut conv = Conv2dSpec::new("0", 2, 2, [2, 2]);
    conv.padding = [1, 1];
    vec![
        Layer::Conv2d(conv),
        Layer::Relu,
        Layer::Flatten,
        Layer::Linear(LinearSpec::new("3", 32, 2)),
    ]
}

/// `name → (shape, values)` in f64.
pub fn weights() -> Vec<(&'static str, Vec<usize>, Vec<f64>)> {
    vec![
        ("0.weight", vec![2, 2, 2, 2], linspace(-1.0, 1.0, 16)),
        ("0.bias", vec![2], vec![0.1, -0.1]),
        ("3.weight", vec![2, 32], linspace(-0.5, 0.5, 64)),
        ("3.bias", vec![2], vec![0.0, 0.3]),
    ]
}

/// The three examples: inputs `[3, 2, 3, 3]` and MSE targets `[3, 2]`.
pub fn data() -> (Vec<f64>, [f64; 6]) {
    let mut x = linspace(0.0, 1.0, 18);
    x.extend(linspace(1.0, -1.0, 36));
    (x, [1.0, -1.0, 0.5, 0.5, 0.0, 2.0])
}

/// approx, fisher, separate bias, KFAC [trace, ‖·‖_F], EKFAC (trace, ‖·‖_F if compared;
/// `None`: KFAC only).
pub type Row = (
    KfacApprox,
    FisherType,
    bool,
    [f64; 2],
    Option<(f64, Option<f64>)>,
);

/// SPEC §8's rows. The reduce-mode EKFAC Frobenius norm depends on the eigenbasis
/// (SPEC §8 pitfall 1, §9.1): only its trace is compared.
#[rustfmt::skip]
pub const ROWS: [Row; 5] = {
    use FisherType::*;
    use KfacApprox::*;
    [
        (Expand, Type2, true, [382.8636581032, 172.1190080319], Some((779.5879884411, Some(273.5694546285)))),
        (Expand, Type2, false, [382.8636581032, 178.0065111650], Some((779.5879884411, Some(343.2108265559)))),
        (Reduce, Type2, true, [772.5843550338, 273.0698862742], Some((779.5879884411, None))),
        (Expand, Empirical, true, [24647.75915806, 12607.65350913], Some((77368.48639427, Some(35771.94746235)))),
        (Reduce, ForwardOnly, true, [60.39055684248, 28.60392229406], None),
    ]
};
