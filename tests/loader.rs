//! Model, weights and data loading: the formats of issue 2 parse, and every bad input gives
//! an error (never a panic) whose message names the layer/key and the problem.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ekfac::graph::chain::{Conv2dSpec, Layer, LinearSpec, PoolSpec};
use ekfac::graph::{Model, ModelSpec};
use ekfac::model::{Dataset, Targets, TargetsSlice};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

const ISSUE_EXAMPLE: &str = r#"{"input_shape": [3, 32, 32], "layers": [
  {"type": "conv2d", "name": "0", "in_channels": 3, "out_channels": 16, "kernel_size": [3, 3],
   "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "bias": true},
  {"type": "relu"},
  {"type": "max_pool2d", "kernel_size": [2, 2], "stride": [2, 2], "padding": [0, 0]},
  {"type": "flatten"},
  {"type": "linear", "name": "4", "in_features": 4096, "out_features": 10, "bias": true}]}"#;

fn parse(text: &str) -> ekfac::Result<ModelSpec> {
    ModelSpec::from_json_str(text, "model.json")
}

/// The error message of `r`, which must be an error.
fn err_text<T: std::fmt::Debug>(r: ekfac::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

/// Asserts the message contains every fragment.
fn assert_mentions(msg: &str, fragments: &[&str]) {
    for f in fragments {
        assert!(
            msg.contains(f),
            "error message {msg:?} does not mention {f:?}"
        );
    }
}

/// A one-layer-list model with the given layers on an input of shape `input`.
fn spec_text(input: &str, layers: &str) -> String {
    format!(r#"{{"input_shape": {input}, "layers": [{layers}]}}"#)
}

/// Parses and validates; returns the error message.
fn spec_error(input: &str, layers: &str) -> String {
    err_text(parse(&spec_text(input, layers)).and_then(|s| s.shapes()))
}

#[test]
fn issue_example_parses_with_shapes() {
    let spec = parse(ISSUE_EXAMPLE).unwrap();
    assert_eq!(spec.layers.len(), 5);
    let shapes = spec.shapes().unwrap();
    assert_eq!(
        shapes,
        vec![
            vec![3, 32, 32],
            vec![16, 32, 32],
            vec![16, 32, 32],
            vec![16, 16, 16],
            vec![4096],
            vec![10]
        ]
    );
    // The explicit JSON form parses back to the same spec.
    assert_eq!(parse(&spec.to_json()).unwrap(), spec);
}

#[test]
fn defaults_follow_pytorch() {
    let spec = parse(&spec_text(
        "[4, 9, 9]",
        r#"{"type": "conv2d", "in_channels": 4, "out_channels": 6, "kernel_size": 3},
           {"type": "tanh"},
           {"type": "avg_pool2d", "kernel_size": [3, 2]},
           {"type": "max_pool2d", "kernel_size": 1, "stride": null},
           {"type": "flatten"},
           {"type": "linear", "in_features": 36, "out_features": 2}"#,
    ))
    .unwrap();
    assert_eq!(
        spec.layers[0],
        Layer::Conv2d(Conv2dSpec::new("0", 4, 6, [3, 3]))
    );
    assert_eq!(spec.layers[2], Layer::AvgPool2d(PoolSpec::new([3, 2])));
    assert_eq!(spec.layers[3], Layer::MaxPool2d(PoolSpec::new([1, 1])));
    assert_eq!(spec.layers[5], Layer::Linear(LinearSpec::new("5", 36, 2)));
    assert_eq!(spec.shapes().unwrap()[4], vec![6, 2, 3]);
}

#[test]
fn unknown_and_unsupported_keys_are_rejected() {
    let msg = err_text(parse(&spec_text(
        "[1, 4, 4]",
        r#"{"type": "max_pool2d", "kernel_size": 2, "ceil_mode": true}"#,
    )));
    assert_mentions(
        &msg,
        &[
            "model.json",
            "layers[0] (max_pool2d)",
            "ceil_mode",
            "unsupported",
        ],
    );
    let msg = err_text(parse(&spec_text(
        "[1, 4, 4]",
        r#"{"type": "avg_pool2d", "kernel_size": 2, "count_include_pad": false}"#,
    )));
    assert_mentions(
        &msg,
        &["layers[0] (avg_pool2d)", "count_include_pad", "unsupported"],
    );
    let msg = err_text(parse(&spec_text(
        "[4]",
        r#"{"type": "linear", "in_features": 4, "out_features": 2, "bias_init": 0}"#,
    )));
    assert_mentions(&msg, &["layers[0] (linear)", "unknown key \"bias_init\""]);
    let msg = err_text(parse(r#"{"input_shape": [4], "layers": [], "extra": 1}"#));
    assert_mentions(&msg, &["model.json", "unknown key \"extra\""]);
}

#[test]
fn pytorch_options_at_supported_values_are_accepted() {
    let spec = parse(&spec_text(
        "[2, 7, 6]",
        r#"{"type": "conv2d", "in_channels": 2, "out_channels": 2, "kernel_size": [3, 2],
            "dilation": [1, 2], "padding": "same", "padding_mode": "zeros"},
           {"type": "relu", "inplace": true},
           {"type": "max_pool2d", "kernel_size": 2, "ceil_mode": false, "dilation": 1,
            "return_indices": false},
           {"type": "avg_pool2d", "kernel_size": 1, "count_include_pad": true,
            "divisor_override": null},
           {"type": "conv2d", "in_channels": 2, "out_channels": 2, "kernel_size": 2,
            "padding": "valid"},
           {"type": "flatten", "start_dim": 1, "end_dim": -1}"#,
    ))
    .unwrap();
    let Layer::Conv2d(c) = &spec.layers[0] else {
        panic!()
    };
    assert_eq!(c.padding, [1, 1]);
    assert_eq!(spec.shapes().unwrap()[1], vec![2, 7, 6]);
    let msg = err_text(parse(&spec_text(
        "[2, 7, 6]",
        r#"{"type": "conv2d", "in_channels": 2, "out_channels": 2, "kernel_size": 2,
            "padding": "same"}"#,
    )));
    assert_mentions(&msg, &["padding = \"same\"", "asymmetric", "unsupported"]);
    // PyTorch refuses padding = "same" with a stride; so does the chain format, as the
    // graph format does (one attribute reader serves both).
    let msg = err_text(parse(&spec_text(
        "[2, 7, 6]",
        r#"{"type": "conv2d", "in_channels": 2, "out_channels": 2, "kernel_size": 3,
            "stride": 2, "padding": "same"}"#,
    )));
    assert_mentions(
        &msg,
        &["layers[0] (conv2d)", "padding = \"same\"", "stride 1"],
    );
    let msg = err_text(parse(&spec_text(
        "[2, 7, 6]",
        r#"{"type": "conv2d", "in_channels": 2, "out_channels": 2, "kernel_size": 2,
            "padding_mode": "reflect"}"#,
    )));
    assert_mentions(&msg, &["padding_mode", "unsupported"]);
    let msg = err_text(parse(&spec_text(
        "[4, 4]",
        r#"{"type": "flatten", "start_dim": 0}"#,
    )));
    assert_mentions(&msg, &["layers[0] (flatten)", "start_dim", "unsupported"]);
}

#[test]
fn unknown_layer_type_is_rejected() {
    let msg = err_text(parse(&spec_text("[4]", r#"{"type": "batch_norm"}"#)));
    assert_mentions(&msg, &["layers[0]", "unknown layer type \"batch_norm\""]);
}

#[test]
fn malformed_json_and_fields_are_rejected() {
    assert_mentions(
        &err_text(parse("{\"input_shape\": [4], ")),
        &["model.json", "invalid JSON"],
    );
    assert_mentions(&err_text(parse("[1, 2]")), &["expected a JSON object"]);
    assert_mentions(
        &err_text(parse(r#"{"layers": []}"#)),
        &["missing key \"input_shape\""],
    );
    assert_mentions(
        &err_text(parse(r#"{"input_shape": [4]}"#)),
        &["missing key \"layers\""],
    );
    assert_mentions(
        &err_text(parse(r#"{"input_shape": [4, -1], "layers": []}"#)),
        &["input_shape", "-1"],
    );
    assert_mentions(
        &err_text(parse(&spec_text("[4]", r#"{"name": "a"}"#))),
        &["layers[0]", "missing key \"type\""],
    );
    assert_mentions(
        &err_text(parse(&spec_text(
            "[4]",
            r#"{"type": "linear", "in_features": 4}"#,
        ))),
        &["layers[0] (linear)", "missing key \"out_features\""],
    );
    assert_mentions(
        &err_text(parse(&spec_text(
            "[4]",
            r#"{"type": "linear", "in_features": 4.5, "out_features": 2}"#,
        ))),
        &["\"in_features\"", "non-negative integer", "4.5"],
    );
    assert_mentions(
        &err_text(parse(&spec_text(
            "[2, 4, 4]",
            r#"{"type": "conv2d", "in_channels": 2, "out_channels": 2, "kernel_size": [1, 2, 3]}"#,
        ))),
        &["\"kernel_size\"", "list of 2 integers", "[1,2,3]"],
    );
    assert_mentions(
        &err_text(parse(&spec_text(
            "[4]",
            r#"{"type": "linear", "in_features": 4, "out_features": 2, "bias": "yes"}"#,
        ))),
        &["\"bias\"", "true or false"],
    );
}

#[test]
fn shape_mismatches_name_the_layer() {
    assert_mentions(
        &spec_error(
            "[3, 8, 8]",
            r#"{"type": "conv2d", "name": "c1", "in_channels": 4, "out_channels": 4, "kernel_size": 3}"#,
        ),
        &[
            "layers[0] \"c1\" (conv2d)",
            "in_channels is 4",
            "3 channels",
        ],
    );
    assert_mentions(
        &spec_error(
            "[4, 8, 8]",
            r#"{"type": "conv2d", "in_channels": 4, "out_channels": 6, "kernel_size": 3, "groups": 3}"#,
        ),
        &[
            "layers[0] \"0\" (conv2d)",
            "in_channels (4) is not divisible by groups (3)",
        ],
    );
    assert_mentions(
        &spec_error(
            "[4, 8, 8]",
            r#"{"type": "conv2d", "in_channels": 4, "out_channels": 6, "kernel_size": 3, "groups": 4}"#,
        ),
        &["out_channels (6) is not divisible by groups (4)"],
    );
    assert_mentions(
        &spec_error(
            "[1, 5, 5]",
            r#"{"type": "conv2d", "in_channels": 1, "out_channels": 1, "kernel_size": 3, "dilation": 3}"#,
        ),
        &["layers[0] \"0\" (conv2d)", "output size would be ≤ 0"],
    );
    assert_mentions(
        &spec_error(
            "[1, 3, 3]",
            r#"{"type": "max_pool2d", "kernel_size": 4}, {"type": "flatten"}"#,
        ),
        &["layers[0] (max_pool2d)", "output size would be ≤ 0"],
    );
    assert_mentions(
        &spec_error(
            "[1, 6, 6]",
            r#"{"type": "avg_pool2d", "kernel_size": 2, "padding": 2}, {"type": "flatten"}"#,
        ),
        &["layers[0] (avg_pool2d)", "at most half the kernel size"],
    );
    assert_mentions(
        &spec_error("[6]", r#"{"type": "max_pool2d", "kernel_size": 2}"#),
        &["layers[0] (max_pool2d)", "4-D input", "[B, 6]"],
    );
    assert_mentions(
        &spec_error(
            "[2, 4, 4]",
            r#"{"type": "linear", "name": "fc", "in_features": 32, "out_features": 2}"#,
        ),
        &["layers[0] \"fc\" (linear)", "[B, 2, 4, 4]", "add a flatten"],
    );
    assert_mentions(
        &spec_error(
            "[2, 4, 4]",
            r#"{"type": "flatten"}, {"type": "linear", "in_features": 30, "out_features": 2}"#,
        ),
        &[
            "layers[1] \"1\" (linear)",
            "in_features is 30",
            "last dimension is 32",
        ],
    );
    assert_mentions(
        &spec_error(
            "[2, 4, 4]",
            r#"{"type": "conv2d", "in_channels": 2, "out_channels": 2, "kernel_size": 1}"#,
        ),
        &["network output must be 2-D", "add a flatten"],
    );
    assert_mentions(
        &spec_error(
            "[4]",
            r#"{"type": "linear", "name": "a", "in_features": 4, "out_features": 4},
               {"type": "linear", "name": "a", "in_features": 4, "out_features": 2}"#,
        ),
        &["layers[1] \"a\" (linear)", "used by an earlier layer"],
    );
    assert_mentions(&spec_error("[4]", ""), &["no layers"]);
    assert_mentions(
        &spec_error("[0]", r#"{"type": "relu"}"#),
        &["input_shape", "positive"],
    );
}

/// A safetensors file with the given `(key, dtype, shape, little-endian bytes)`.
fn write_safetensors(
    dir: &Path,
    file: &str,
    tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
) -> PathBuf {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, dtype, shape, bytes)| {
            (
                k.to_string(),
                TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    let path = dir.join(file);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn f32_bytes(n: usize, scale: f32) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (scale * i as f32).to_le_bytes())
        .collect()
}

const SMALL_MODEL: &str = r#"{"input_shape": [2, 5, 5], "layers": [
  {"type": "conv2d", "name": "conv", "in_channels": 2, "out_channels": 4, "kernel_size": [3, 2],
   "groups": 2, "bias": false},
  {"type": "flatten"},
  {"type": "linear", "name": "fc", "in_features": 48, "out_features": 3}]}"#;

/// Writes SMALL_MODEL and returns its path.
fn small_model(dir: &Path) -> PathBuf {
    let path = dir.join("model.json");
    std::fs::write(&path, SMALL_MODEL).unwrap();
    path
}

fn good_tensors() -> Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)> {
    vec![
        (
            "conv.weight",
            Dtype::F32,
            vec![4, 1, 3, 2],
            f32_bytes(24, 0.5),
        ),
        ("fc.weight", Dtype::F32, vec![3, 48], f32_bytes(144, 0.25)),
        ("fc.bias", Dtype::F32, vec![3], f32_bytes(3, 1.0)),
    ]
}

#[test]
fn weights_load_and_convert() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = small_model(dir.path());
    let weights = write_safetensors(dir.path(), "w.safetensors", &good_tensors());
    let model = Model::load(&model_path, &weights).unwrap();
    assert_eq!(model.curvature_layers(), vec![0, 2]);
    assert_eq!(model.num_outputs(), 3);
    let conv = model.params[0].as_ref().unwrap();
    assert_eq!(conv.weight()[3], 1.5);
    assert!(conv.bias().is_none());
    assert!(model.params[1].is_none());
    assert_eq!(
        model.params[2].as_ref().unwrap().bias(),
        Some(&[0.0, 1.0, 2.0][..])
    );

    // F64, F16 and BF16 weights are converted to f32 (0.25·i is exact in all of them).
    let f64_bytes: Vec<u8> = (0..144)
        .flat_map(|i| (0.25 * i as f64).to_le_bytes())
        .collect();
    let f16_bytes: Vec<u8> = (0..24)
        .flat_map(|i| half::f16::from_f32(0.5 * i as f32).to_le_bytes())
        .collect();
    let bf16_bytes: Vec<u8> = (0..3)
        .flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes())
        .collect();
    let converted = write_safetensors(
        dir.path(),
        "w2.safetensors",
        &[
            ("conv.weight", Dtype::F16, vec![4, 1, 3, 2], f16_bytes),
            ("fc.weight", Dtype::F64, vec![3, 48], f64_bytes),
            ("fc.bias", Dtype::BF16, vec![3], bf16_bytes),
        ],
    );
    let model2 = Model::load(&model_path, &converted).unwrap();
    assert_eq!(model2, model);
    assert_eq!(model2.fingerprint(), model.fingerprint());
    assert_eq!(model.fingerprint().len(), 16);

    // The same model built from Rust.
    let tensors: HashMap<String, (Vec<usize>, Vec<f32>)> = model
        .params
        .iter()
        .zip(&model.chain().unwrap().layers)
        .filter_map(|(p, l)| Some((p.as_ref()?, l.name()?, l)))
        .flat_map(|(p, name, l)| {
            let mut v = vec![(
                format!("{name}.weight"),
                (l.weight_shape().unwrap(), p.weight().to_vec()),
            )];
            if let Some(b) = p.bias() {
                v.push((
                    format!("{name}.bias"),
                    (l.bias_shape().unwrap(), b.to_vec()),
                ));
            }
            v
        })
        .collect();
    let built = Model::new(model.graph.clone(), tensors).unwrap();
    assert_eq!(built, model);

    // Changing one weight changes the fingerprint.
    let mut other = model.clone();
    other.params[2].as_mut().unwrap().get_mut("weight").unwrap()[7] += 1.0;
    assert_ne!(other.fingerprint(), model.fingerprint());
}

/// Loads SMALL_MODEL with `tensors` and returns the error message.
fn weights_error(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let model_path = small_model(dir.path());
    let weights = write_safetensors(dir.path(), "w.safetensors", tensors);
    err_text(Model::load(&model_path, &weights))
}

#[test]
fn bad_weights_are_rejected() {
    let good = good_tensors();
    // Missing key.
    let msg = weights_error(&good[..2]);
    assert_mentions(&msg, &["w.safetensors", "missing key \"fc.bias\"", "[3]"]);
    // Extra key, and a bias given to a layer without one.
    let mut extra = good.clone();
    extra.push(("head.weight", Dtype::F32, vec![1], f32_bytes(1, 1.0)));
    assert_mentions(&weights_error(&extra), &["unexpected key \"head.weight\""]);
    let mut bias = good.clone();
    bias.push(("conv.bias", Dtype::F32, vec![4], f32_bytes(4, 1.0)));
    assert_mentions(
        &weights_error(&bias),
        &["unexpected key \"conv.bias\"", "bias = false"],
    );
    // Wrong shape (conv weight without groups).
    let mut shape = good.clone();
    shape[0] = (
        "conv.weight",
        Dtype::F32,
        vec![4, 2, 3, 2],
        f32_bytes(48, 1.0),
    );
    assert_mentions(
        &weights_error(&shape),
        &[
            "\"conv.weight\"",
            "expected shape [4, 1, 3, 2]",
            "found [4, 2, 3, 2]",
        ],
    );
    // Wrong dtype.
    let mut dtype = good.clone();
    dtype[2] = ("fc.bias", Dtype::I64, vec![3], vec![0; 24]);
    assert_mentions(
        &weights_error(&dtype),
        &["\"fc.bias\"", "I64", "floating-point"],
    );
    // Not a safetensors file.
    let dir = tempfile::tempdir().unwrap();
    let model_path = small_model(dir.path());
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    assert_mentions(
        &err_text(Model::load(&model_path, &junk)),
        &["junk.safetensors", "not a valid safetensors"],
    );
    // Missing files.
    assert_mentions(
        &err_text(Model::load(dir.path().join("nope.json"), &junk)),
        &["nope.json"],
    );
    // A bad spec is reported before the weights are read.
    let bad_spec = dir.path().join("bad.json");
    std::fs::write(
        &bad_spec,
        SMALL_MODEL.replace("\"in_features\": 48", "\"in_features\": 47"),
    )
    .unwrap();
    assert_mentions(
        &err_text(Model::load(&bad_spec, &junk)),
        &["\"fc\" (linear)", "in_features is 47"],
    );
}

const DATA_MODEL: &str = r#"{"input_shape": [2, 3], "layers": [
  {"type": "flatten"}, {"type": "linear", "in_features": 6, "out_features": 4}]}"#;

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|k| k.to_le_bytes()).collect()
}

/// A data file with `x` F32 `[5, 2, 3]` and the given `y`; extra tensors appended.
fn data_file(dir: &Path, y: (Dtype, Vec<usize>, Vec<u8>)) -> PathBuf {
    write_safetensors(
        dir,
        "data.safetensors",
        &[
            ("x", Dtype::F32, vec![5, 2, 3], f32_bytes(30, 0.1)),
            ("y", y.0, y.1, y.2),
        ],
    )
}

#[test]
fn data_loads_and_batches() {
    let spec = parse(DATA_MODEL).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // I64 [N] class indices.
    let path = data_file(
        dir.path(),
        (Dtype::I64, vec![5], i64_bytes(&[0, 3, 1, 2, 3])),
    );
    let data = Dataset::load(&path).unwrap();
    data.check(&spec.to_graph().unwrap(), true).unwrap();
    assert_eq!((data.len, data.example_shape.clone()), (5, vec![2, 3]));
    assert_eq!(data.y, Targets::Classes(vec![0, 3, 1, 2, 3]));
    let batches: Vec<_> = data.batches(2).collect();
    assert_eq!(batches.len(), 3);
    assert_eq!((batches[2].start, batches[2].len), (4, 1));
    assert_eq!(batches[1].x, &data.x[12..24]);
    assert_eq!(batches[1].y, TargetsSlice::Classes(&[1, 2]));
    assert_eq!(batches[2].x[0], 24.0 * 0.1);
    // I32 [N, 1] class indices.
    let i32_bytes: Vec<u8> = [3i32, 2, 1, 0, 0]
        .iter()
        .flat_map(|k| k.to_le_bytes())
        .collect();
    let path = data_file(dir.path(), (Dtype::I32, vec![5, 1], i32_bytes));
    let data = Dataset::load_checked(&path, &spec.to_graph().unwrap(), true).unwrap();
    assert_eq!(data.y, Targets::Classes(vec![3, 2, 1, 0, 0]));
    // F32 [N, C] values.
    let path = data_file(dir.path(), (Dtype::F32, vec![5, 4], f32_bytes(20, 0.5)));
    let data = Dataset::load_checked(&path, &spec.to_graph().unwrap(), false).unwrap();
    let b = data.batches(3).nth(1).unwrap();
    assert_eq!(
        b.y,
        TargetsSlice::Values {
            data: &data_values(&data)[12..20],
            cols: 4
        }
    );
}

fn data_values(data: &Dataset) -> &[f32] {
    match &data.y {
        Targets::Values { data, .. } => data,
        Targets::Classes(_) => panic!("expected values"),
    }
}

#[test]
fn bad_data_is_rejected() {
    let spec = parse(DATA_MODEL).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let load = |tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]| {
        err_text(Dataset::load(write_safetensors(
            d,
            "bad.safetensors",
            tensors,
        )))
    };
    let x = ("x", Dtype::F32, vec![5, 2, 3], f32_bytes(30, 0.1));
    let y = ("y", Dtype::I64, vec![5], i64_bytes(&[0, 1, 2, 3, 0]));
    assert_mentions(
        &load(std::slice::from_ref(&y)),
        &["bad.safetensors", "missing key \"x\""],
    );
    assert_mentions(&load(std::slice::from_ref(&x)), &["missing key \"y\""]);
    let mut extra = vec![x.clone(), y.clone()];
    extra.push(("w", Dtype::F32, vec![1], f32_bytes(1, 1.0)));
    assert_mentions(&load(&extra), &["unexpected key \"w\""]);
    // Wrong dtypes.
    let x64: Vec<u8> = (0..30).flat_map(|i| (i as f64).to_le_bytes()).collect();
    assert_mentions(
        &load(&[("x", Dtype::F64, vec![5, 2, 3], x64), y.clone()]),
        &["\"x\"", "F32", "F64"],
    );
    assert_mentions(
        &load(&[x.clone(), ("y", Dtype::U8, vec![5], vec![0; 5])]),
        &["\"y\"", "U8"],
    );
    // Wrong shapes.
    assert_mentions(
        &load(&[
            x.clone(),
            ("y", Dtype::I64, vec![5, 2], i64_bytes(&[0; 10])),
        ]),
        &["\"y\"", "[N] or [N, 1]", "[5, 2]"],
    );
    assert_mentions(
        &load(&[x.clone(), ("y", Dtype::F32, vec![5], f32_bytes(5, 1.0))]),
        &["\"y\"", "[N, C]", "[5]"],
    );
    assert_mentions(
        &load(&[x.clone(), ("y", Dtype::I64, vec![4], i64_bytes(&[0; 4]))]),
        &["5 examples", "has 4"],
    );
    assert_mentions(
        &load(&[("x", Dtype::F32, vec![30], f32_bytes(30, 1.0)), y.clone()]),
        &["\"x\"", "[N, *input_shape]"],
    );
    // Non-finite values, reported at their first index.
    let mut nan_x = f32_bytes(30, 0.1);
    nan_x[4 * 17..4 * 18].copy_from_slice(&f32::NAN.to_le_bytes());
    assert_mentions(
        &load(&[("x", Dtype::F32, vec![5, 2, 3], nan_x), y.clone()]),
        &["\"x\"", "x[2, 1, 2]", "NaN"],
    );
    let mut inf_y = f32_bytes(20, 0.1);
    inf_y[4 * 9..4 * 10].copy_from_slice(&f32::INFINITY.to_le_bytes());
    assert_mentions(
        &load(&[x.clone(), ("y", Dtype::F32, vec![5, 4], inf_y)]),
        &["\"y\"", "y[2, 1]", "inf"],
    );
    // Data that does not fit the model.
    let check = |tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)], classes: bool| {
        let path = write_safetensors(d, "misfit.safetensors", tensors);
        let data = Dataset::load(&path).unwrap();
        let graph = spec.to_graph().unwrap();
        assert!(data.check(&graph, classes).is_err());
        err_text(Dataset::load_checked(&path, &graph, classes))
    };
    assert_mentions(
        &check(
            &[
                ("x", Dtype::F32, vec![5, 3, 2], f32_bytes(30, 0.1)),
                y.clone(),
            ],
            true,
        ),
        &["misfit.safetensors", "input_shape is [2, 3]", "[5, 3, 2]"],
    );
    assert_mentions(
        &check(
            &[
                x.clone(),
                ("y", Dtype::I64, vec![5], i64_bytes(&[0, 1, 4, 3, 0])),
            ],
            true,
        ),
        &["y[2] = 4", "0..4"],
    );
    assert_mentions(
        &check(
            &[
                x.clone(),
                ("y", Dtype::I64, vec![5], i64_bytes(&[0, -1, 2, 3, 0])),
            ],
            true,
        ),
        &["y[1] = -1"],
    );
    assert_mentions(
        &check(
            &[x.clone(), ("y", Dtype::F32, vec![5, 4], f32_bytes(20, 0.1))],
            true,
        ),
        &["cross-entropy needs", "class indices"],
    );
    assert_mentions(
        &check(&[x.clone(), y.clone()], false),
        &["F32 targets [N, C] = [5, 4]"],
    );
    assert_mentions(
        &check(
            &[x.clone(), ("y", Dtype::F32, vec![5, 3], f32_bytes(15, 0.1))],
            false,
        ),
        &["[5, 4]", "F32 values [5, 3]"],
    );
    // An empty data set.
    assert_mentions(
        &load(&[
            ("x", Dtype::F32, vec![0, 2, 3], vec![]),
            ("y", Dtype::I64, vec![0], vec![]),
        ]),
        &["no examples"],
    );
}

/// The library's loaders read model descriptions as the CLI does: a device or a FIFO is
/// refused by name without being read (no endless read, no hang), an oversized file
/// without being parsed.
#[test]
fn library_loaders_refuse_devices_fifos_and_oversized_json() {
    for path in ["/dev/zero", "/dev/urandom"] {
        for err in [
            ekfac::graph::json::load(path).unwrap_err().to_string(),
            ModelSpec::load(path).unwrap_err().to_string(),
        ] {
            assert!(
                err.contains(path) && err.contains("must be a regular file"),
                "{err}"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.json");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
    let err = ekfac::graph::json::load(&fifo).unwrap_err().to_string();
    assert!(err.contains("a FIFO") || err.contains("regular"), "{err}");
    let big = dir.path().join("big.json");
    let file = std::fs::File::create(&big).unwrap();
    file.set_len(ekfac::io::MAX_JSON_BYTES + 1).unwrap();
    let err = ekfac::graph::json::load(&big).unwrap_err().to_string();
    assert!(err.contains("more than the limit"), "{err}");
}
