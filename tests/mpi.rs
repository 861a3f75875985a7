//! Fits spread over MPI ranks (issue 14): `mpirun -np 2` and `-np 3` of the `ekfac`
//! binary built with `--features mpi` against the same binary run alone (one rank):
//! the saved states (eigenvalues, eigenbases, corrected eigenvalues) bitwise equal, for
//! type-2 and MC, and with groups of batches; the summary's `world_size` and `ranks`;
//! a failing rank, or ranks given data sets of different sizes, ending every rank with
//! the message and no output; and the default build (without the feature) refusing to
//! run as one of several ranks.
//!
//! The binary is `EKFAC_MPI_BIN` (`.ci/run` builds it into its own target directory:
//! `CARGO_TARGET_DIR=target/mpi cargo build --release --features mpi --bin ekfac`) and
//! `mpirun` must be on the `PATH`; without either the tests skip, unless
//! `EKFAC_REQUIRE_MPI=1`, which makes them fail.
//!
//! Why bitwise: every batch's contribution is summed on the host in double-f64 pairs
//! and rounded once to f32 whatever the number of ranks
//! (`ekfac::distributed::sum`), the eigendecompositions are spread over the ranks in
//! whole groups that give the bits one process computes, and all ranks use the same
//! adapter here.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ekfac::curvature::state::CurvatureState;
use safetensors::{Dtype, tensor::TensorView};

use common::TestRng;

/// The MPI build of `ekfac` and whether `mpirun` runs, or `None` (skip) when missing.
fn mpi_binary() -> Option<PathBuf> {
    let required = std::env::var("EKFAC_REQUIRE_MPI").is_ok_and(|v| v == "1");
    let bin = std::env::var_os("EKFAC_MPI_BIN").map(PathBuf::from);
    let mpirun = Command::new("mpirun").arg("--version").output().is_ok();
    match bin {
        Some(bin) if bin.is_file() && mpirun => Some(bin),
        _ => {
            assert!(
                !required,
                "EKFAC_REQUIRE_MPI=1 but EKFAC_MPI_BIN ({:?}) is not a file or mpirun is missing \
                 (mpirun found: {mpirun})",
                std::env::var_os("EKFAC_MPI_BIN")
            );
            eprintln!(
                "SKIPPING: set EKFAC_MPI_BIN to an ekfac built with --features mpi and install mpirun"
            );
            None
        }
    }
}

fn write_safetensors(path: &Path, tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, d, s, b)| (k.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

const N: usize = 45;
const MODEL: &str = r#"{"input_shape": [6], "layers": [
    {"type": "linear", "name": "0", "in_features": 6, "out_features": 8},
    {"type": "relu"},
    {"type": "linear", "name": "2", "in_features": 8, "out_features": 4}]}"#;

fn f32s(n: usize, rng: &mut TestRng) -> Vec<u8> {
    let v: Vec<f32> = rng.vec(n).into_iter().map(|x| x * 0.8).collect();
    bytemuck::cast_slice(&v).to_vec()
}

/// Writes `n` random examples (4 classes) into `path`.
fn write_data(path: &Path, n: usize, rng: &mut TestRng) {
    let y: Vec<i64> = (0..n).map(|_| (rng.next_u64() % 4) as i64).collect();
    write_safetensors(
        path,
        vec![
            ("x", Dtype::F32, vec![n, 6], f32s(n * 6, rng)),
            ("y", Dtype::I64, vec![n], bytemuck::cast_slice(&y).to_vec()),
        ],
    );
}

/// Writes the model, weights and data (`N` examples, 4 classes) into `dir`.
fn write_problem(dir: &Path, rng: &mut TestRng) {
    std::fs::write(dir.join("model.json"), MODEL).unwrap();
    write_safetensors(
        &dir.join("weights.safetensors"),
        vec![
            ("0.weight", Dtype::F32, vec![8, 6], f32s(48, rng)),
            ("0.bias", Dtype::F32, vec![8], f32s(8, rng)),
            ("2.weight", Dtype::F32, vec![4, 8], f32s(32, rng)),
            ("2.bias", Dtype::F32, vec![4], f32s(4, rng)),
        ],
    );
    write_data(&dir.join("data.safetensors"), N, rng);
}

/// `ekfac fit` arguments writing `out.safetensors` and `out.json` beside `name`.
fn fit_args(dir: &Path, data: &Path, fisher: &str, name: &str) -> Vec<String> {
    let p = |f: &str| dir.join(f).display().to_string();
    let mut args: Vec<String> = [
        "fit",
        "--quiet",
        "--model",
        &p("model.json"),
        "--weights",
        &p("weights.safetensors"),
        "--data",
        &data.display().to_string(),
        "--loss",
        "cross_entropy",
        "--fisher",
        fisher,
        "--batch-size",
        "8",
        "--out",
        &p(&format!("{name}.safetensors")),
        "--summary",
        &p(&format!("{name}.json")),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if fisher == "mc" {
        args.extend(["--mc-samples".to_string(), "2".to_string()]);
    }
    args
}

/// `mpirun -np ranks` over the argument lists (one list: every rank; several: MPMD,
/// one rank each).
fn mpirun(bin: &Path, ranks: usize, args: &[Vec<String>]) -> Output {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe"]);
    if args.len() == 1 {
        cmd.args(["-np", &ranks.to_string()])
            .arg(bin)
            .args(&args[0]);
    } else {
        for (i, a) in args.iter().enumerate() {
            if i > 0 {
                cmd.arg(":");
            }
            cmd.args(["-np", "1"]).arg(bin).args(a);
        }
    }
    cmd.output().unwrap()
}

fn check_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn summary(dir: &Path, name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
        .unwrap()
}

/// Every f32 of a state, as bits, named: per layer the eigenvalues and eigenvectors of
/// `A` (if any) and `G`, then the corrected eigenvalues of each block.
fn state_bits(state: &CurvatureState) -> Vec<(String, Vec<u32>)> {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut out = Vec::new();
    for (layer, factors) in state.layout.layers.iter().zip(&state.layers) {
        for (name, eigen) in [
            ("A", factors.input.as_ref()),
            ("G", Some(&factors.gradient)),
        ] {
            if let Some(e) = eigen {
                out.push((format!("{} {name} values", layer.name), bits(&e.values)));
                out.push((format!("{} {name} vectors", layer.name), bits(&e.vectors)));
            }
        }
    }
    for (b, block) in state.corrected.iter().flatten().enumerate() {
        out.push((format!("corrected block {b}"), bits(block)));
    }
    out
}

#[test]
fn fits_over_two_and_three_ranks_match_one_process() {
    let Some(bin) = mpi_binary() else { return };
    let Some(_ctx) = common::gpu() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = TestRng::new(41);
    write_problem(dir, &mut rng);
    let data = dir.join("data.safetensors");
    for fisher in ["type-2", "mc"] {
        // The MPI build run without mpirun: one rank.
        let single = format!("{fisher}-1");
        check_ok(
            "the single-process fit",
            &Command::new(&bin)
                .args(fit_args(dir, &data, fisher, &single))
                .output()
                .unwrap(),
        );
        let s = summary(dir, &single);
        assert_eq!(s["world_size"], 1, "{s}");
        let want = CurvatureState::load(&dir.join(format!("{single}.safetensors"))).unwrap();
        let want = state_bits(&want);
        assert!(want.iter().any(|(name, _)| name.starts_with("corrected")));
        for k in [2usize, 3] {
            let name = format!("{fisher}-{k}");
            check_ok(
                &format!("mpirun -np {k}"),
                &mpirun(&bin, k, &[fit_args(dir, &data, fisher, &name)]),
            );
            let s = summary(dir, &name);
            assert_eq!(s["world_size"], k, "{s}");
            let ranks = s["ranks"].as_array().unwrap();
            assert_eq!(ranks.len(), k, "{s}");
            // 6 batches of 8 (the last of 5), batch b on rank b mod K.
            let examples: Vec<u64> = ranks
                .iter()
                .map(|r| r["examples"].as_u64().unwrap())
                .collect();
            let batches: Vec<u64> = ranks
                .iter()
                .map(|r| r["batches"].as_u64().unwrap())
                .collect();
            assert_eq!(examples.iter().sum::<u64>(), N as u64);
            match k {
                2 => assert_eq!((examples, batches), (vec![24, 21], vec![3, 3])),
                _ => assert_eq!((examples, batches), (vec![16, 16, 13], vec![2, 2, 2])),
            }
            let got = CurvatureState::load(&dir.join(format!("{name}.safetensors"))).unwrap();
            for ((what, got), (_, want)) in state_bits(&got).iter().zip(&want) {
                let differ = got.iter().zip(want).filter(|(a, b)| a != b).count();
                assert_eq!(
                    differ, 0,
                    "{fisher} K = {k}: {differ} elements of {what} differ"
                );
            }
        }
    }
}

/// More batches than `ekfac::distributed::MAX_GROUPS` (600 examples in 300 batches of
/// 2: groups of 2 consecutive batches, summed on the GPU before the host): two ranks
/// (75 groups each) save bitwise the one-process state.
#[test]
fn groups_of_batches_over_two_ranks_match_one_process() {
    let Some(bin) = mpi_binary() else { return };
    let Some(_ctx) = common::gpu() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = TestRng::new(44);
    write_problem(dir, &mut rng);
    let data = dir.join("data600.safetensors");
    write_data(&data, 600, &mut rng);
    let args = |name: &str| {
        let mut args = fit_args(dir, &data, "type-2", name);
        let at = args.iter().position(|a| a == "--batch-size").unwrap() + 1;
        args[at] = "2".into();
        args
    };
    check_ok(
        "the single-process fit",
        &Command::new(&bin).args(args("one")).output().unwrap(),
    );
    check_ok("mpirun -np 2", &mpirun(&bin, 2, &[args("two")]));
    let s = summary(dir, "two");
    let batches: Vec<u64> = s["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["batches"].as_u64().unwrap())
        .collect();
    assert_eq!(batches, [150, 150], "{s}");
    let load = |name: &str| {
        state_bits(&CurvatureState::load(&dir.join(format!("{name}.safetensors"))).unwrap())
    };
    let (want, got) = (load("one"), load("two"));
    assert_eq!(want.len(), got.len());
    for ((what, got), (_, want)) in got.iter().zip(&want) {
        let differ = got.iter().zip(want).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "K = 2: {differ} elements of {what} differ");
    }
}

#[test]
fn a_failing_rank_ends_every_rank_with_its_message_and_no_output() {
    let Some(bin) = mpi_binary() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = TestRng::new(42);
    write_problem(dir, &mut rng);
    // Rank 1 reads a shard directory whose second shard holds a NaN input.
    let bad = dir.join("bad");
    std::fs::create_dir(&bad).unwrap();
    let x: Vec<f32> = (0..N * 6)
        .map(|i| if i == 30 * 6 + 1 { f32::NAN } else { 0.5 })
        .collect();
    let y: Vec<i64> = vec![1; N];
    for (name, range) in [("a", 0..20), ("b", 20..N)] {
        write_safetensors(
            &bad.join(format!("{name}.safetensors")),
            vec![
                (
                    "x",
                    Dtype::F32,
                    vec![range.len(), 6],
                    bytemuck::cast_slice(&x[range.start * 6..range.end * 6]).to_vec(),
                ),
                (
                    "y",
                    Dtype::I64,
                    vec![range.len()],
                    bytemuck::cast_slice(&y[range]).to_vec(),
                ),
            ],
        );
    }
    let good = fit_args(dir, &dir.join("data.safetensors"), "type-2", "failed");
    let failing = fit_args(dir, &bad, "type-2", "failed");
    let out = mpirun(&bin, 2, &[good, failing]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the job succeeded: {stderr}");
    let message = "rank 1 of 2: ";
    assert!(
        stderr.matches(message).count() >= 2
            && stderr.contains("b.safetensors")
            && stderr.contains("x[30, 1] is NaN"),
        "every rank must report rank 1's failure: {stderr}"
    );
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("failed") || n.starts_with('.'))
        .collect();
    assert!(
        left.is_empty(),
        "outputs or temporaries left behind: {left:?}"
    );

    // Ranks given data sets of different sizes (e.g. an inconsistent shared file
    // system) all stop before fitting.
    let short = dir.join("short.safetensors");
    write_data(&short, 40, &mut rng);
    let good = fit_args(dir, &dir.join("data.safetensors"), "type-2", "failed");
    let other = fit_args(dir, &short, "type-2", "failed");
    let out = mpirun(&bin, 2, &[good, other]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the job succeeded: {stderr}");
    assert!(
        stderr
            .matches("the ranks disagree on the number of examples N")
            .count()
            >= 2
            && stderr.contains("from 40 to 45"),
        "every rank must report the mismatch: {stderr}"
    );
    assert!(!dir.join("failed.safetensors").exists());
}

#[test]
fn a_build_without_the_feature_refuses_to_run_as_several_ranks() {
    if Command::new("mpirun").arg("--version").output().is_err() {
        assert!(
            std::env::var("EKFAC_REQUIRE_MPI").map_or(true, |v| v != "1"),
            "EKFAC_REQUIRE_MPI=1 but mpirun is missing"
        );
        eprintln!("SKIPPING: mpirun is missing");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_problem(dir, &mut TestRng::new(43));
    let args = fit_args(dir, &dir.join("data.safetensors"), "type-2", "plain");
    let out = mpirun(Path::new(env!("CARGO_BIN_EXE_ekfac")), 2, &[args]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("one of 2 MPI ranks") && stderr.contains("without the `mpi` feature"),
        "{stderr}"
    );
    assert!(!dir.join("plain.safetensors").exists());
}
