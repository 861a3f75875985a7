//! One typed wrapper per kernel family of `shaders/`.

pub mod activation;
pub mod attention;
mod check;
pub mod combine;
pub mod conv;
pub mod eigencorrect;
pub mod embedding;
pub mod gated;
pub mod gemm;
pub mod im2col;
pub mod jacobi;
pub mod linear;
pub mod loss;
pub mod masked_fill;
pub mod matmul;
pub mod norm;
pub mod pool;
pub mod qr;
pub mod reduce;
pub mod resample;
pub mod shape;
pub mod softmax;

use crate::gpu::{ParamsLayout, Shader};

pub(crate) static ACTIVATION: Shader = crate::shader!("activation");
pub(crate) static COMBINE: Shader = crate::shader!("combine");
pub(crate) static CONV: Shader = crate::shader!("conv");
pub(crate) static EIGENCORRECT: Shader = crate::shader!("eigencorrect");
pub(crate) static GATED: Shader = crate::shader!("gated");
pub(crate) static GEMM: Shader = crate::shader!("gemm");
pub(crate) static IM2COL: Shader = crate::shader!("im2col");
pub(crate) static JACOBI: Shader = crate::shader!("jacobi");
pub(crate) static NORM: Shader = crate::shader!("norm" after "rows");
pub(crate) static POOL: Shader = crate::shader!("pool" after "planes");
pub(crate) static REDUCE: Shader = crate::shader!("reduce");
pub(crate) static RESAMPLE: Shader = crate::shader!("resample" after "planes");
pub(crate) static SHAPE: Shader = crate::shader!("shape");
pub(crate) static EMBEDDING: Shader = crate::shader!("embedding");
pub(crate) static SOFTMAX: Shader = crate::shader!("softmax" after "rows");
pub(crate) static MASKED_FILL: Shader = crate::shader!("masked_fill");
pub(crate) static QR: Shader = crate::shader!("qr");

/// Every WGSL file of the crate, for validation tests.
pub fn all_shaders() -> &'static [&'static Shader] {
    SHADERS
}

static SHADERS: &[&Shader] = &[
    &ACTIVATION,
    &COMBINE,
    &CONV,
    &EIGENCORRECT,
    &GATED,
    &GEMM,
    &IM2COL,
    &JACOBI,
    &loss::LOSS_BCE,
    &loss::LOSS_CROSS_ENTROPY,
    &loss::LOSS_MSE,
    &NORM,
    &POOL,
    &REDUCE,
    &RESAMPLE,
    &SHAPE,
    &EMBEDDING,
    &SOFTMAX,
    &MASKED_FILL,
    &QR,
];

/// Every kernel parameter struct with the shader that declares its WGSL twin, for
/// checking the two against each other (`tests/shaders.rs`).
pub fn all_params() -> Vec<ParamsLayout> {
    use ParamsLayout as L;
    vec![
        L::of::<activation::ActivationParams>(&ACTIVATION),
        L::of::<activation::PointwiseParams>(&ACTIVATION),
        L::of::<combine::LenParams>(&COMBINE),
        L::of::<combine::SlabParams>(&COMBINE),
        L::of::<conv::ConvParams>(&CONV),
        L::of::<eigencorrect::ScaleParams>(&EIGENCORRECT),
        L::of::<eigencorrect::StackParams>(&EIGENCORRECT),
        L::of::<eigencorrect::SharedParams>(&EIGENCORRECT),
        L::of::<gated::ElementwiseParams>(&GATED),
        L::of::<gated::StackedParams>(&GATED),
        L::of::<gemm::GemmParams>(&GEMM),
        L::of::<gemm::SplitKSumParams>(&GEMM),
        L::of::<gemm::GemvParams>(&GEMM),
        L::of::<im2col::Im2colParams>(&IM2COL),
        L::of::<loss::LossParams>(&loss::LOSS_BCE),
        L::of::<loss::LossParams>(&loss::LOSS_CROSS_ENTROPY),
        L::of::<loss::LossParams>(&loss::LOSS_MSE),
        L::of::<jacobi::SweepParams>(&JACOBI),
        L::of::<jacobi::GlobalParams>(&JACOBI),
        L::of::<jacobi::CombineParams>(&JACOBI),
        L::of::<jacobi::BlockParams>(&JACOBI),
        L::of::<jacobi::GatherParams>(&JACOBI),
        L::of::<norm::ChannelParams>(&NORM),
        L::of::<norm::RowParams>(&NORM),
        L::of::<pool::PoolParams>(&POOL),
        L::of::<reduce::RangeParams>(&REDUCE),
        L::of::<reduce::DiagonalParams>(&REDUCE),
        L::of::<reduce::MapParams>(&REDUCE),
        L::of::<reduce::TransposeParams>(&REDUCE),
        L::of::<reduce::AppendParams>(&REDUCE),
        L::of::<reduce::SumParams>(&REDUCE),
        L::of::<resample::ResampleParams>(&RESAMPLE),
        L::of::<shape::GatherParams>(&SHAPE),
        L::of::<embedding::EmbeddingParams>(&EMBEDDING),
        L::of::<softmax::SoftmaxParams>(&SOFTMAX),
        L::of::<masked_fill::MaskedFillParams>(&MASKED_FILL),
        L::of::<qr::QrParams>(&QR),
    ]
}
