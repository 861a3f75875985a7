//! Issue 10: property tests (proptest, stable Rust) that mutate valid inputs — model
//! JSON, safetensors weights, data and state files — in their bytes and in their
//! structure, and feed them to the parsers and validators in-process (thousands of
//! cases) and, for a few dozen, through whole GPU fits. Every case must end in `Ok` or
//! a clean `Err` with a message: no panic, within a time bound per case, and the
//! process's peak resident memory stays bounded.
//!
//! Mutations: byte edits (overwrite, insert, delete, truncate) anywhere in the file,
//! and structural edits of the JSON (the model, or the safetensors header re-serialised
//! with its new length) that replace any value, at any depth, by one of a list of
//! hostile values (negative, zero, huge, 2^63 + 1, 1e300, wrong types, long arrays).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ekfac::curvature::operator::{Approximation, Transform, eigenbasis_scaling};
use ekfac::curvature::options::{DampingMode, FisherType, Options};
use ekfac::curvature::state::CurvatureState;
use ekfac::graph::Model;
use ekfac::graph::json::from_json_str;
use ekfac::model::TensorFile;
use ekfac::model::data::Dataset;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRng, TestRunner};
use serde_json::{Value, json};

/// Cases per mutated file (each property covers two files).
const CASES_PER_FILE: u32 = 5000;
/// Longest one in-process case may take.
const CASE_LIMIT: Duration = Duration::from_secs(2);
/// Largest peak resident memory (VmHWM) of this test process.
const PEAK_RSS_LIMIT_MIB: u64 = 2048;

fn fixture(case: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/curvature")
        .join(case)
        .join(name)
}

/// The cases whose inputs are mutated: an MLP and a CNN.
const CASES: [&str; 2] = [
    "mlp_tanh_ce_mean_type2_sep",
    "cnn_a_ce_mean_type2_reduce_sep",
];

/// One edit of a byte string; positions are taken modulo the length.
#[derive(Clone, Debug)]
enum ByteEdit {
    Overwrite(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn byte_edits() -> impl Strategy<Value = Vec<ByteEdit>> {
    let edit = prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| ByteEdit::Overwrite(p, b)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| ByteEdit::Insert(p, b)),
        2 => any::<usize>().prop_map(ByteEdit::Delete),
        1 => any::<usize>().prop_map(ByteEdit::Truncate),
    ];
    prop::collection::vec(edit, 1..6)
}

/// Byte edits concentrated on the first `focus` bytes (a header), with probability
/// one half, else anywhere.
fn apply_bytes(base: &[u8], edits: &[ByteEdit], focus: usize) -> Vec<u8> {
    let mut b = base.to_vec();
    for e in edits {
        let len = b.len().max(1);
        let pos = |p: usize| {
            if p.is_multiple_of(2) && focus > 0 {
                (p / 2) % focus.min(len)
            } else {
                (p / 2) % len
            }
        };
        match *e {
            ByteEdit::Overwrite(p, v) if !b.is_empty() => {
                let i = pos(p);
                b[i] = v;
            }
            ByteEdit::Insert(p, v) => {
                let i = pos(p).min(b.len());
                b.insert(i, v);
            }
            ByteEdit::Delete(p) if !b.is_empty() => {
                let i = pos(p);
                b.remove(i);
            }
            ByteEdit::Truncate(p) => {
                let i = pos(p).min(b.len());
                b.truncate(i);
            }
            _ => {}
        }
    }
    b
}

/// Hostile replacement values for structural edits.
fn hostile_value(i: usize) -> Value {
    match i % 16 {
        0 => json!(-1),
        1 => json!(0),
        2 => json!(1),
        3 => json!(9_223_372_036_854_775_809u64),
        4 => json!(u64::MAX),
        5 => json!(1e300),
        6 => json!(-1e300),
        7 => json!(0.5),
        8 => json!("x"),
        9 => json!(null),
        10 => json!(true),
        11 => json!([]),
        12 => json!({}),
        13 => json!([1_000_000_000, 1_000_000_000]),
        14 => Value::Array(vec![json!(3); 1000]),
        _ => json!(4_294_967_296u64),
    }
}

/// A structural edit: a path of child indices (modulo the number of children) and
/// what to do at its end: replace by a hostile value, remove it, or duplicate it.
#[derive(Clone, Debug)]
struct JsonEdit {
    path: Vec<usize>,
    action: usize,
}

fn json_edits() -> impl Strategy<Value = Vec<JsonEdit>> {
    prop::collection::vec(
        (prop::collection::vec(any::<usize>(), 1..6), 0usize..20)
            .prop_map(|(path, action)| JsonEdit { path, action }),
        1..4,
    )
}

fn edit_json(v: &mut Value, edit: &JsonEdit) {
    edit_at(v, &edit.path, edit.action);
}

fn edit_at(node: &mut Value, path: &[usize], action: usize) {
    let Some((&i, rest)) = path.split_first() else {
        *node = hostile_value(action);
        return;
    };
    let structural = rest.is_empty() && action >= 18;
    match node {
        Value::Object(map) if !map.is_empty() => {
            let key = map.keys().nth(i % map.len()).unwrap().clone();
            if structural {
                if action == 18 {
                    map.remove(&key);
                } else {
                    let copy = map[&key].clone();
                    map.insert(format!("{key}_copy"), copy);
                }
            } else {
                edit_at(map.get_mut(&key).unwrap(), rest, action);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let j = i % items.len();
            if structural {
                if action == 18 {
                    items.remove(j);
                } else {
                    let copy = items[j].clone();
                    items.push(copy);
                }
            } else {
                edit_at(&mut items[j], rest, action);
            }
        }
        _ => *node = hostile_value(action),
    }
}

/// A safetensors file with its header JSON edited structurally (data bytes kept).
fn edit_safetensors_header(base: &[u8], edits: &[JsonEdit]) -> Vec<u8> {
    let n = u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&base[8..8 + n]).unwrap();
    for e in edits {
        edit_json(&mut header, e);
    }
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&base[8 + n..]);
    out
}

fn header_len(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// A mutation: bytes, structure (of JSON or a safetensors header), or values (4-byte
/// words of a safetensors file's data overwritten by hostile f32 values).
#[derive(Clone, Debug)]
enum Mutation {
    Bytes(Vec<ByteEdit>),
    Structure(Vec<JsonEdit>),
    Values(Vec<(usize, usize)>),
}

fn mutations() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        byte_edits().prop_map(Mutation::Bytes),
        json_edits().prop_map(Mutation::Structure),
        prop::collection::vec((any::<usize>(), 0usize..8), 1..4).prop_map(Mutation::Values),
    ]
}

/// Hostile f32 values for the data section.
const HOSTILE_F32: [f32; 8] = [
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    3e38,
    -3e38,
    0.0,
    -1.0,
    1e-45,
];

fn mutate_json(base: &str, m: &Mutation) -> String {
    match m {
        Mutation::Values(v) => {
            let edits: Vec<ByteEdit> = v
                .iter()
                .map(|&(p, i)| ByteEdit::Overwrite(p, b"-0e9.\"{}["[i]))
                .collect();
            String::from_utf8_lossy(&apply_bytes(base.as_bytes(), &edits, 0)).into()
        }
        Mutation::Bytes(e) => String::from_utf8_lossy(&apply_bytes(base.as_bytes(), e, 0)).into(),
        Mutation::Structure(e) => {
            let mut v: Value = serde_json::from_str(base).unwrap();
            for edit in e {
                edit_json(&mut v, edit);
            }
            v.to_string()
        }
    }
}

fn mutate_safetensors(base: &[u8], m: &Mutation) -> Vec<u8> {
    match m {
        Mutation::Bytes(e) => apply_bytes(base, e, header_len(base)),
        Mutation::Structure(e) => edit_safetensors_header(base, e),
        Mutation::Values(v) => {
            let start = header_len(base);
            let words = (base.len() - start) / 4;
            let mut out = base.to_vec();
            for &(p, i) in v {
                if words > 0 {
                    let at = start + 4 * (p % words);
                    out[at..at + 4].copy_from_slice(&HOSTILE_F32[i].to_le_bytes());
                }
            }
            out
        }
    }
}

/// An error must carry a message.
fn check_err(e: &ekfac::Error) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    prop_assert!(!msg.trim().is_empty(), "empty error message");
    prop_assert!(msg.len() < 4000, "a {}-byte message", msg.len());
    Ok(())
}

fn timed(f: impl FnOnce() -> Result<(), TestCaseError>) -> Result<(), TestCaseError> {
    let start = Instant::now();
    f()?;
    prop_assert!(
        start.elapsed() < CASE_LIMIT,
        "a case took {:?}",
        start.elapsed()
    );
    Ok(())
}

/// A runner of `cases` cases from a fixed seed: every run (and CI) tries the same
/// mutations, so a failure reproduces and the whole-fit test's check that some mutated
/// inputs still fit cannot fail by chance.
fn runner(cases: u32) -> TestRunner {
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::deterministic_rng(config.rng_algorithm);
    TestRunner::new_with_rng(config, rng)
}

/// Peak resident memory of this process in MiB (Linux), or 0 elsewhere.
fn peak_rss_mib() -> u64 {
    common::child::proc_status_kib("VmHWM:").map_or(0, |kib| kib / 1024)
}

fn assert_memory_bounded() {
    let peak = peak_rss_mib();
    assert!(
        peak < PEAK_RSS_LIMIT_MIB,
        "peak resident memory {peak} MiB ≥ {PEAK_RSS_LIMIT_MIB} MiB"
    );
}

/// Loads a (possibly mutated) model description and weights the way `ekfac fit` does.
fn load_model(spec_text: &str, weights: Vec<u8>) -> ekfac::Result<Model> {
    let graph = from_json_str(spec_text, "model.json")?;
    Model::from_tensor_file(
        graph,
        &TensorFile::from_bytes(weights, "weights.safetensors")?,
    )
}

/// The first chain case as a graph-format (format 2) file, mutated as well.
const GRAPH_MLP: &str = r#"{"format": "ekfac-graph", "version": 2,
  "inputs": [{"name": "x", "shape": [4], "dtype": "f32"}],
  "nodes": [
    {"name": "0", "op": "linear", "inputs": ["x"],
     "attrs": {"in_features": 4, "out_features": 5, "bias": true}},
    {"name": "1", "op": "tanh", "inputs": ["0"]},
    {"name": "2", "op": "linear", "inputs": ["1"],
     "attrs": {"in_features": 5, "out_features": 3, "bias": true}}],
  "output": "2",
  "parameters": ["0.weight", "0.bias", "2.weight", "2.bias"]}"#;

#[test]
fn mutated_models_and_weights_give_clean_errors() {
    let mut files: Vec<(String, Vec<u8>)> = CASES
        .iter()
        .map(|c| {
            (
                std::fs::read_to_string(fixture(c, "model.json")).unwrap(),
                std::fs::read(fixture(c, "weights.safetensors")).unwrap(),
            )
        })
        .collect();
    files.push((GRAPH_MLP.to_string(), files[0].1.clone()));
    for (spec_text, weights) in files {
        load_model(&spec_text, weights.clone()).expect("the unmutated inputs load");
        let strategy = (mutations(), any::<bool>());
        runner(CASES_PER_FILE)
            .run(&strategy, |(m, on_model)| {
                timed(|| {
                    let (text, bytes) = if on_model {
                        (mutate_json(&spec_text, &m), weights.clone())
                    } else {
                        (spec_text.clone(), mutate_safetensors(&weights, &m))
                    };
                    if let Err(e) = load_model(&text, bytes) {
                        check_err(&e)?;
                    }
                    Ok(())
                })
            })
            .unwrap();
    }
    assert_memory_bounded();
}

#[test]
fn mutated_data_give_clean_errors() {
    for case in CASES {
        let spec = from_json_str(
            &std::fs::read_to_string(fixture(case, "model.json")).unwrap(),
            case,
        )
        .unwrap();
        let data = std::fs::read(fixture(case, "data.safetensors")).unwrap();
        runner(CASES_PER_FILE)
            .run(&mutations(), |m| {
                timed(|| {
                    let bytes = mutate_safetensors(&data, &m);
                    let loaded = TensorFile::from_bytes(bytes, "data.safetensors")
                        .and_then(|f| Dataset::from_tensor_file(&f))
                        .and_then(|d| d.check(&spec, true).map(|()| d));
                    if let Err(e) = loaded {
                        check_err(&e)?;
                    }
                    Ok(())
                })
            })
            .unwrap();
    }
    assert_memory_bounded();
}

/// Fits the fixture case in-process (type-2, cross-entropy, mean).
fn fit_case(ctx: &ekfac::gpu::GpuContext, case: &str, fisher: FisherType) -> CurvatureState {
    let model = Model::load(
        fixture(case, "model.json"),
        fixture(case, "weights.safetensors"),
    )
    .unwrap();
    let data = Dataset::load(fixture(case, "data.safetensors")).unwrap();
    let options = Options {
        fisher,
        batch_size: 4,
        ..Options::default()
    };
    ekfac::curvature::fit::fit(ctx, &model, &data, &options, Some(1e-3))
        .unwrap()
        .state
}

#[test]
fn mutated_states_give_clean_errors() {
    let Some(ctx) = common::gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    for (case, fisher) in [
        (CASES[0], FisherType::Type2),
        (CASES[1], FisherType::ForwardOnly),
    ] {
        let path = dir.path().join("state.safetensors");
        fit_case(&ctx, case, fisher).save(&path).unwrap();
        let state = std::fs::read(&path).unwrap();
        CurvatureState::from_tensor_file(&TensorFile::from_bytes(state.clone(), "state").unwrap())
            .expect("the unmutated state loads");
        let loaded = std::cell::Cell::new(0);
        runner(CASES_PER_FILE)
            .run(&mutations(), |m| {
                timed(|| {
                    let bytes = mutate_safetensors(&state, &m);
                    let result = TensorFile::from_bytes(bytes, "state.safetensors")
                        .and_then(|f| CurvatureState::from_tensor_file(&f));
                    let s = match result {
                        Ok(s) => s,
                        Err(e) => return check_err(&e),
                    };
                    loaded.set(loaded.get() + 1);
                    if let Err(e) =
                        ekfac::curvature::validate::check_eigenvectors(&ctx, &s, "state")
                    {
                        check_err(&e)?;
                    }
                    for approx in [Approximation::Kfac, Approximation::Ekfac] {
                        for transform in [
                            Transform::Forward,
                            Transform::Inverse {
                                damping: 0.0,
                                mode: DampingMode::Exact,
                            },
                            Transform::Inverse {
                                damping: 1e-3,
                                mode: DampingMode::Heuristic,
                            },
                        ] {
                            if let Err(e) = eigenbasis_scaling(&s, approx, transform) {
                                check_err(&e)?;
                            }
                        }
                    }
                    Ok(())
                })
            })
            .unwrap();
        assert!(
            loaded.get() > 0,
            "no mutated state loaded: the mutations are too coarse"
        );
    }
    assert_memory_bounded();
}

/// A few dozen mutated data and weights files through whole GPU fits: each ends in a
/// clean error or a state whose every number is finite.
#[test]
fn mutated_inputs_through_whole_fits() {
    let Some(ctx) = common::gpu() else { return };
    let case = CASES[0];
    let spec_text = std::fs::read_to_string(fixture(case, "model.json")).unwrap();
    let weights = std::fs::read(fixture(case, "weights.safetensors")).unwrap();
    let data = std::fs::read(fixture(case, "data.safetensors")).unwrap();
    let mut runner = runner(32);
    let fitted = std::cell::Cell::new(0);
    let strategy = (mutations(), any::<bool>());
    runner
        .run(&strategy, |(m, on_data)| {
            let (w, d) = if on_data {
                (weights.clone(), mutate_safetensors(&data, &m))
            } else {
                (mutate_safetensors(&weights, &m), data.clone())
            };
            let result = load_model(&spec_text, w).and_then(|model| {
                let data = Dataset::from_tensor_file(&TensorFile::from_bytes(d, "data")?)?;
                let options = Options {
                    batch_size: 3,
                    ..Options::default()
                };
                ekfac::curvature::fit::fit(&ctx, &model, &data, &options, Some(1e-3))
            });
            match result {
                Err(e) => check_err(&e)?,
                Ok(f) => {
                    fitted.set(fitted.get() + 1);
                    let s = &f.state;
                    for l in &s.layers {
                        prop_assert!(l.gradient.values.iter().all(|v| v.is_finite()));
                        if let Some(a) = &l.input {
                            prop_assert!(a.values.iter().all(|v| v.is_finite()));
                            prop_assert!(a.vectors.iter().all(|v| v.is_finite()));
                        }
                    }
                    for c in s.corrected.iter().flatten() {
                        prop_assert!(c.iter().all(|v| v.is_finite()));
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    // Some mutations (a changed weight value) leave valid inputs.
    assert!(fitted.get() > 0, "no mutated input was fitted");
}
