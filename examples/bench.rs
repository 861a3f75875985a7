//! End-to-end benchmark of the GPU pipeline: KFAC/EKFAC fit phases and operator
//! products on fixed workloads (issue 4, item 5; issue 9, item 7).
//!
//! `cargo run --release --example bench -- [--quick | --smoke]
//! [--workload mlp|cnn|resnet|transformer] [--runs N] [--write-inputs DIR]
//! [--eigensolver jacobi|host|auto]`
//!
//! Workloads (random PyTorch-like weights and random data from a fixed seed):
//! - `mlp`: `Linear(784,512) ReLU Linear(512,512) ReLU Linear(512,10)`, N = 8192, batch 512;
//! - `cnn`: `Conv2d(3,16,3,s=2,p=1) ReLU Conv2d(16,32,3,s=2,p=1) ReLU Flatten
//!   Linear(2048,10)` on `3×32×32` inputs, N = 2048, batch 128;
//! - `resnet` (only with `--workload resnet`): the CIFAR-style ResNet of
//!   `tools/bench_curvlinops.py`, a graph in torchvision's naming: `conv1`
//!   Conv2d(3,w,3,p=1) → `bn1` → ReLU → stages `layer1`, `layer2`, `layer3` of `n`
//!   BasicBlocks with `w`, `2w`, `4w` channels (`conv1` 3×3, stride 2 in the first
//!   block of `layer2` and `layer3`, `bn1`, ReLU, `conv2` 3×3, `bn2`, plus the input or,
//!   where the shape changes, `downsample.0` Conv2d 1×1 stride 2 + `downsample.1`
//!   BatchNorm; add; ReLU) → AdaptiveAvgPool2d(1) → flatten → `fc` Linear(4w,10); no
//!   conv has a bias. `w = 16, n = 3` (ResNet-20) on `3×32×32`, N = 2048, batch 128.
//!   Weights as PyTorch initialises them; BatchNorm running statistics and affine
//!   weights random as in the fixtures (mean 0.3·N(0,1), var 0.5+U(0,1), weight
//!   0.6+0.8·U(0,1), bias 0.2·N(0,1)).
//! - `transformer` (only with `--workload transformer`): a pre-LN transformer
//!   classifier in the naming of `tools/bench_curvlinops.py`'s `Transformer`: token
//!   ids `[T]` (`x` I64 in the data file) → `embed` Embedding(V,d) → plus the learned
//!   positions `pos` `[1, T, d]` (`add_parameter`), `n` blocks `blocks.<i>` of `ln1`
//!   LayerNorm(d) → `attn.q`,
//!   `attn.k`, `attn.v` Linear(d,d) over the tokens → heads by `reshape [T, H, d/H]` +
//!   `transpose(1, 2)` → `scaled_dot_product_attention` (non-causal, scale 1/√(d/H)) →
//!   `transpose(1, 2)` + `reshape [T, d]` → `attn.o` Linear(d,d) → add; `ln2` →
//!   `mlp.fc1` Linear(d,4d) → GELU → `mlp.fc2` Linear(4d,d) → add; then `ln_f`, the
//!   mean over tokens and `head` Linear(d,10). `n = 4, d = 256, H = 4, T = 128`,
//!   `V = 1000`, N = 1024, batch 32. Linear and embedding weights as PyTorch
//!   initialises them, positions 0.02·N(0,1), LayerNorm affine weights as the
//!   BatchNorm's above; ids uniform in `[0, V)`.
//!
//! All: cross-entropy with mean reduction, `fisher = mc` with one sample, `expand`,
//! separate weight and bias. `--quick` shrinks them for the software driver (see
//! [`Size::Quick`]), `--smoke` to tiny sizes (the CI smoke test's). Default: mlp and
//! cnn.
//!
//! Each run fits the state ([`ekfac::curvature::fit::fit`], whose phase timings are
//! wall-clock on the host, each ending with a wait for the GPU), then times one KFAC
//! and one EKFAC product with 1 and with 16 columns around `Operator::apply` (upload,
//! one pass, readback and the host-side gather/scatter included). One warm-up run
//! (pipeline compilation) is not counted; the table shows medians over `--runs` runs
//! (default 5, 2 with `--quick` or `--smoke`). Peak GPU memory is the crate's own count of the
//! bytes of its live buffers. GFLOP/s are the analytic counts of [`Flops`] divided by
//! the median wall-clock times.
//!
//! Where the device has `TIMESTAMP_QUERY` the benchmark turns GPU profiling on
//! ([`GpuContext::set_profiling`]) and prints, next to each wall-clock time, the GPU
//! time spent inside the crate's compute passes of that phase (timestamps at the
//! beginning and end of each pass; uploads, readbacks and host work excluded). Without
//! it (or with `EKFAC_FEATURES=none`) it says so and prints wall-clock times only.
//!
//! Below the timing table, the cost drivers of one fit, which do not depend on the
//! driver or the machine's load: per phase the dispatches, submissions (compute passes),
//! host readbacks and the GEMMs' flops counted from their shapes
//! ([`GpuContext::work_counts`]), the eigendecomposition's sweeps
//! per group of factors of one size, and the two ratios of issue 13's targets
//! (eigendecomposition over factor time, and its nominal GFLOP/s over the factor
//! pass's). Last, the GEMM reference: a lone `n × n × n` GEMM of the largest factor's
//! size timed on the same adapter right after the runs, and the eigendecomposition's
//! nominal GFLOP/s as a percentage of that GEMM's (issue 13's "≥ 25 % of the GEMM
//! rate", read literally); then the GEMM work the eigendecomposition actually does,
//! as a multiple of the nominal `9n³` and as a rate against the same reference (how
//! far its GEMMs are from the GEMM's speed, apart from how many it needs). The
//! eigendecomposition is the GPU Jacobi unless
//! `--eigensolver` says otherwise.
//!
//! `--write-inputs DIR` also writes `DIR/<workload>/{model.json, weights.safetensors,
//! data.safetensors, bench.json}` (our model format, PyTorch `state_dict` names, `x`
//! F32 or I64 token ids, `y` I64, and the options, the FLOP counts and the GPU outputs of the first
//! [`CHECK_ROWS`] examples) for `tools/bench_curvlinops.py`, which checks its rebuilt
//! model against those outputs before timing.
//! The adapter is chosen as by the crate (`WGPU_BACKEND`, `EKFAC_ADAPTER`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ekfac::curvature::eigen::solver_for;
use ekfac::curvature::fit::{FitRun, GpuTimings, fit_run};
use ekfac::curvature::operator::{Approximation, Operator, Transform};
use ekfac::curvature::options::EigensolverKind;
use ekfac::curvature::{FisherType, KfacApprox, LossKind, Options, Reduction};
use ekfac::gpu::{GpuContext, WorkCounts};
use ekfac::graph::chain::{Conv2dSpec, Layer, LinearSpec};
use ekfac::graph::{Graph, GraphInput, InputType, Model, ModelSpec, Network, Node};
use ekfac::model::data::{Dataset, Targets};
use ekfac::ops::gemm::{Gemm, gemm};
use ekfac::progress::{Event, Stage};
use ekfac::{Error, Result};

/// Seed of the weights, the data and the product vectors.
const SEED: u64 = 20240611;
/// Examples whose GPU outputs `--write-inputs` records in `bench.json`.
const CHECK_ROWS: usize = 8;
/// Column counts of the timed products.
const PRODUCT_COLUMNS: [usize; 2] = [1, 16];

/// A small deterministic generator (SplitMix64).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[-bound, bound)`.
    fn uniform(&mut self, bound: f64) -> f32 {
        ((2.0 * self.unit() - 1.0) * bound) as f32
    }

    /// Standard normal (Box–Muller, one value per pair of uniforms).
    fn normal(&mut self) -> f32 {
        let u = 1.0 - self.unit();
        let v = self.unit();
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

/// How large the workloads are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Size {
    /// The sizes of issue 4.
    Full,
    /// For the software driver: mlp `Linear(196,128) ReLU Linear(128,128) ReLU
    /// Linear(128,10)`, N = 1024, batch 256; cnn on `3×16×16` with 8 and 16 channels
    /// (`Linear(256,10)`), N = 512, batch 128; resnet `w = 8, n = 1` (ResNet-8) on
    /// `3×16×16`, N = 512, batch 128; transformer 2 blocks, `d = 32`, 4 heads,
    /// `T = 16`, `V = 100`, N = 256, batch 64.
    Quick,
    /// For the CI smoke test: tiny layers, N = 64 (mlp) / 32 (cnn, and resnet with
    /// `w = 4, n = 1` on `3×8×8`, batch 16) / 16 (transformer: 1 block, `d = 8`, 2
    /// heads, `T = 4`, `V = 16`, batch 8).
    Smoke,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WorkloadKind {
    Mlp,
    Cnn,
    Resnet,
    Transformer,
}

/// A network, its data and the fit options.
struct Workload {
    kind: WorkloadKind,
    /// The network in PyTorch's notation, e.g. `Linear(784,512) ReLU ...`.
    description: String,
    model: Model,
    data: Dataset,
    options: Options,
}

/// `torch.nn.Linear`-style layer named by its Sequential index.
fn linear(index: usize, d_in: usize, d_out: usize) -> Layer {
    Layer::Linear(LinearSpec::new(index.to_string(), d_in, d_out))
}

/// 3×3 convolution with stride 2 and padding 1, named by its Sequential index.
fn conv_s2(index: usize, c_in: usize, c_out: usize) -> Layer {
    let mut spec = Conv2dSpec::new(index.to_string(), c_in, c_out, [3, 3]);
    spec.stride = [2, 2];
    spec.padding = [1, 1];
    Layer::Conv2d(spec)
}

/// Fan-in of a layer's weight: `in_features` or `C_in/groups · KH · KW`.
fn fan_in(layer: &Layer) -> Option<usize> {
    layer.weight_shape().map(|s| s[1..].iter().product())
}

const CLASSES: usize = 10;

/// The chain of the `mlp` or `cnn` workload with its N and batch size.
fn chain_workload(kind: WorkloadKind, size: Size) -> (ModelSpec, usize, usize) {
    match kind {
        WorkloadKind::Mlp => {
            let (d, h, n, batch) = match size {
                Size::Full => (784, 512, 8192, 512),
                Size::Quick => (196, 128, 1024, 256),
                Size::Smoke => (32, 16, 64, 32),
            };
            let layers = vec![
                linear(0, d, h),
                Layer::Relu,
                linear(2, h, h),
                Layer::Relu,
                linear(4, h, CLASSES),
            ];
            (
                ModelSpec {
                    input_shape: vec![d],
                    layers,
                },
                n,
                batch,
            )
        }
        WorkloadKind::Cnn => {
            let (side, c1, c2, n, batch) = match size {
                Size::Full => (32, 16, 32, 2048, 128),
                Size::Quick => (16, 8, 16, 512, 128),
                Size::Smoke => (8, 4, 8, 32, 16),
            };
            // Two stride-2 convolutions quarter each side.
            let flat = c2 * (side / 4) * (side / 4);
            let layers = vec![
                conv_s2(0, 3, c1),
                Layer::Relu,
                conv_s2(2, c1, c2),
                Layer::Relu,
                Layer::Flatten,
                linear(5, flat, CLASSES),
            ];
            (
                ModelSpec {
                    input_shape: vec![3, side, side],
                    layers,
                },
                n,
                batch,
            )
        }
        WorkloadKind::Resnet | WorkloadKind::Transformer => {
            unreachable!("the resnet and the transformer are graphs")
        }
    }
}

/// PyTorch's default init: weight and bias uniform in ±1/√fan_in.
fn chain_model(spec: ModelSpec, rng: &mut SplitMix64) -> Result<Model> {
    let mut tensors = HashMap::new();
    for layer in &spec.layers {
        let (Some(name), Some(shape), Some(fan)) =
            (layer.name(), layer.weight_shape(), fan_in(layer))
        else {
            continue;
        };
        let bound = 1.0 / (fan as f64).sqrt();
        let len = shape.iter().product();
        let weight = (0..len).map(|_| rng.uniform(bound)).collect();
        tensors.insert(format!("{name}.weight"), (shape, weight));
        if let Some(shape) = layer.bias_shape() {
            let bias = (0..shape[0]).map(|_| rng.uniform(bound)).collect();
            tensors.insert(format!("{name}.bias"), (shape, bias));
        }
    }
    Model::new(spec, tensors)
}

/// The chain in PyTorch's notation, e.g. `Linear(784,512) ReLU ...`.
fn describe_chain(spec: &ModelSpec) -> String {
    let mut parts = vec![format!(
        "input {}",
        spec.input_shape
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("×")
    )];
    for layer in &spec.layers {
        parts.push(match layer {
            Layer::Linear(l) => format!("Linear({},{})", l.in_features, l.out_features),
            Layer::Conv2d(c) => format!(
                "Conv2d({},{},{},s={},p={})",
                c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]
            ),
            Layer::Relu => "ReLU".into(),
            Layer::Flatten => "Flatten".into(),
            other => other.kind().into(),
        });
    }
    parts.join(" ")
}

/// Builds the graph of `nodes` one at a time, naming the values.
struct GraphBuilder {
    nodes: Vec<Node>,
    parameters: Vec<String>,
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl GraphBuilder {
    fn node(&mut self, name: &str, op: &str, inputs: &[&str], attrs: serde_json::Value) -> String {
        let attrs = match attrs {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        let inputs = inputs.iter().map(ToString::to_string).collect();
        self.nodes.push(Node::new(name, op, inputs, attrs));
        name.to_string()
    }

    fn param(&mut self, key: String, shape: Vec<usize>, values: Vec<f32>) {
        self.parameters.push(key.clone());
        self.tensors.insert(key, (shape, values));
    }

    /// Conv2d without bias, PyTorch's default init (uniform ±1/√fan_in).
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        rng: &mut SplitMix64,
        name: &str,
        input: &str,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
    ) -> String {
        let padding = kernel / 2;
        let attrs = serde_json::json!({
            "in_channels": c_in, "out_channels": c_out, "kernel_size": [kernel, kernel],
            "stride": [stride, stride], "padding": [padding, padding], "bias": false,
        });
        let bound = 1.0 / ((c_in * kernel * kernel) as f64).sqrt();
        let len = c_out * c_in * kernel * kernel;
        let weight = (0..len).map(|_| rng.uniform(bound)).collect();
        self.param(
            format!("{name}.weight"),
            vec![c_out, c_in, kernel, kernel],
            weight,
        );
        self.node(name, "conv2d", &[input], attrs)
    }

    /// `nn.Linear(d_in, d_out)` with bias, PyTorch's default init (weight, then bias,
    /// uniform ±1/√d_in), on the last dimension of `input`.
    fn linear(
        &mut self,
        rng: &mut SplitMix64,
        name: &str,
        input: &str,
        d_in: usize,
        d_out: usize,
    ) -> String {
        let bound = 1.0 / (d_in as f64).sqrt();
        let weight = (0..d_out * d_in).map(|_| rng.uniform(bound)).collect();
        let bias = (0..d_out).map(|_| rng.uniform(bound)).collect();
        self.param(format!("{name}.weight"), vec![d_out, d_in], weight);
        self.param(format!("{name}.bias"), vec![d_out], bias);
        let attrs = serde_json::json!({"in_features": d_in, "out_features": d_out, "bias": true});
        self.node(name, "linear", &[input], attrs)
    }

    /// `nn.LayerNorm(d)` over the last dimension, affine weights random as the
    /// BatchNorm's (weight 0.6+0.8·U(0,1), bias 0.2·N(0,1)).
    fn layer_norm(&mut self, rng: &mut SplitMix64, name: &str, input: &str, d: usize) -> String {
        let weight = (0..d).map(|_| 0.6 + 0.8 * rng.unit() as f32).collect();
        let bias = (0..d).map(|_| 0.2 * rng.normal()).collect();
        self.param(format!("{name}.weight"), vec![d], weight);
        self.param(format!("{name}.bias"), vec![d], bias);
        let attrs = serde_json::json!({"normalized_shape": [d], "eps": 1e-5});
        self.node(name, "layer_norm", &[input], attrs)
    }

    /// BatchNorm2d in eval mode with random running statistics and affine weights.
    fn batch_norm(&mut self, rng: &mut SplitMix64, name: &str, input: &str, c: usize) -> String {
        let attrs = serde_json::json!({"num_features": c, "eps": 1e-5, "affine": true});
        let weight = (0..c).map(|_| 0.6 + 0.8 * rng.unit() as f32).collect();
        let bias = (0..c).map(|_| 0.2 * rng.normal()).collect();
        self.param(format!("{name}.weight"), vec![c], weight);
        self.param(format!("{name}.bias"), vec![c], bias);
        let mean = (0..c).map(|_| 0.3 * rng.normal()).collect();
        let var = (0..c).map(|_| 0.5 + rng.unit() as f32).collect();
        self.tensors
            .insert(format!("{name}.running_mean"), (vec![c], mean));
        self.tensors
            .insert(format!("{name}.running_var"), (vec![c], var));
        self.node(name, "batch_norm2d", &[input], attrs)
    }
}

/// The `resnet` workload's model (see the module docs): `width` channels in the first
/// stage, `blocks` BasicBlocks per stage, `3×side×side` inputs; parameters listed in
/// `named_parameters()` order (a block's `downsample` after its `conv2`/`bn2`, as
/// torchvision registers it).
fn resnet(width: usize, blocks: usize, side: usize, rng: &mut SplitMix64) -> Result<Model> {
    let mut g = GraphBuilder {
        nodes: Vec::new(),
        parameters: Vec::new(),
        tensors: HashMap::new(),
    };
    let none = serde_json::Value::Null;
    let x = g.conv(rng, "conv1", "x", 3, width, 3, 1);
    let x = g.batch_norm(rng, "bn1", &x, width);
    let mut x = g.node("relu", "relu", &[&x], none.clone());
    let mut c_in = width;
    for (stage, c_out) in [(1, width), (2, 2 * width), (3, 4 * width)] {
        for i in 0..blocks {
            let stride = if stage > 1 && i == 0 { 2 } else { 1 };
            let b = format!("layer{stage}.{i}");
            let h = g.conv(rng, &format!("{b}.conv1"), &x, c_in, c_out, 3, stride);
            let h = g.batch_norm(rng, &format!("{b}.bn1"), &h, c_out);
            let h = g.node(&format!("{b}.relu"), "relu", &[&h], none.clone());
            let h = g.conv(rng, &format!("{b}.conv2"), &h, c_out, c_out, 3, 1);
            let h = g.batch_norm(rng, &format!("{b}.bn2"), &h, c_out);
            let shortcut = if stride != 1 || c_in != c_out {
                let s = g.conv(
                    rng,
                    &format!("{b}.downsample.0"),
                    &x,
                    c_in,
                    c_out,
                    1,
                    stride,
                );
                g.batch_norm(rng, &format!("{b}.downsample.1"), &s, c_out)
            } else {
                x.clone()
            };
            let sum = g.node(&format!("{b}.add"), "add", &[&h, &shortcut], none.clone());
            x = g.node(&format!("{b}.relu_1"), "relu", &[&sum], none.clone());
            c_in = c_out;
        }
    }
    let pooled = g.node(
        "avgpool",
        "adaptive_avg_pool2d",
        &[&x],
        serde_json::json!({"output_size": [1, 1]}),
    );
    let flat = g.node(
        "flatten",
        "flatten",
        &[&pooled],
        serde_json::json!({"start_dim": 1}),
    );
    g.linear(rng, "fc", &flat, 4 * width, CLASSES);
    let input = GraphInput {
        name: "x".into(),
        shape: vec![3, side, side],
        dtype: InputType::F32,
    };
    let graph = Graph::new(input, g.nodes, "fc", Some(g.parameters))?;
    Model::new(graph, g.tensors)
}

/// The shape of the `transformer` workload (see the module docs).
#[derive(Clone, Copy, Debug)]
struct TransformerShape {
    blocks: usize,
    /// Model width `d`.
    width: usize,
    heads: usize,
    /// Tokens per example `T`.
    tokens: usize,
    /// Rows of the embedding table `V` (token ids in `[0, V)`).
    vocab: usize,
}

/// The `transformer` workload's model: token ids `x [T]` → `embed`
/// (`Embedding(V, d)`, N(0,1) as PyTorch) → plus the learned positions `pos`
/// (`[1, T, d]`, 0.02·N(0,1)), then per block
/// `blocks.<i>` (pre-LN): `x + attn.o(SDPA(heads(attn.q(h)), heads(attn.k(h)),
/// heads(attn.v(h))))` with `h = ln1(x)`, heads by `reshape [T, H, d/H]` +
/// `transpose(1, 2)` (non-causal, scale 1/√(d/H)), then `x + mlp.fc2(gelu(mlp.fc1(ln2(x))))`
/// with `4d` hidden; `ln_f`, the mean over tokens, `head` Linear(d, 10). Parameters in
/// `named_parameters()` order of `tools/bench_curvlinops.py`'s `Transformer`.
fn transformer(shape: TransformerShape, rng: &mut SplitMix64) -> Result<Model> {
    let TransformerShape {
        blocks,
        width: d,
        heads,
        tokens: t,
        vocab,
    } = shape;
    let mut g = GraphBuilder {
        nodes: Vec::new(),
        parameters: Vec::new(),
        tensors: HashMap::new(),
    };
    let none = serde_json::Value::Null;
    let head_dim = d / heads;
    // `named_parameters()` lists a module's own parameters (`pos`) before its
    // children's (`embed.weight`).
    let table = (0..vocab * d).map(|_| rng.normal()).collect();
    let positions = (0..t * d).map(|_| 0.02 * rng.normal()).collect();
    g.param("pos".into(), vec![1, t, d], positions);
    g.param("embed.weight".into(), vec![vocab, d], table);
    let embed = serde_json::json!({"num_embeddings": vocab, "embedding_dim": d});
    let x = g.node("embed", "embedding", &["x"], embed);
    let mut x = g.node(
        "pos_add",
        "add_parameter",
        &[&x],
        serde_json::json!({"parameter": "pos", "shape": [1, t, d]}),
    );
    for i in 0..blocks {
        let b = format!("blocks.{i}");
        let h = g.layer_norm(rng, &format!("{b}.ln1"), &x, d);
        let mut qkv = Vec::new();
        for p in ["q", "k", "v"] {
            let y = g.linear(rng, &format!("{b}.attn.{p}"), &h, d, d);
            let split = g.node(
                &format!("{b}.attn.{p}_split"),
                "reshape",
                &[&y],
                serde_json::json!({"shape": [t, heads, head_dim]}),
            );
            qkv.push(g.node(
                &format!("{b}.attn.{p}_heads"),
                "transpose",
                &[&split],
                serde_json::json!({"dim0": 1, "dim1": 2}),
            ));
        }
        let att = g.node(
            &format!("{b}.attn.sdpa"),
            "scaled_dot_product_attention",
            &[&qkv[0], &qkv[1], &qkv[2]],
            serde_json::json!({"is_causal": false, "scale": null}),
        );
        let merged = g.node(
            &format!("{b}.attn.merge"),
            "transpose",
            &[&att],
            serde_json::json!({"dim0": 1, "dim1": 2}),
        );
        let merged = g.node(
            &format!("{b}.attn.flat"),
            "reshape",
            &[&merged],
            serde_json::json!({"shape": [t, d]}),
        );
        let o = g.linear(rng, &format!("{b}.attn.o"), &merged, d, d);
        x = g.node(&format!("{b}.add"), "add", &[&x, &o], none.clone());
        let h = g.layer_norm(rng, &format!("{b}.ln2"), &x, d);
        let h = g.linear(rng, &format!("{b}.mlp.fc1"), &h, d, 4 * d);
        let h = g.node(&format!("{b}.mlp.gelu"), "gelu", &[&h], none.clone());
        let h = g.linear(rng, &format!("{b}.mlp.fc2"), &h, 4 * d, d);
        x = g.node(&format!("{b}.add_1"), "add", &[&x, &h], none.clone());
    }
    let x = g.layer_norm(rng, "ln_f", &x, d);
    let pooled = g.node("pool", "mean", &[&x], serde_json::json!({"dim": 1}));
    g.linear(rng, "head", &pooled, d, CLASSES);
    let input = GraphInput {
        name: "x".into(),
        shape: vec![t],
        dtype: InputType::I64,
    };
    let graph = Graph::new(input, g.nodes, "head", Some(g.parameters))?;
    Model::new(graph, g.tensors)
}

/// `n` class labels uniform over the [`CLASSES`].
fn labels(rng: &mut SplitMix64, n: usize) -> Vec<i64> {
    (0..n)
        .map(|_| (rng.next_u64() % CLASSES as u64) as i64)
        .collect()
}

impl Workload {
    fn new(kind: WorkloadKind, size: Size) -> Result<Self> {
        let mut rng = SplitMix64(SEED ^ kind as u64);
        let (model, description, n, batch) = match kind {
            WorkloadKind::Resnet => {
                let (width, blocks, side, n, batch) = match size {
                    Size::Full => (16, 3, 32, 2048, 128),
                    Size::Quick => (8, 1, 16, 512, 128),
                    Size::Smoke => (4, 1, 8, 32, 16),
                };
                let model = resnet(width, blocks, side, &mut rng)?;
                let description = format!(
                    "CIFAR-style ResNet-{} (BasicBlocks, width {width}, BatchNorm, 1x1 \
                     stride-2 shortcuts) on 3×{side}×{side}, {CLASSES} classes",
                    6 * blocks + 2
                );
                (model, description, n, batch)
            }
            WorkloadKind::Transformer => {
                let (blocks, width, heads, tokens, vocab, n, batch) = match size {
                    Size::Full => (4, 256, 4, 128, 1000, 1024, 32),
                    Size::Quick => (2, 32, 4, 16, 100, 256, 64),
                    Size::Smoke => (1, 8, 2, 4, 16, 16, 8),
                };
                let shape = TransformerShape {
                    blocks,
                    width,
                    heads,
                    tokens,
                    vocab,
                };
                let model = transformer(shape, &mut rng)?;
                let description = format!(
                    "pre-LN transformer, {blocks} block(s) of width {width}, {heads} heads \
                     (SDPA, non-causal), GELU MLP {}, on {tokens} token ids (vocabulary \
                     {vocab}, learned positions), mean over tokens, Linear({width},{CLASSES})",
                    4 * width
                );
                (model, description, n, batch)
            }
            _ => {
                let (spec, n, batch) = chain_workload(kind, size);
                let description = describe_chain(&spec);
                (chain_model(spec, &mut rng)?, description, n, batch)
            }
        };
        let shape = model.shapes()[0].clone();
        let example: usize = shape.iter().product();
        let data = if model.graph.input.dtype == InputType::I64 {
            let vocab = model.graph.token_limit().map_or(1, |(_, v)| v);
            let ids = (0..n * example)
                .map(|_| (rng.next_u64() % vocab) as u32)
                .collect();
            Dataset::tokens(ids, shape, Targets::Classes(labels(&mut rng, n)))?
        } else {
            let x = (0..n * example).map(|_| rng.normal()).collect();
            Dataset::new(x, shape, Targets::Classes(labels(&mut rng, n)))?
        };
        let options = Options {
            loss: LossKind::CrossEntropy,
            reduction: Reduction::Mean,
            fisher: FisherType::Mc,
            mc_samples: 1,
            approx: KfacApprox::Expand,
            joint_bias: false,
            params: None,
            batch_size: batch,
            ..Options::default()
        };
        Ok(Self {
            kind,
            description,
            model,
            data,
            options,
        })
    }

    fn name(&self) -> &'static str {
        match self.kind {
            WorkloadKind::Mlp => "mlp",
            WorkloadKind::Cnn => "cnn",
            WorkloadKind::Resnet => "resnet",
            WorkloadKind::Transformer => "transformer",
        }
    }

    /// The network in PyTorch's notation.
    fn describe(&self) -> &str {
        &self.description
    }

    /// Parameters of the curvature layers (Linear, Conv2d).
    fn num_params(&self) -> usize {
        let graph = &self.model.graph;
        graph
            .curvature_layers()
            .into_iter()
            .flat_map(|i| graph.layer(i).params())
            .map(|p| p.shape.iter().product::<usize>())
            .sum()
    }

    /// The network's outputs `[rows, C]` on the first `rows` examples (at most N),
    /// computed on the GPU.
    fn first_outputs(&self, ctx: &GpuContext, rows: usize) -> Result<Vec<f32>> {
        let rows = rows.min(self.data.len);
        let example: usize = self.data.example_shape.iter().product();
        let mut shape = vec![rows];
        shape.extend(&self.data.example_shape);
        let network = Network::new(ctx, &self.model)?;
        let x = match &self.data.ids {
            Some(ids) => ctx.upload_u32(&ids[..rows * example], &shape)?,
            None => ctx.upload(&self.data.x[..rows * example], &shape)?,
        };
        let forward = network.forward(ctx, x)?;
        ctx.read(forward.output())
    }

    /// Writes the model, weights, data and options (see the module docs) into `dir`;
    /// `outputs`, the GPU outputs of the first examples ([`Self::first_outputs`]), go
    /// into `bench.json` for the baseline to check its rebuilt model against.
    fn write_inputs(&self, dir: &Path, flops: &Flops, outputs: Option<&[f32]>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let graph = &self.model.graph;
        ekfac::io::write_atomic(&dir.join("model.json"), graph.to_json().as_bytes())?;
        // Every node's tensors (BatchNorm's buffers too), `<module>.<suffix>`.
        let mut weights: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        for (i, params) in self.model.params.iter().enumerate() {
            let Some(params) = params else { continue };
            let module = graph.nodes[i].module();
            let layer = graph.layer(i);
            for (spec, (suffix, values)) in layer.params().into_iter().zip(&params.tensors) {
                weights.push((layer.param_key(module, suffix), spec.shape, values));
            }
        }
        ekfac::io::write_tensors(&dir.join("weights.safetensors"), &weights, None)?;

        let data_path = dir.join("data.safetensors");
        let Targets::Classes(y) = &self.data.y else {
            unreachable!("the benchmark workloads have class labels")
        };
        let mut x_shape = vec![self.data.len];
        x_shape.extend(&self.data.example_shape);
        let ids: Option<Vec<i64>> =
            (self.data.ids.as_ref()).map(|ids| ids.iter().map(|&i| i64::from(i)).collect());
        let (x_dtype, x_bytes): (_, &[u8]) = match &ids {
            Some(ids) => (safetensors::Dtype::I64, bytemuck::cast_slice(ids)),
            None => (safetensors::Dtype::F32, bytemuck::cast_slice(&self.data.x)),
        };
        let views = [
            ("x", x_dtype, x_shape, x_bytes),
            (
                "y",
                safetensors::Dtype::I64,
                vec![y.len()],
                bytemuck::cast_slice(y),
            ),
        ]
        .into_iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(dtype, shape, bytes).map(|v| (name, v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::input(data_path.display(), format!("building the tensors: {e}")))?;
        let bytes = safetensors::serialize(views, None)
            .map_err(|e| Error::input(data_path.display(), format!("serialising: {e}")))?;
        ekfac::io::write_atomic(&data_path, &bytes)?;

        let o = &self.options;
        let bench = serde_json::json!({
            "workload": self.name(),
            "description": self.describe(),
            "num_data": self.data.len,
            "num_params": self.num_params(),
            "batch_size": o.batch_size,
            "loss": o.loss.as_str(),
            "reduction": o.reduction.as_str(),
            "fisher_type": o.fisher.as_str(),
            "mc_samples": o.mc_samples,
            "kfac_approx": o.approx.as_str(),
            "separate_weight_and_bias": !o.joint_bias,
            "flops": {
                "factors": flops.factors,
                "eigendecomposition": flops.eigendecomposition,
                "correction": flops.correction,
                "product_per_column": flops.product_per_column,
            },
            "outputs": outputs.map(|o| serde_json::json!({
                "rows": o.len() / self.model.num_outputs(),
                "values": o,
            })),
        });
        let text = serde_json::to_string_pretty(&bench)
            .map_err(|e| Error::input(dir.display(), format!("serialising bench.json: {e}")))?;
        ekfac::io::write_atomic(&dir.join("bench.json"), text.as_bytes())
    }
}

/// Analytic FLOP counts (a multiply-add is 2 FLOPs; elementwise work, reductions over
/// positions, softmax/sampling, attention's own GEMMs and transfers are left out).
/// Per curvature layer with
/// `N` examples, `S` positions (`OH·OW` for conv2d; for linear the product of the
/// leading per-example dims, e.g. `T` tokens, 1 on flat inputs), `R = N·S` rows,
/// `D = d_in` (`in_features` or `C_in/groups·KH·KW`; bias separate), `d_out` and `V`
/// backpropagated vectors (1 for MC with one sample):
/// - one data pass = forward `2·R·D·d_out` + backward to the layer input `2·V·R·D·d_out`
///   (not for the first layer with parameters, which the backward pass skips);
/// - factors: a data pass + `A` Gram `2·R·D²` + `G` Gram `2·V·R·d_out²` (full GEMMs);
/// - eigendecomposition: the customary `9·n³` for a symmetric eigendecomposition with
///   eigenvectors (Golub & Van Loan), per factor of size `n` (`D` and `d_out`). A
///   nominal count: Jacobi does more work per sweep, over several sweeps;
/// - correction: a data pass + `ÃQ_A` `2·R·D²` + `gQ_G` `2·V·R·d_out²` + the
///   eigenvalue update `2·V·R·d_out·D` (the fused kernel over positions, or `hᵀ(ÃQ_A)²`
///   without sharing) + the bias rotation `2·V·N·d_out²`;
/// - product, per column: `4·d_out·D·(d_out + D)` per weight block (`Q_Gᵀ X`, `· Q_A`,
///   back), `4·d_out²` per bias block.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Flops {
    factors: f64,
    eigendecomposition: f64,
    correction: f64,
    product_per_column: f64,
}

impl Flops {
    fn of(w: &Workload) -> Result<Self> {
        let graph = &w.model.graph;
        let shapes = graph.shapes();
        let n = w.data.len as f64;
        let v = w.options.num_vectors(w.model.num_outputs()) as f64;
        let mut f = Flops::default();
        for (k, &i) in graph.curvature_layers().iter().enumerate() {
            let params = graph.layer(i).params();
            let d = params[0].shape[1..].iter().product::<usize>() as f64;
            // `d_out` is the weight's first dimension; the output's other dimensions
            // are the positions (`OH·OW`, or the tokens of a linear over sequences).
            let d_out = params[0].shape[0];
            let s = shapes[i + 1].iter().product::<usize>() / d_out;
            let d_out = d_out as f64;
            let r = n * s as f64;
            let backward = if k == 0 { 0.0 } else { 2.0 * v * r * d * d_out };
            let data_pass = 2.0 * r * d * d_out + backward;
            f.factors += data_pass + 2.0 * r * d * d + 2.0 * v * r * d_out * d_out;
            f.eigendecomposition += 9.0 * (d.powi(3) + d_out.powi(3));
            f.correction +=
                data_pass + 2.0 * r * d * d + 2.0 * v * r * d_out * d_out + 2.0 * v * r * d_out * d;
            f.product_per_column += 4.0 * d_out * d * (d_out + d);
            if params.len() > 1 {
                f.correction += 2.0 * v * n * d_out * d_out;
                f.product_per_column += 4.0 * d_out * d_out;
            }
        }
        Ok(f)
    }
}

/// A timed product: wall-clock ms and, when profiling, GPU ms.
#[derive(Clone, Debug)]
struct ProductTime {
    approx: Approximation,
    columns: usize,
    ms: f64,
    gpu_ms: Option<f64>,
}

/// Timings (ms) and memory of one run.
#[derive(Clone, Debug, Default)]
struct Sample {
    factors: f64,
    eigendecomposition: f64,
    correction: f64,
    fit_total: f64,
    /// GPU times of the fit's phases when profiling.
    gpu: Option<GpuTimings>,
    /// KFAC and EKFAC with each of [`PRODUCT_COLUMNS`].
    products: Vec<ProductTime>,
    peak_fit_bytes: u64,
    peak_product_bytes: u64,
    /// Dispatches, submissions and readbacks of the fit's phases (factors,
    /// eigendecomposition, correction).
    work: [WorkCounts; 3],
    /// The eigendecomposition's groups of factors in order: (factor size, factors in
    /// the group, sweeps; 0 sweeps for a direct solver).
    sweeps: Vec<(usize, usize, usize)>,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// GPU phase label of the benchmark's products.
const PRODUCT_PHASE: &str = "benchmark product";

/// GPU ms of `label` between two totals of [`GpuContext::gpu_times_ms`].
fn gpu_delta(
    before: Option<BTreeMap<String, f64>>,
    after: Option<BTreeMap<String, f64>>,
    label: &str,
) -> Option<f64> {
    let (before, after) = (before?, after?);
    Some(after.get(label).copied().unwrap_or(0.0) - before.get(label).copied().unwrap_or(0.0))
}

/// The fit's phase labels, in the order of [`Sample::work`].
const FIT_PHASES: [&str; 3] = ["factors", "eigendecomposition", "correction"];
/// The eigendecomposition's index in [`FIT_PHASES`].
const EIGEN_PHASE_INDEX: usize = 1;

/// One fit plus the timed products; checks every product is finite.
fn run_once(ctx: &GpuContext, w: &Workload, eigensolver: EigensolverKind) -> Result<Sample> {
    let solver = solver_for(eigensolver, ctx);
    // Each group's last event advances `done` and carries the group's final sweeps.
    let groups = std::cell::RefCell::new((0usize, Vec::new()));
    let record = |e: &Event| {
        if let Event::Advanced {
            stage: Stage::Eigendecomposition,
            done,
            sweeps,
            ..
        } = e
        {
            let mut g = groups.borrow_mut();
            if *done > g.0 {
                let (dim, count) = sweeps.map_or((0, 0), |s| (s.dim, s.sweeps));
                let factors = *done - g.0;
                g.1.push((dim, factors, count));
                g.0 = *done;
            }
        }
    };
    let run = FitRun {
        damping: None,
        previous: None,
        solver: solver.as_ref(),
        progress: &record,
    };
    let work_before = ctx.work_counts();
    let start = Instant::now();
    let fitted = fit_run(ctx, &w.model, &w.data, &w.options, &run)?;
    let fit_total = ms(start);
    let work_after = ctx.work_counts();
    let work = FIT_PHASES.map(|label| {
        let get = |m: &BTreeMap<String, WorkCounts>| m.get(label).copied().unwrap_or_default();
        get(&work_after).since(&get(&work_before))
    });
    let t = &fitted.timings;
    ctx.memory().reset_peak();
    let operator = Operator::new(ctx, &fitted.state)?;
    let p = fitted.state.layout.num_params;
    let mut rng = SplitMix64(SEED.wrapping_add(1));
    let mut products = Vec::new();
    for approx in [Approximation::Kfac, Approximation::Ekfac] {
        for columns in PRODUCT_COLUMNS {
            let v: Vec<f32> = (0..p * columns).map(|_| rng.normal()).collect();
            let gpu_before = ctx.gpu_times_ms()?;
            let start = Instant::now();
            let phase = ctx.gpu_phase(PRODUCT_PHASE);
            let out = operator.apply(&v, columns, approx, Transform::Forward)?;
            drop(phase);
            let elapsed = ms(start);
            let gpu_ms = gpu_delta(gpu_before, ctx.gpu_times_ms()?, PRODUCT_PHASE);
            if let Some(i) = out.iter().position(|x| !x.is_finite()) {
                return Err(Error::gpu(
                    "benchmark product",
                    format!("{approx:?} product with {columns} columns: entry {i} is not finite"),
                ));
            }
            products.push(ProductTime {
                approx,
                columns,
                ms: elapsed,
                gpu_ms,
            });
        }
    }
    Ok(Sample {
        factors: t.factors,
        eigendecomposition: t.eigendecomposition,
        correction: t.correction,
        fit_total,
        gpu: fitted.gpu_timings_ms.clone(),
        products,
        peak_fit_bytes: fitted.peak_gpu_bytes,
        peak_product_bytes: ctx.memory().peak_bytes(),
        work,
        sweeps: groups.into_inner().1,
    })
}

/// Median of `values` (mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        0.5 * (values[n / 2 - 1] + values[n / 2])
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Runs `warmup` uncounted runs and `runs` counted ones and prints the timing table,
/// then the cost drivers (counts that do not depend on the driver or the load).
fn bench(
    ctx: &GpuContext,
    w: &Workload,
    warmup: usize,
    runs: usize,
    eigensolver: EigensolverKind,
) -> Result<Vec<Sample>> {
    let flops = Flops::of(w)?;
    println!(
        "\nworkload {}: {}\n  N = {}, batch {}, {} parameters; fisher {} ({} sample), {} {}, \
         {}, separate bias; median of {runs} run(s) after {warmup} warm-up run(s)",
        w.name(),
        w.describe(),
        w.data.len,
        w.options.batch_size,
        w.num_params(),
        w.options.fisher,
        w.options.mc_samples,
        w.options.loss,
        w.options.reduction,
        w.options.approx
    );
    let mut first = None;
    for _ in 0..warmup {
        first.get_or_insert(run_once(ctx, w, eigensolver)?);
    }
    let samples = (0..runs)
        .map(|_| run_once(ctx, w, eigensolver))
        .collect::<Result<Vec<_>>>()?;
    let med = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    // GPU medians only when every run was profiled.
    let gpu_med = |f: &dyn Fn(&Sample) -> Option<f64>| {
        samples
            .iter()
            .map(f)
            .collect::<Option<Vec<_>>>()
            .map(median)
    };
    println!(
        "  {:<22} {:>11} {:>10} {:>10} {:>9}",
        "phase", "median ms", "GPU ms", "GFLOP", "GFLOP/s"
    );
    let row = |label: &str, ms: f64, gpu: Option<f64>, flop: Option<f64>| {
        let gpu = gpu.map_or("-".to_string(), |g| format!("{g:.2}"));
        match flop {
            Some(flop) => println!(
                "  {label:<22} {ms:>11.2} {gpu:>10} {:>10.4} {:>9.2}",
                flop / 1e9,
                flop / (ms * 1e-3) / 1e9
            ),
            None => println!("  {label:<22} {ms:>11.2} {gpu:>10} {:>10} {:>9}", "-", "-"),
        }
    };
    row(
        "factors",
        med(&|s| s.factors),
        gpu_med(&|s| s.gpu.as_ref().map(|g| g.factors)),
        Some(flops.factors),
    );
    row(
        "eigendecomposition",
        med(&|s| s.eigendecomposition),
        gpu_med(&|s| s.gpu.as_ref().map(|g| g.eigendecomposition)),
        Some(flops.eigendecomposition),
    );
    row(
        "correction",
        med(&|s| s.correction),
        gpu_med(&|s| s.gpu.as_ref().map(|g| g.correction)),
        Some(flops.correction),
    );
    row(
        "fit total",
        med(&|s| s.fit_total),
        gpu_med(&|s| {
            s.gpu
                .as_ref()
                .map(|g| g.factors + g.eigendecomposition + g.correction)
        }),
        None,
    );
    for (j, p) in samples[0].products.iter().enumerate() {
        let label = format!(
            "{} product K={}",
            match p.approx {
                Approximation::Kfac => "KFAC",
                Approximation::Ekfac => "EKFAC",
            },
            p.columns
        );
        row(
            &label,
            med(&|s| s.products[j].ms),
            gpu_med(&|s| s.products[j].gpu_ms),
            Some(flops.product_per_column * p.columns as f64),
        );
    }
    let peak = |f: &dyn Fn(&Sample) -> u64| samples.iter().map(f).max().unwrap_or(0);
    println!(
        "  peak GPU memory: fit {:.2} MiB, products {:.2} MiB",
        mib(peak(&|s| s.peak_fit_bytes)),
        mib(peak(&|s| s.peak_product_bytes))
    );
    if let Some(first) = first {
        println!(
            "  warm-up run (includes pipeline compilation): fit {:.1} ms",
            first.fit_total
        );
    }
    let medians = (med(&|s| s.factors), med(&|s| s.eigendecomposition));
    let largest = samples[0].sweeps.iter().map(|g| g.0).max().unwrap_or(0);
    let reference = gemm_reference(ctx, largest, GEMM_REFERENCE_RUNS)?;
    print_cost_drivers(&samples[0], &flops, medians, eigensolver, reference);
    Ok(samples)
}

/// Timed runs of the GEMM reference: each takes milliseconds, and a median over many
/// rides out the virtual machines' jitter (medians of 3 spread 3.4–7.5 GFLOP/s at
/// n = 256 on lavapipe).
const GEMM_REFERENCE_RUNS: usize = 21;

/// A lone `n × n × n` GEMM (`ops::gemm`, no transposes) on the same adapter, for the
/// eigendecomposition's GFLOP/s target ("≥ 25 % of the GEMM rate"): `(n, median ms
/// over `runs` runs after one warm-up, each timed around record + submit + wait)`.
/// `None` for `n < 2`.
fn gemm_reference(ctx: &GpuContext, n: usize, runs: usize) -> Result<Option<(usize, f64)>> {
    if n < 2 {
        return Ok(None);
    }
    let fill: Vec<f32> = (0..n * n).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
    let a = ctx.upload(&fill, &[n, n])?;
    let b = ctx.upload(&fill, &[n, n])?;
    let c = ctx.zeros(&[n, n])?;
    let product = Gemm::new(n, n, n, false, false);
    let mut times = Vec::with_capacity(runs);
    for run in 0..=runs {
        let start = Instant::now();
        let mut rec = ctx.recorder();
        gemm(&mut rec, &product, &a, &b, &c)?;
        rec.submit()?;
        ctx.wait("the GEMM reference")?;
        if run > 0 {
            times.push(ms(start));
        }
    }
    Ok(Some((n, median(times))))
}

/// The second table: per phase the dispatches, submissions (compute passes) and host
/// readbacks of one fit (the same in every run), the eigendecomposition's sweeps per
/// factor size, and the ratios the targets are stated in, from the median
/// factor and eigendecomposition times in ms (eigendecomposition
/// time over factor time, eigendecomposition GFLOP/s at the nominal `9n³` over the
/// factor pass's GEMM-bound GFLOP/s). No row starts with a phase name.
fn print_cost_drivers(
    sample: &Sample,
    flops: &Flops,
    (factors, eigen): (f64, f64),
    eigensolver: EigensolverKind,
    reference: Option<(usize, f64)>,
) {
    println!(
        "  cost drivers of one fit  {:>11} {:>11} {:>10} {:>11}",
        "dispatches", "submissions", "readbacks", "GEMM GFLOP"
    );
    for (label, w) in FIT_PHASES.iter().zip(&sample.work) {
        println!(
            "  - {label:<21} {:>11} {:>11} {:>10} {:>11.4}",
            w.dispatches,
            w.submissions,
            w.readbacks,
            w.flops as f64 / 1e9
        );
    }
    let groups: Vec<String> = sample
        .sweeps
        .iter()
        .map(|&(n, k, s)| {
            let times = if k > 1 {
                format!(" ×{k}")
            } else {
                String::new()
            };
            format!("n = {n}{times}: {s}")
        })
        .collect();
    println!(
        "  sweeps by factor group ({eigensolver} solver): {}",
        groups.join(", ")
    );
    let rate = |flop: f64, ms: f64| flop / (ms * 1e-3) / 1e9;
    println!(
        "  ratios: eigendecomposition / factors time {:.2}×; eigendecomposition GFLOP/s \
         (nominal 9n³) {:.1} % of the factor pass's",
        eigen / factors,
        100.0 * rate(flops.eigendecomposition, eigen) / rate(flops.factors, factors)
    );
    if let Some((n, ms)) = reference {
        let gemm_rate = rate(2.0 * (n as f64).powi(3), ms);
        println!(
            "  GEMM reference: a lone {n} × {n} × {n} GEMM (the largest factor's size) \
             {ms:.2} ms (median of {GEMM_REFERENCE_RUNS}), {gemm_rate:.2} GFLOP/s; the eigendecomposition's GFLOP/s \
             (nominal 9n³) is {:.1} % of it",
            100.0 * rate(flops.eigendecomposition, eigen) / gemm_rate
        );
        let counted = sample.work[EIGEN_PHASE_INDEX].flops as f64;
        if counted > 0.0 {
            println!(
                "  GEMM work of the eigendecomposition (counted from its GEMMs' shapes; \
                 the pair solves are not GEMMs): {:.4} GFLOP, {:.1}× the nominal 9n³; \
                 at the median time {:.2} GFLOP/s, {:.1} % of the GEMM reference",
                counted / 1e9,
                counted / flops.eigendecomposition,
                rate(counted, eigen),
                100.0 * rate(counted, eigen) / gemm_rate
            );
        }
    }
}

struct Args {
    size: Size,
    workloads: Vec<WorkloadKind>,
    runs: Option<usize>,
    write_inputs: Option<PathBuf>,
    eigensolver: EigensolverKind,
}

fn parse_args() -> Result<Args> {
    let usage = "usage: bench [--quick | --smoke] [--workload mlp|cnn|resnet|transformer] \
         [--runs N] [--write-inputs DIR] [--eigensolver jacobi|host|auto]";
    let mut args = Args {
        size: Size::Full,
        workloads: vec![WorkloadKind::Mlp, WorkloadKind::Cnn],
        runs: None,
        write_inputs: None,
        eigensolver: EigensolverKind::Jacobi,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.size = Size::Quick,
            "--smoke" => args.size = Size::Smoke,
            "--workload" => {
                args.workloads = match it.next().as_deref() {
                    Some("mlp") => vec![WorkloadKind::Mlp],
                    Some("cnn") => vec![WorkloadKind::Cnn],
                    Some("resnet") => vec![WorkloadKind::Resnet],
                    Some("transformer") => vec![WorkloadKind::Transformer],
                    other => {
                        return Err(Error::Options(format!(
                            "--workload expects mlp, cnn, resnet or transformer, found \
                             {other:?}; {usage}"
                        )));
                    }
                }
            }
            "--runs" => {
                let value = it.next();
                args.runs = Some(
                    value
                        .as_deref()
                        .and_then(|v| v.parse().ok())
                        .filter(|&r: &usize| r > 0)
                        .ok_or_else(|| {
                            Error::Options(format!(
                                "--runs expects a positive integer, found {value:?}; {usage}"
                            ))
                        })?,
                );
            }
            "--eigensolver" => {
                let value = it.next().unwrap_or_default();
                args.eigensolver = value
                    .parse()
                    .map_err(|e| Error::Options(format!("--eigensolver: {e}; {usage}")))?;
            }
            "--write-inputs" => {
                let dir = it.next().ok_or_else(|| {
                    Error::Options(format!("--write-inputs expects a directory; {usage}"))
                })?;
                args.write_inputs = Some(PathBuf::from(dir));
            }
            other => {
                return Err(Error::Options(format!(
                    "unknown argument {other:?}; {usage}"
                )));
            }
        }
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let runs = args
        .runs
        .unwrap_or(if args.size == Size::Full { 5 } else { 2 });
    let ctx = GpuContext::new()?;
    let a = ctx.adapter_summary();
    println!(
        "adapter: {} ({}, {}, {})",
        a.name, a.backend, a.driver, a.device_type
    );
    if ctx.has_timestamps() {
        ctx.set_profiling(true)?;
        println!(
            "GPU timestamps: on (\"GPU ms\": time inside the crate's compute passes; \
             \"median ms\": wall clock on the host)"
        );
    } else {
        println!(
            "GPU timestamps: not available on this adapter (no TIMESTAMP_QUERY, or \
             EKFAC_FEATURES=none); phases are timed on the host only"
        );
    }
    for kind in args.workloads {
        let w = Workload::new(kind, args.size)?;
        if let Some(dir) = &args.write_inputs {
            let dir = dir.join(w.name());
            let outputs = w.first_outputs(&ctx, CHECK_ROWS)?;
            w.write_inputs(&dir, &Flops::of(&w)?, Some(&outputs))?;
            println!("wrote the {} inputs to {}", w.name(), dir.display());
        }
        bench(&ctx, &w, 1, runs, args.eigensolver)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device, or `None` (skipped loudly) without one unless `EKFAC_REQUIRE_GPU=1`.
    fn gpu() -> Option<GpuContext> {
        match GpuContext::new() {
            Ok(ctx) => Some(ctx),
            Err(e) => {
                if std::env::var("EKFAC_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                    panic!("EKFAC_REQUIRE_GPU=1 but no GPU is available: {e}");
                }
                eprintln!("SKIPPING GPU TEST: {e}");
                None
            }
        }
    }

    /// The benchmark end to end on tiny workloads: one run each, every phase timed,
    /// memory counted, products finite (checked in `run_once`). No timing assertions.
    #[test]
    fn smoke() {
        let Some(ctx) = gpu() else { return };
        if ctx.has_timestamps() {
            ctx.set_profiling(true).unwrap();
        }
        // Not the resnet: its smoke size takes about 7 s on lavapipe (5 s of it the
        // Jacobi eigendecomposition of its 144×144 factors), too long for CI; its
        // structure is checked by `resnet_matches_the_python_baseline` and its files by
        // `written_inputs_load_back`. The transformer's smoke size takes about 1 s.
        for kind in [
            WorkloadKind::Mlp,
            WorkloadKind::Cnn,
            WorkloadKind::Transformer,
        ] {
            let w = Workload::new(kind, Size::Smoke).unwrap();
            let samples = bench(&ctx, &w, 0, 1, EigensolverKind::Jacobi).unwrap();
            let s = &samples[0];
            // The cost drivers: every phase dispatches and submits; the Jacobi reports
            // one group per factor size with its sweeps.
            for (phase, work) in FIT_PHASES.iter().zip(&s.work) {
                assert!(
                    work.dispatches > 0 && work.submissions > 0,
                    "{phase}: {work:?}"
                );
                assert!(work.dispatches >= work.submissions, "{phase}: {work:?}");
            }
            // The factor pass's covariances are GEMMs, so it declares their flops.
            assert!(s.work[0].flops > 0, "{:?}", s.work[0]);
            let factors: usize = s.sweeps.iter().map(|g| g.1).sum();
            assert!(
                factors > 0 && s.sweeps.iter().all(|g| g.0 > 0),
                "{:?}",
                s.sweeps
            );
            assert_eq!(s.products.len(), 2 * PRODUCT_COLUMNS.len());
            assert!(s.peak_fit_bytes > 0 && s.peak_product_bytes > 0);
            for t in [s.factors, s.eigendecomposition, s.correction, s.fit_total] {
                assert!(t.is_finite() && t >= 0.0, "{t}");
            }
            assert_eq!(s.gpu.is_some(), ctx.has_timestamps());
            if let Some(g) = &s.gpu {
                for t in [g.factors, g.eigendecomposition, g.correction] {
                    assert!(t.is_finite() && t >= 0.0, "{t}");
                }
            }
        }
    }

    /// `--write-inputs` round-trips through the crate's own loaders unchanged.
    #[test]
    fn written_inputs_load_back() {
        let dir = tempfile::tempdir().unwrap();
        for kind in [
            WorkloadKind::Mlp,
            WorkloadKind::Cnn,
            WorkloadKind::Resnet,
            WorkloadKind::Transformer,
        ] {
            let w = Workload::new(kind, Size::Smoke).unwrap();
            let sub = dir.path().join(w.name());
            w.write_inputs(&sub, &Flops::of(&w).unwrap(), None).unwrap();
            let model =
                Model::load(sub.join("model.json"), sub.join("weights.safetensors")).unwrap();
            assert_eq!(model, w.model);
            let data =
                Dataset::load_checked(sub.join("data.safetensors"), &model.graph, true).unwrap();
            assert_eq!(data, w.data);
            let bench: serde_json::Value =
                serde_json::from_slice(&std::fs::read(sub.join("bench.json")).unwrap()).unwrap();
            assert_eq!(bench["batch_size"], w.options.batch_size);
            assert_eq!(bench["num_params"], w.num_params());
        }
    }

    /// The resnet has the curvature parameters of `tools/bench_curvlinops.py`'s (its
    /// docstring: 270,906 / 19,618 / 5,046), in `named_parameters()` order, with
    /// torchvision's module names, and its 1×1 shortcut only where the shape changes.
    #[test]
    fn resnet_matches_the_python_baseline() {
        for (size, params) in [
            (Size::Full, 270_906),
            (Size::Quick, 19_618),
            (Size::Smoke, 5_046),
        ] {
            let w = Workload::new(WorkloadKind::Resnet, size).unwrap();
            assert_eq!(w.num_params(), params, "{size:?}");
        }
        let w = Workload::new(WorkloadKind::Resnet, Size::Smoke).unwrap();
        let names = w.model.graph.parameters.clone().unwrap();
        let at = |key: &str| names.iter().position(|n| n == key).unwrap();
        assert_eq!(names[..3], ["conv1.weight", "bn1.weight", "bn1.bias"]);
        assert!(at("layer2.0.bn2.bias") < at("layer2.0.downsample.0.weight"));
        assert!(at("layer2.0.downsample.1.bias") < at("layer3.0.conv1.weight"));
        assert_eq!(names[names.len() - 2..], ["fc.weight", "fc.bias"]);
        assert!(!names.iter().any(|n| n.starts_with("layer1.0.downsample")));
        assert_eq!(names.len(), 3 + 3 * 6 + 2 * 3 + 2);
        assert_eq!(w.model.shapes()[0], [3, 8, 8]);
    }

    /// The transformer: curvature parameters `blocks·(12d² + 9d) + 10d + 10` (q, k, v,
    /// o, fc1, fc2 and the head; LayerNorm's are not), every parameter in the
    /// `named_parameters()` order of `tools/bench_curvlinops.py`'s `Transformer`, and
    /// its GPU outputs (the ones `--write-inputs` records) against the crate's f64
    /// reference walk of the same graph (f32 rounding through LayerNorm and softmax:
    /// 1e-5).
    #[test]
    fn transformer_structure_and_outputs() {
        for (size, blocks, d) in [
            (Size::Full, 4, 256),
            (Size::Quick, 2, 32),
            (Size::Smoke, 1, 8),
        ] {
            let w = Workload::new(WorkloadKind::Transformer, size).unwrap();
            assert_eq!(
                w.num_params(),
                blocks * (12 * d * d + 9 * d) + CLASSES * d + CLASSES,
                "{size:?}"
            );
            let names = w.model.graph.parameters.clone().unwrap();
            assert_eq!(names.len(), 2 + 16 * blocks + 4, "{size:?}");
        }
        let w = Workload::new(WorkloadKind::Transformer, Size::Smoke).unwrap();
        let names = w.model.graph.parameters.clone().unwrap();
        let block: Vec<String> = [
            "ln1", "attn.q", "attn.k", "attn.v", "attn.o", "ln2", "mlp.fc1", "mlp.fc2",
        ]
        .iter()
        .flat_map(|m| [format!("blocks.0.{m}.weight"), format!("blocks.0.{m}.bias")])
        .collect();
        assert_eq!(names[..2], ["pos", "embed.weight"]);
        assert_eq!(names[2..18], block[..]);
        assert_eq!(
            names[18..],
            ["ln_f.weight", "ln_f.bias", "head.weight", "head.bias"]
        );
        assert_eq!(w.model.shapes()[0], [4]);
        assert!(w.data.ids.as_ref().unwrap().iter().all(|&i| i < 16));

        let Some(ctx) = gpu() else { return };
        let rows = 5;
        let got = w.first_outputs(&ctx, rows).unwrap();
        let example: usize = w.data.example_shape.iter().product();
        let ids = w.data.ids.as_ref().unwrap();
        let x: Vec<f64> = ids[..rows * example]
            .iter()
            .map(|&i| f64::from(i))
            .collect();
        let want = ekfac::reference::nn::Network64::new(&w.model).outputs(&x, rows);
        assert_eq!(got.len(), rows * CLASSES);
        let (mut err, mut norm) = (0.0f64, 0.0f64);
        for (g, w) in got.iter().zip(&want) {
            err += (f64::from(*g) - w).powi(2);
            norm += w * w;
        }
        let rel = (err / norm).sqrt();
        assert!(rel < 1e-5, "GPU vs f64 reference: relative error {rel:e}");
    }

    /// The FLOP count of the full mlp, by hand: layers (784→512), (512→512), (512→10),
    /// N = 8192, V = 1, separate bias.
    #[test]
    fn flop_count_of_the_mlp() {
        let w = Workload::new(WorkloadKind::Mlp, Size::Full).unwrap();
        let f = Flops::of(&w).unwrap();
        let n = 8192.0;
        let layers = [
            (784.0, 512.0, false),
            (512.0, 512.0, true),
            (512.0, 10.0, true),
        ];
        let (mut factors, mut eig, mut corr, mut prod) = (0.0, 0.0, 0.0, 0.0);
        for (d, o, backward) in layers {
            let pass = 2.0 * n * d * o * if backward { 2.0 } else { 1.0 };
            factors += pass + 2.0 * n * (d * d + o * o);
            eig += 9.0 * (d * d * d + o * o * o);
            corr += pass + 2.0 * n * (d * d + o * o + o * d) + 2.0 * n * o * o;
            prod += 4.0 * o * d * (o + d) + 4.0 * o * o;
        }
        for (got, want) in [
            (f.factors, factors),
            (f.eigendecomposition, eig),
            (f.correction, corr),
            (f.product_per_column, prod),
        ] {
            assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
        }
    }
}
