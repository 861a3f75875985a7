//! Issue 10: the `ekfac` binary against hostile or careless inputs. Every case runs the
//! built binary and checks it exits non-zero (or zero where the input is valid) with a
//! message naming the file, key, layer or option, never panics, never blocks, never
//! replaces an input or half-writes an output.
//!
//! Cases that fail before the GPU is opened run without an adapter; the others skip
//! without one (or fail under `EKFAC_REQUIRE_GPU=1`).

#![cfg(unix)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// Longest any refused run may take: refusals come before any work.
const REFUSAL_SECONDS: u64 = 20;

const CASE: &str = "mlp_tanh_ce_mean_type2_sep";

/// The file `name` of the chain curvature fixture `case`.
fn case_file(case: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/curvature")
        .join(case)
        .join(name)
}

/// The file `name` of the fixture [`CASE`].
fn fixture(name: &str) -> PathBuf {
    case_file(CASE, name)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn spawn(args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ekfac"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the ekfac binary")
}

/// Runs the binary, killing it (and failing) if it takes longer than `seconds`.
fn ekfac_within(args: &[&str], seconds: u64) -> Output {
    let mut child = spawn(args, &[]);
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > Duration::from_secs(seconds) {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "ekfac {args:?} did not finish within {seconds} s (blocked?); stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        stderr(out)
    );
}

/// Asserts a failed run whose stderr contains every one of `needles` and no panic.
fn assert_fails(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected a failure mentioning {needles:?}, but the command succeeded"
    );
    for needle in needles {
        assert!(
            err.contains(needle),
            "stderr does not mention {needle:?}:\n{err}"
        );
    }
    assert!(!err.contains("panicked"), "the binary panicked:\n{err}");
    assert!(
        err.len() < 2000,
        "the message is {} bytes long:\n{}",
        err.len(),
        &err[..2000]
    );
}

/// `fit` arguments for the fixture case with `model`, `weights` and `data` replaced where
/// given, then `extra` (cross-entropy, type-2).
fn fit_args<'a>(inputs: [Option<&'a str>; 3], extra: &[&'a str]) -> Vec<String> {
    fit_command(CASE, inputs, "cross_entropy", "type-2", extra)
}

/// `fit` arguments for fixture `case` with `model`, `weights` and `data` replaced where
/// given, the `loss` and `fisher`, then `extra`.
fn fit_command(
    case: &str,
    inputs: [Option<&str>; 3],
    loss: &str,
    fisher: &str,
    extra: &[&str],
) -> Vec<String> {
    let [model, weights, data] = inputs;
    let file = |given: Option<&str>, name: &str| {
        given.map_or_else(|| s(&case_file(case, name)).to_string(), String::from)
    };
    let mut args: Vec<String> = vec![
        "fit".into(),
        "--model".into(),
        file(model, "model.json"),
        "--weights".into(),
        file(weights, "weights.safetensors"),
        "--data".into(),
        file(data, "data.safetensors"),
        "--loss".into(),
        loss.into(),
        "--fisher".into(),
        fisher.into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn refuse(args: &[String], needles: &[&str]) {
    let out = ekfac_within(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        REFUSAL_SECONDS,
    );
    assert_fails(&out, needles);
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(s(path)).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// Writes a safetensors file of `(key, dtype, shape, bytes)`.
fn write_safetensors(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, dtype, shape, bytes)| {
            (
                k.to_string(),
                TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// The weights of fixture `case` written to `path` with `edit` applied to the list of
/// tensors `(key, dtype, shape, bytes)`.
fn edited_weights(
    case: &str,
    path: &Path,
    edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
) {
    let bytes = std::fs::read(case_file(case, "weights.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let refs: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, d, sh, b)| (k.as_str(), *d, sh.clone(), b.clone()))
        .collect();
    write_safetensors(path, &refs);
}

/// Endless, blocking and oversized inputs are refused at once, naming the option and
/// the file.
#[test]
fn inputs_must_be_bounded_regular_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("state.safetensors");
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    let o = ["--out", s(&out)];
    refuse(
        &fit_args([Some("/dev/zero"), None, None], &o),
        &[
            "/dev/zero",
            "--model must be a regular file",
            "character device",
        ],
    );
    refuse(
        &fit_args([None, Some("/dev/urandom"), None], &o),
        &["/dev/urandom", "--weights must be a regular file"],
    );
    refuse(
        &fit_args([None, None, Some("/dev/zero")], &o),
        &["--data must be a regular file"],
    );
    refuse(
        &fit_args([None, None, Some(s(&fifo))], &o),
        &["fifo", "--data must be a regular file", "FIFO"],
    );
    // A directory is read as data shards (issue 14); one without any is refused.
    let no_shards = tmp.path().join("no-shards");
    std::fs::create_dir(&no_shards).unwrap();
    refuse(
        &fit_args([None, None, Some(s(&no_shards))], &o),
        &["no-shards", "without any *.safetensors shard"],
    );
    refuse(
        &fit_args(
            [None, None, None],
            &["--init-state", "/dev/zero", "--out", s(&out)],
        ),
        &["--init-state must be a regular file"],
    );
    refuse(
        &[
            "apply",
            "--state",
            "/dev/urandom",
            "--vectors",
            s(&fifo),
            "--out",
            s(&out),
        ]
        .map(String::from),
        &["--state must be a regular file"],
    );
    refuse(
        &[
            "apply",
            "--state",
            s(&fixture("weights.safetensors")),
            "--vectors",
            s(&fifo),
            "--out",
            s(&out),
        ]
        .map(String::from),
        &["--vectors must be a regular file", "FIFO"],
    );
    // A model description over 64 MiB (sparse: no disk space used).
    let big = tmp.path().join("big.json");
    std::fs::File::create(&big)
        .unwrap()
        .set_len((64 << 20) + 1)
        .unwrap();
    refuse(
        &fit_args([Some(s(&big)), None, None], &o),
        &[
            "big.json",
            "--model is 67,108,865 bytes",
            "limit of 67,108,864",
        ],
    );
    assert!(!out.exists());
}

/// Malformed safetensors files: errors name the file and the key at fault.
#[test]
fn safetensors_errors_name_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("state.safetensors");
    let o = ["--out", s(&out)];
    let weights = tmp.path().join("w.safetensors");
    let refuse_weights =
        |want: &[&str]| refuse(&fit_args([None, Some(s(&weights)), None], &o), want);
    let with_header = |header: &str, data: usize| {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data));
        std::fs::write(&weights, bytes).unwrap();
    };
    // A header length of 2^40.
    let mut huge = (1u64 << 40).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    std::fs::write(&weights, huge).unwrap();
    refuse_weights(&["w.safetensors", "header length", "limit"]);
    // Each header (with its number of data bytes) and what the error must name.
    let headers: [(&str, usize, &[&str]); 4] = [
        // A shape whose size overflows.
        (
            r#"{"0.weight":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#,
            0,
            &[
                "w.safetensors",
                "\"0.weight\"",
                "[4294967296, 4294967296, 16]",
            ],
        ),
        // Offsets that do not hold the shape.
        (
            r#"{"0.bias":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}}"#,
            16,
            &["\"0.bias\"", "data_offsets [0, 16]", "20 bytes"],
        ),
        // Overlapping tensors: both keys named.
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
            &[
                "\"b\" starts at byte 4",
                "\"a\", which ends at byte 8",
                "overlap",
            ],
        ),
        // An unknown dtype.
        (
            r#"{"0.weight":{"dtype":"F99","shape":[2],"data_offsets":[0,8]}}"#,
            8,
            &["w.safetensors", "\"0.weight\"", "F99"],
        ),
    ];
    for (header, data, want) in headers {
        with_header(header, data);
        refuse_weights(want);
    }
    // An F64 weight of 1e300 is Inf in f32.
    edited_weights(CASE, &weights, |t| {
        let w = t.iter_mut().find(|t| t.0 == "0.weight").unwrap();
        let mut values: Vec<f64> = bytemuck::cast_slice::<u8, f32>(&w.3)
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        values[7] = 1e300;
        w.1 = Dtype::F64;
        w.3 = bytemuck::cast_slice(&values).to_vec();
    });
    refuse_weights(&[
        "w.safetensors",
        "\"0.weight\"",
        "0.weight[1, 3] = 1e300 overflows f32",
    ]);
    // A NaN bias.
    edited_weights(CASE, &weights, |t| {
        let b = t.iter_mut().find(|t| t.0 == "2.bias").unwrap();
        b.3[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    refuse_weights(&["\"2.bias\"", "2.bias[1] is NaN"]);
    // 300,000 extra keys: one short message.
    edited_weights(CASE, &weights, |t| {
        for i in 0..300_000 {
            t.push((format!("extra{i:06}"), Dtype::F32, vec![0], vec![]));
        }
    });
    refuse_weights(&["unexpected key \"extra000000\"", "… and 299,990 more"]);
    assert!(!out.exists());
}

/// Option values: negative numbers are values, refused by their own checks.
#[test]
fn numeric_options_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("state.safetensors");
    refuse(
        &fit_args([None, None, None], &["--damping", "-1", "--out", s(&out)]),
        &["--damping must be a finite non-negative number, found -1"],
    );
    refuse(
        &fit_args(
            [None, None, None],
            &["--memory-budget-mib", "17592186044416", "--out", s(&out)],
        ),
        &["--memory-budget-mib 17592186044416 is too large"],
    );
    refuse(
        &fit_args(
            [None, None, None],
            &["--batch-size", "-3", "--out", s(&out)],
        ),
        &["'-3'", "--batch-size"],
    );
    refuse(
        &[
            "apply",
            "--state",
            s(&fixture("weights.safetensors")),
            "--vectors",
            s(&fixture("weights.safetensors")),
            "--inverse",
            "--damping",
            "-0.5",
            "--out",
            s(&out),
        ]
        .map(String::from),
        &["--damping must be a finite non-negative number, found -0.5"],
    );
}

/// Outputs never destroy inputs, other outputs or what is not a regular file.
#[test]
fn outputs_never_replace_inputs_or_special_files() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // Copies of the inputs, so that a failure of this test cannot destroy fixtures.
    for name in ["model.json", "weights.safetensors", "data.safetensors"] {
        std::fs::copy(fixture(name), t.join(name)).unwrap();
    }
    let model = t.join("model.json");
    let weights = t.join("weights.safetensors");
    let data = t.join("data.safetensors");
    let inputs = [Some(s(&model)), Some(s(&weights)), Some(s(&data))];
    let before = |p: &Path| std::fs::read(p).unwrap();
    let (model_bytes, weights_bytes) = (before(&model), before(&weights));
    let out = t.join("state.safetensors");
    refuse(
        &fit_args(inputs, &["--out", s(&weights)]),
        &["--out", "is the same file as the input --weights"],
    );
    refuse(
        &fit_args(inputs, &["--out", s(&data)]),
        &["is the same file as the input --data"],
    );
    refuse(
        &fit_args(inputs, &["--out", s(&out), "--summary", s(&model)]),
        &["--summary", "is the same file as the input --model"],
    );
    refuse(
        &fit_args(inputs, &["--out", s(&out), "--summary", s(&out)]),
        &["--summary", "and --out", "are the same file"],
    );
    // The same file through `..`, a symbolic link and a hard link.
    let dotted = t.join("sub");
    std::fs::create_dir(&dotted).unwrap();
    let via_dots = dotted.join("../weights.safetensors");
    refuse(
        &fit_args(inputs, &["--out", s(&via_dots)]),
        &["is the same file as the input --weights"],
    );
    let link = t.join("link.safetensors");
    std::os::unix::fs::symlink(&data, &link).unwrap();
    refuse(
        &fit_args(inputs, &["--out", s(&link)]),
        &["is the same file as the input --data"],
    );
    let hard = t.join("hard.json");
    std::fs::hard_link(&model, &hard).unwrap();
    refuse(
        &fit_args(inputs, &["--out", s(&out), "--summary", s(&hard)]),
        &["is the same file as the input --model"],
    );
    // Not regular files, read-only files, missing directories.
    let fifo = t.join("fifo");
    mkfifo(&fifo);
    refuse(
        &fit_args(inputs, &["--out", s(&fifo)]),
        &["--out exists and is a FIFO", "not a regular file"],
    );
    refuse(
        &fit_args(inputs, &["--out", s(&dotted)]),
        &["--out exists and is a directory"],
    );
    refuse(
        &fit_args(inputs, &["--out", "/dev/null"]),
        &["--out exists and is a character device"],
    );
    let readonly = t.join("readonly.safetensors");
    std::fs::write(&readonly, b"keep me").unwrap();
    let mut perm = std::fs::metadata(&readonly).unwrap().permissions();
    perm.set_readonly(true);
    std::fs::set_permissions(&readonly, perm).unwrap();
    refuse(
        &fit_args(inputs, &["--out", s(&readonly)]),
        &["--out exists and is read-only"],
    );
    assert_eq!(std::fs::read(&readonly).unwrap(), b"keep me");
    refuse(
        &fit_args(
            inputs,
            &["--out", s(&out), "--summary", s(&t.join("no/s.json"))],
        ),
        &["the directory of --summary", "No such file"],
    );
    // apply: --out may be neither --state nor --vectors.
    let vectors = t.join("v.safetensors");
    std::fs::write(&vectors, b"x").unwrap();
    refuse(
        &[
            "apply",
            "--state",
            s(&weights),
            "--vectors",
            s(&vectors),
            "--out",
            s(&weights),
        ]
        .map(String::from),
        &["is the same file as the input --state"],
    );
    refuse(
        &[
            "apply",
            "--state",
            s(&weights),
            "--vectors",
            s(&vectors),
            "--out",
            s(&vectors),
        ]
        .map(String::from),
        &["is the same file as the input --vectors"],
    );
    assert!(!fifo.is_file() && !out.exists());
    assert_eq!(before(&model), model_bytes);
    assert_eq!(before(&weights), weights_bytes);
    let leftovers: Vec<_> = std::fs::read_dir(t)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

fn temporaries_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".ekfac-"))
        .collect()
}

/// Outputs are written all or nothing, with the umask's mode; SIGINT and SIGTERM while
/// they are being saved leave neither the outputs nor temporary files.
#[test]
fn outputs_are_all_or_nothing() {
    let Some(ctx) = common::gpu() else { return };
    drop(ctx);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let out = t.join("state.safetensors");
    let summary = t.join("summary.json");
    // Created with the umask's mode, replacing an old file.
    std::fs::write(&out, b"old state").unwrap();
    let args = fit_args(
        [None, None, None],
        &["--out", s(&out), "--summary", s(&summary)],
    );
    let cmd = format!(
        "umask 027; exec {} {}",
        env!("CARGO_BIN_EXE_ekfac"),
        args.join(" ")
    );
    let result = Command::new("sh").args(["-c", &cmd]).output().unwrap();
    assert_success(&result, "fit under umask 027");
    use std::os::unix::fs::PermissionsExt;
    for p in [&out, &summary] {
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "{} has mode {mode:o}", p.display());
    }
    let fitted = std::fs::read(&out).unwrap();
    assert_ne!(fitted, b"old state");

    // Interrupted between writing the temporaries and renaming them.
    for signal in [libc::SIGINT, libc::SIGTERM] {
        std::fs::write(&out, b"old state").unwrap();
        std::fs::remove_file(&summary).unwrap_or(());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = spawn(&refs, &[("EKFAC_TEST_STALL_BEFORE_COMMIT_MS", "60000")]);
        let start = Instant::now();
        while temporaries_in(t).len() < 2 {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the temporaries never appeared"
            );
            if let Some(status) = child.try_wait().unwrap() {
                panic!("fit exited early: {status}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(128 + signal), "exit status {status}");
        assert_eq!(temporaries_in(t), Vec::<String>::new());
        assert_eq!(std::fs::read(&out).unwrap(), b"old state");
        assert!(!summary.exists());
    }
}

/// Fits fixture `case` with the `loss` and `fisher` and `extra` arguments (within 300 s).
fn fit_case(case: &str, loss: &str, fisher: &str, extra: &[&str]) -> Output {
    let args = fit_command(case, [None; 3], loss, fisher, extra);
    ekfac_within(&args.iter().map(String::as_str).collect::<Vec<_>>(), 300)
}

/// The MLP fixture fitted with a joint bias (cross-entropy, type-2).
const JOINT_CASE: &str = "mlp_relu_ce_mean_type2_joint";

/// Fits [`JOINT_CASE`] into `dir/state.safetensors` (which it returns), asserting success.
fn fit_joint_state(dir: &Path) -> PathBuf {
    let state = dir.join("state.safetensors");
    let out = fit_case(
        JOINT_CASE,
        "cross_entropy",
        "type-2",
        &["--joint-bias", "--out", s(&state)],
    );
    assert_success(&out, "fit");
    state
}

/// Copies the state file `src` to `dst` with `edit` applied to the f32 values of `key`.
fn edit_state(src: &Path, dst: &Path, key: &str, edit: impl FnOnce(&mut Vec<f32>)) {
    let bytes = std::fs::read(src).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = file
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let values = bytemuck::pod_collect_to_vec::<u8, f32>(v.data());
            (k, v.shape().to_vec(), values)
        })
        .collect();
    let t = tensors
        .iter_mut()
        .find(|t| t.0 == key)
        .unwrap_or_else(|| panic!("no key {key}"));
    edit(&mut t.2);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, shape, v)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(v)).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, meta.metadata().clone()).unwrap();
    std::fs::write(dst, bytes).unwrap();
}

/// States are validated at load: finite tensors, orthonormal eigenvectors (apply and
/// --init-state); inverses that would divide by an eigenvalue counting as zero are
/// refused naming the layer and suggesting a damping.
#[test]
fn states_are_validated() {
    let Some(ctx) = common::gpu() else { return };
    drop(ctx);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let state = fit_joint_state(t);
    let p = 43;
    let vectors = t.join("v.safetensors");
    let ones = vec![1.0f32; p * 2];
    write_safetensors(
        &vectors,
        &[(
            "V",
            Dtype::F32,
            vec![p, 2],
            bytemuck::cast_slice(&ones).to_vec(),
        )],
    );
    let product = t.join("out.safetensors");
    let apply = |state: &Path, extra: &[&str]| {
        let mut args = vec![
            "apply",
            "--state",
            s(state),
            "--vectors",
            s(&vectors),
            "--out",
            s(&product),
        ];
        args.extend(extra);
        ekfac_within(&args, 120)
    };
    assert_success(&apply(&state, &[]), "apply on the valid state");
    std::fs::remove_file(&product).unwrap();

    // A NaN eigenvalue and an Inf corrected eigenvalue.
    let bad = t.join("bad.safetensors");
    edit_state(&state, &bad, "0.input_eigenvalues", |v| v[2] = f32::NAN);
    assert_fails(
        &apply(&bad, &[]),
        &[
            "bad.safetensors",
            "\"0.input_eigenvalues\"",
            "0.input_eigenvalues[2] is NaN",
        ],
    );
    edit_state(&state, &bad, "2.joint.corrected_eigenvalues", |v| {
        v[7] = f32::INFINITY
    });
    assert_fails(
        &apply(&bad, &[]),
        &["\"2.joint.corrected_eigenvalues\"", "[1, 1] is inf"],
    );
    // Eigenvectors that are all zero, or one column doubled: refused by apply and as
    // a warm start.
    edit_state(&state, &bad, "0.input_eigenvectors", |v| v.fill(0.0));
    assert_fails(
        &apply(&bad, &[]),
        &[
            "bad.safetensors",
            "\"0.input_eigenvectors\"",
            "not orthonormal",
        ],
    );
    let refit = t.join("refit.safetensors");
    assert_fails(
        &fit_case(
            JOINT_CASE,
            "cross_entropy",
            "type-2",
            &["--joint-bias", "--init-state", s(&bad), "--out", s(&refit)],
        ),
        &["\"0.input_eigenvectors\"", "not orthonormal"],
    );
    edit_state(&state, &bad, "2.gradient_eigenvectors", |v| {
        for row in 0..3 {
            v[row * 3 + 1] *= 2.0;
        }
    });
    assert_fails(
        &apply(&bad, &[]),
        &["\"2.gradient_eigenvectors\"", "not orthonormal"],
    );
    assert!(!product.exists() && !refit.exists());

    // Layer 2's G is singular here (curvlinops counts 6 zero eigenvalues).
    for extra in [
        &["--kfac", "--inverse", "--damping", "0"][..],
        &["--inverse", "--damping", "0"],
        &["--inverse", "--damping", "1e-30"],
        &[
            "--kfac",
            "--inverse",
            "--damping",
            "0",
            "--damping-mode",
            "plain",
        ],
    ] {
        let out = apply(&state, extra);
        assert_fails(
            &out,
            &[
                "layer 2",
                "would divide by",
                "count as zero",
                "pass a damping above",
                "--damping ",
            ],
        );
        assert!(!product.exists());
    }
    assert_success(
        &apply(&state, &["--inverse", "--damping", "1e-3"]),
        "a damped inverse",
    );
    let (_, values) = {
        let file = ekfac::model::TensorFile::load(&product).unwrap();
        let t = file.require("out", "the product").unwrap();
        (t.shape.to_vec(), t.to_f32().unwrap())
    };
    assert!(values.iter().all(|v| v.is_finite()));
}

/// A fit whose factors overflow names the layer and what was too large.
#[test]
fn overflowing_factors_name_the_layer() {
    let Some(ctx) = common::gpu() else { return };
    drop(ctx);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let out = t.join("state.safetensors");
    // Inputs of 3e38 are finite f32, but their squares are not.
    let n = 6;
    let x: Vec<f32> = (0..n * 4)
        .map(|i| if i % 5 == 0 { 3e38 } else { 0.5 })
        .collect();
    let y: Vec<i64> = (0..n as i64).map(|i| i % 3).collect();
    let data = t.join("data.safetensors");
    write_safetensors(
        &data,
        &[
            (
                "x",
                Dtype::F32,
                vec![n, 4],
                bytemuck::cast_slice(&x).to_vec(),
            ),
            ("y", Dtype::I64, vec![n], bytemuck::cast_slice(&y).to_vec()),
        ],
    );
    let args = fit_args([None, None, Some(s(&data))], &["--out", s(&out)]);
    let result = ekfac_within(&args.iter().map(String::as_str).collect::<Vec<_>>(), 120);
    assert_fails(
        &result,
        &[
            "layer 0",
            "input covariance A is not finite",
            "inputs",
            "too large",
        ],
    );
    // Huge last-layer weights: the backpropagated MSE gradients overflow.
    let weights = t.join("weights.safetensors");
    let case = "mlp_relu_mse_sum_empirical_sep";
    edited_weights(case, &weights, |tensors| {
        for (k, _, _, bytes) in tensors.iter_mut() {
            if k == "2.weight" {
                let mut values = bytemuck::pod_collect_to_vec::<u8, f32>(bytes);
                values.iter_mut().for_each(|w| *w *= 1e25);
                *bytes = bytemuck::cast_slice(&values).to_vec();
            }
        }
    });
    let args = fit_command(
        case,
        [None, Some(s(&weights)), None],
        "mse",
        "empirical",
        &["--reduction", "sum", "--out", s(&out)],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_fails(
        &ekfac_within(&args, 120),
        &[
            "gradient covariance G is not finite",
            "gradients are too large",
        ],
    );
    assert!(!out.exists());
}

/// `apply` takes the columns of --vectors in chunks that fit the memory budget: the
/// peak GPU memory stays within the budget and the products agree with one pass
/// (relative Frobenius error 1e-6: the chunks' GEMMs may split their reductions
/// differently, so bitwise equality is not promised).
#[test]
fn apply_chunks_columns_by_the_memory_budget() {
    use ekfac::curvature::operator::{Approximation, Operator, Transform};
    use ekfac::curvature::state::CurvatureState;
    let Some(ctx) = common::gpu() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let state_path = fit_joint_state(t);
    let state = CurvatureState::load(&state_path).unwrap();
    let p = state.layout.num_params;
    let k = 3000;
    let v: Vec<f32> = (0..p * k)
        .map(|i| ((i * 37) % 17) as f32 / 8.0 - 1.0)
        .collect();

    // Library: a budget of about eight columns above what the operator holds.
    let operator = Operator::new(&ctx, &state).unwrap();
    let default_budget = ctx.memory_budget();
    ctx.memory().reset_peak();
    let held = ctx.memory().current_bytes();
    let whole = operator
        .apply(&v, k, Approximation::Ekfac, Transform::Forward)
        .unwrap();
    let peak_whole = ctx.memory().peak_bytes() - held;
    // The operator keeps 64 KiB free for a submission's parameters.
    let budget = held + (64 << 10) + (8 * 3 * 4 * p) as u64;
    ctx.set_memory_budget(budget);
    ctx.memory().reset_peak();
    let chunked = operator.apply(&v, k, Approximation::Ekfac, Transform::Forward);
    let peak_chunked = ctx.memory().peak_bytes();
    ctx.set_memory_budget(default_budget);
    let chunked = chunked.unwrap();
    assert!(
        common::rel_err(
            &chunked,
            &whole.iter().map(|&x| f64::from(x)).collect::<Vec<_>>()
        ) < 1e-6
    );
    assert!(
        peak_chunked <= budget,
        "peak {peak_chunked} bytes over the budget {budget}"
    );
    assert!(
        peak_whole > 100 * (peak_chunked - held),
        "{peak_whole} vs {peak_chunked}"
    );
    drop(operator);
    drop(ctx);

    // Command line: --memory-budget-mib 1 splits 3000 columns; same products.
    let vectors = t.join("v.safetensors");
    write_safetensors(
        &vectors,
        &[(
            "V",
            Dtype::F32,
            vec![p, k],
            bytemuck::cast_slice(&v).to_vec(),
        )],
    );
    let read = |path: &Path| {
        let file = ekfac::model::TensorFile::load(path).unwrap();
        file.require("out", "the product")
            .unwrap()
            .to_f32()
            .unwrap()
    };
    let mut results = Vec::new();
    for budget in [None, Some("1")] {
        let product = t.join(format!("out{}.safetensors", results.len()));
        let mut args = vec![
            "apply",
            "--state",
            s(&state_path),
            "--vectors",
            s(&vectors),
            "--inverse",
            "--out",
            s(&product),
        ];
        if let Some(mib) = budget {
            args.extend(["--memory-budget-mib", mib]);
        }
        assert_success(&ekfac_within(&args, 120), "apply");
        results.push(read(&product));
    }
    let reference: Vec<f64> = results[0].iter().map(|&x| f64::from(x)).collect();
    assert!(common::rel_err(&results[1], &reference) < 1e-6);
}

/// Runs the binary and returns its exit status and peak resident memory in MiB: the
/// largest `VmHWM` of `/proc/<pid>/status` (the high-water mark of the child's own
/// address space since its exec), read every 2 ms until it exits. Not the rusage's
/// `ru_maxrss`: a child spawned by vfork (posix_spawn) inherits, at exec, the high-water
/// mark of the test process's own memory, so it measured whatever the other tests of
/// this binary had allocated meanwhile (a flaky 117 vs 277 MiB with GPU tests running
/// in parallel threads).
fn peak_rss_of(args: &[&str]) -> (i32, u64) {
    let child = Command::new(env!("CARGO_BIN_EXE_ekfac"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let id = child.id() as i32;
    // The child is reaped by wait4 below; `Child::wait` would race with it.
    std::mem::forget(child);
    let process = id.to_string();
    let mut peak_kib = 0u64;
    let mut status = 0;
    loop {
        if let Some(kib) = common::child::process_status_kib(&process, "VmHWM:") {
            peak_kib = peak_kib.max(kib);
        }
        // SAFETY: waitpid on our own child, without blocking.
        let pid = unsafe { libc::waitpid(id, &mut status, libc::WNOHANG) };
        if pid == id {
            break;
        }
        assert_eq!(pid, 0, "waitpid");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(peak_kib > 0, "no VmHWM read for the child");
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    (code, peak_kib / 1024)
}

/// `apply`'s host memory does not grow with the number of columns: 12.5× more columns
/// (37 MB of F64 vectors, 18.7 MB of output, P = 18,666) under an 8 MiB budget take at
/// most 64 MiB more peak memory. Holding the matrices, as before issue 10, takes
/// about 93 MB more (the file, its f32 copy, the product and its serialised copy);
/// streaming measured 10–37 MiB of noise (the driver's JIT) on lavapipe.
#[test]
fn apply_host_memory_is_flat_in_the_columns() {
    let Some(ctx) = common::gpu() else { return };
    drop(ctx);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let case = "cnn_large_ce_mean_type2_expand_sep";
    let state = t.join("state.safetensors");
    let out = fit_case(case, "cross_entropy", "type-2", &["--out", s(&state)]);
    assert_success(&out, "fit");
    let p = 18_666;
    let mut peaks = Vec::new();
    for k in [20usize, 250] {
        let vectors = t.join(format!("v{k}.safetensors"));
        let v: Vec<f32> = (0..p * k).map(|i| (i % 13) as f32 - 6.0).collect();
        write_safetensors(
            &vectors,
            &[(
                "V",
                Dtype::F32,
                vec![p, k],
                bytemuck::cast_slice(&v).to_vec(),
            )],
        );
        drop(v);
        let product = t.join(format!("out{k}.safetensors"));
        let args = [
            "apply",
            "--state",
            s(&state),
            "--vectors",
            s(&vectors),
            "--memory-budget-mib",
            "8",
            "--out",
            s(&product),
        ];
        let (status, peak) = peak_rss_of(&args);
        assert_eq!(status, 0, "apply with {k} columns failed");
        let file = ekfac::model::TensorFile::load(&product).unwrap();
        let got = file.require("out", "the product").unwrap();
        assert_eq!(got.shape, [p, k]);
        peaks.push(peak);
    }
    assert!(
        peaks[1] <= peaks[0] + 64,
        "peak resident memory {} MiB with 20 columns, {} MiB with 250",
        peaks[0],
        peaks[1]
    );
}

/// Long lists are cut in messages and in the printed summary: a model with 16
/// parameter tensors.
#[test]
fn long_lists_are_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let layers: Vec<String> = (0..8)
        .map(|i| {
            format!(r#"{{"type": "linear", "name": "l{i}", "in_features": 3, "out_features": 3}}"#)
        })
        .collect();
    let model = t.join("model.json");
    std::fs::write(
        &model,
        format!(
            r#"{{"input_shape": [3], "layers": [{}]}}"#,
            layers.join(", ")
        ),
    )
    .unwrap();
    let mut tensors = Vec::new();
    for i in 0..8 {
        let w: Vec<f32> = (0..9)
            .map(|j| ((i * 9 + j) % 7) as f32 / 7.0 - 0.4)
            .collect();
        let b = vec![0.1f32; 3];
        tensors.push((format!("l{i}.weight"), vec![3, 3], w));
        tensors.push((format!("l{i}.bias"), vec![3], b));
    }
    let weights = t.join("weights.safetensors");
    let refs: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, sh, v)| {
            (
                k.as_str(),
                Dtype::F32,
                sh.clone(),
                bytemuck::cast_slice(v).to_vec(),
            )
        })
        .collect();
    write_safetensors(&weights, &refs);
    let x: Vec<f32> = (0..12).map(|i| (i % 5) as f32 / 5.0).collect();
    let y: Vec<i64> = vec![0, 1, 2, 1];
    let data = t.join("data.safetensors");
    write_safetensors(
        &data,
        &[
            (
                "x",
                Dtype::F32,
                vec![4, 3],
                bytemuck::cast_slice(&x).to_vec(),
            ),
            ("y", Dtype::I64, vec![4], bytemuck::cast_slice(&y).to_vec()),
        ],
    );
    let out = t.join("state.safetensors");
    let inputs = [Some(s(&model)), Some(s(&weights)), Some(s(&data))];
    refuse(
        &fit_args(inputs, &["--params", "nope", "--out", s(&out)]),
        &[
            "unknown parameter \"nope\"",
            "l0.weight, l0.bias",
            "… and 6 more",
        ],
    );
    let Some(ctx) = common::gpu() else { return };
    drop(ctx);
    let args = fit_args(inputs, &["--out", s(&out)]);
    let result = ekfac_within(&args.iter().map(String::as_str).collect::<Vec<_>>(), 120);
    assert_success(&result, "fit");
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        stdout.contains("96 parameters") && stdout.contains("… and 6 more"),
        "{stdout}"
    );
}
