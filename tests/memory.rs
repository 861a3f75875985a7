//! GPU memory of a fit is bounded by the memory budget, whatever the batch size
//! (issue 4: "Memory must stay bounded whatever the batch size"). Measured with the
//! context's allocation counter (`GpuContext::memory`), which counts every buffer the
//! crate allocates.

mod common;

use ekfac::curvature::fit::fit;
use ekfac::curvature::options::{FisherType, Options};
use ekfac::gpu::GpuContext;
use ekfac::graph::{Model, ModelSpec};
use ekfac::model::Dataset;

use common::TestRng;

/// `Conv2d(8, 16, 3, padding 1)` on 8 × 8 × 8 inputs (64 positions, factor dimension
/// 72: its im2col patches are 4608 floats per example, nine times its input)
/// `ReLU AvgPool(4) Flatten Linear(64, 10)`, 128 examples.
fn case(rng: &mut TestRng) -> (Model, Dataset) {
    let spec = ModelSpec::from_json_str(
        r#"{"input_shape": [8, 8, 8], "layers": [
        {"type": "conv2d", "name": "conv", "in_channels": 8, "out_channels": 16,
         "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "avg_pool2d", "kernel_size": 4},
        {"type": "flatten"},
        {"type": "linear", "name": "fc", "in_features": 64, "out_features": 10}]}"#,
        "memory test model",
    )
    .unwrap();
    let model = common::random_model(spec, rng);
    (
        model,
        common::random_classification(rng, 128, &[8, 8, 8], 10),
    )
}

/// Peak GPU bytes of an EKFAC fit (type-2, 10 backpropagated vectors per example).
fn peak(ctx: &GpuContext, model: &Model, data: &Dataset, batch_size: usize) -> u64 {
    let options = Options {
        fisher: FisherType::Type2,
        batch_size,
        ..Options::default()
    };
    fit(ctx, model, data, &options, Some(1e-3)).unwrap();
    ctx.memory().peak_bytes()
}

/// With the default budget, a batch of 128 takes far more memory than a batch of 16
/// (the batch's activations, patches and vectors scale with it). Under a 1 MiB budget
/// both are cut into the same chunks of examples and vectors, so the peak is the same
/// for both batch sizes (asserted within 1%) and stays within the budget plus what does
/// not depend on the batch at all: the weights, factors, eigendecompositions and
/// corrected eigenvalues (well under 0.1 MiB here; bound 0.5 MiB).
#[test]
fn peak_memory_does_not_grow_with_the_batch_size() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(41);
    let (model, data) = case(&mut rng);
    let default_budget = ctx.memory_budget();
    let unbounded = [
        peak(&ctx, &model, &data, 16),
        peak(&ctx, &model, &data, 128),
    ];
    let budget = 1 << 20;
    ctx.set_memory_budget(budget);
    let bounded = [
        peak(&ctx, &model, &data, 16),
        peak(&ctx, &model, &data, 128),
    ];
    ctx.set_memory_budget(default_budget);
    eprintln!("peak bytes, batch 16 and 128: default budget {unbounded:?}, 1 MiB {bounded:?}");
    assert!(
        unbounded[1] > 4 * unbounded[0],
        "the test needs a batch-size dependent peak without a budget: {unbounded:?}"
    );
    assert!(
        bounded[1].abs_diff(bounded[0]) * 100 <= bounded[0],
        "under a budget the peak must not depend on the batch size: {bounded:?}"
    );
    assert!(
        bounded[1] <= budget + (512 << 10),
        "peak {} bytes exceeds the budget of {budget} bytes plus 0.5 MiB",
        bounded[1]
    );
}
