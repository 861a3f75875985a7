//! `ekfac fit` on graph models that must be refused (issue 9, "Bad input"): a cycle,
//! an unknown input name, mismatched shapes at an `add`, a missing BatchNorm buffer
//! (`tests/fixtures/graph_refused/missing_batch_norm_buffer`), a layer called twice
//! (`graph_refused/tied`) and `--params` naming a BatchNorm weight. Each exits non-zero
//! with a message naming the node (and the file or key), without a panic, and writes
//! neither the state nor the summary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Runs `ekfac fit` on `model`, `weights`, `data` (class labels, cross-entropy)
/// writing into `out_dir`; returns the output and the paths it must not have written.
fn fit(model: &Path, weights: &Path, data: &Path, out_dir: &Path) -> (Output, [PathBuf; 2]) {
    let state = out_dir.join("state.safetensors");
    let summary = out_dir.join("summary.json");
    let out = Command::new(env!("CARGO_BIN_EXE_ekfac"))
        .arg("fit")
        .arg("--model")
        .arg(model)
        .arg("--weights")
        .arg(weights)
        .arg("--data")
        .arg(data)
        .args(["--loss", "cross_entropy", "--batch-size", "2", "--quiet"])
        .arg("--out")
        .arg(&state)
        .arg("--summary")
        .arg(&summary)
        .output()
        .expect("running the ekfac binary");
    (out, [state, summary])
}

/// Asserts a refusal: non-zero exit, every fragment in stderr, no panic, nothing written.
fn assert_refused(case: &str, (out, written): (Output, [PathBuf; 2]), fragments: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{case}: fit succeeded:\n{err}");
    assert!(
        !err.contains("panicked"),
        "{case}: the binary panicked:\n{err}"
    );
    for f in fragments {
        assert!(
            err.contains(f),
            "{case}: stderr does not mention {f:?}:\n{err}"
        );
    }
    for p in written {
        assert!(!p.exists(), "{case}: {} was written", p.display());
    }
}

/// `nn/diamond`'s `model.json` with `edit` applied to its text.
fn edited_diamond(dir: &Path, name: &str, edit: (&str, &str)) -> PathBuf {
    let text = std::fs::read_to_string(fixtures().join("nn/diamond/model.json")).unwrap();
    assert!(text.contains(edit.0), "the edit must apply: {}", edit.0);
    let path = dir.join(name);
    std::fs::write(&path, text.replacen(edit.0, edit.1, 1)).unwrap();
    path
}

#[test]
fn bad_graphs_are_refused_by_the_cli_naming_the_node() {
    let tmp = tempfile::tempdir().unwrap();
    let diamond = fixtures().join("nn/diamond");
    let (weights, data) = (
        diamond.join("weights.safetensors"),
        diamond.join("data.safetensors"),
    );
    // The unedited model fits (so each refusal below comes from its one edit).
    let (ok, written) = fit(&diamond.join("model.json"), &weights, &data, tmp.path());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for p in written {
        std::fs::remove_file(p).unwrap();
    }

    // fc1 reads fc4: fc1 → tanh → cat → fc4 → fc1.
    let model = edited_diamond(
        tmp.path(),
        "cycle.json",
        (
            r#""name": "fc1", "op": "linear", "inputs": ["x"]"#,
            r#""name": "fc1", "op": "linear", "inputs": ["fc4"]"#,
        ),
    );
    assert_refused(
        "cycle",
        fit(&model, &weights, &data, tmp.path()),
        &["node \"fc1\"", "cycle"],
    );

    let model = edited_diamond(
        tmp.path(),
        "unknown.json",
        (r#""inputs": ["fc2"]"#, r#""inputs": ["fc_2"]"#),
    );
    assert_refused(
        "unknown input",
        fit(&model, &weights, &data, tmp.path()),
        &["node \"relu\"", "\"fc_2\""],
    );

    // relu is [4] per example, x is [5].
    let model = edited_diamond(
        tmp.path(),
        "add.json",
        (
            r#""inputs": ["relu", "sigmoid"]"#,
            r#""inputs": ["relu", "x"]"#,
        ),
    );
    assert_refused(
        "add shapes",
        fit(&model, &weights, &data, tmp.path()),
        &["node \"add\"", "4", "5"],
    );

    let dir = fixtures().join("graph_refused/missing_batch_norm_buffer");
    assert_refused(
        "missing BatchNorm buffer",
        fit(
            &dir.join("model.json"),
            &dir.join("weights.safetensors"),
            &dir.join("data.safetensors"),
            tmp.path(),
        ),
        &[
            "weights.safetensors",
            "layer1.0.bn2.running_var",
            "node \"layer1.0.bn2\"",
        ],
    );

    let dir = fixtures().join("graph_refused/tied");
    assert_refused(
        "tied",
        fit(
            &dir.join("model.json"),
            &dir.join("weights.safetensors"),
            &dir.join("data.safetensors"),
            tmp.path(),
        ),
        &["node \"fc_1\"", "module \"fc\"", "tied"],
    );
}

/// `--params` naming a BatchNorm weight (a parameter of the model, but not of a layer
/// KFAC approximates) is refused, naming the parameter and its node and listing the
/// parameters that can be chosen; nothing is written.
#[test]
fn non_curvature_params_are_refused_listing_the_curvature_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let case = fixtures().join("curvature_graph/resnet_bn_ce_mean_type2_expand_sep");
    let state = tmp.path().join("state.safetensors");
    let out = Command::new(env!("CARGO_BIN_EXE_ekfac"))
        .arg("fit")
        .arg("--model")
        .arg(case.join("model.json"))
        .arg("--weights")
        .arg(case.join("weights.safetensors"))
        .arg("--data")
        .arg(case.join("data.safetensors"))
        .args(["--loss", "cross_entropy", "--quiet"])
        .args(["--params", "conv1.weight,bn1.weight"])
        .arg("--out")
        .arg(&state)
        .output()
        .expect("running the ekfac binary");
    let summary = tmp.path().join("summary.json");
    assert_refused(
        "--params bn1.weight",
        (out, [state, summary]),
        &[
            "\"bn1.weight\"",
            "node \"bn1\"",
            "not a curvature parameter",
            "conv1.weight, layer1.0.conv1.weight",
            "fc.bias",
        ],
    );
}
