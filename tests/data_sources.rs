//! Data sources (issue 14): a memory-mapped file and a directory of shards give exactly
//! the examples of the in-memory data set, so fits on them are bitwise the same; shards
//! that disagree are errors naming the file; each rank checks only its own batches;
//! and a fit and influence scoring stream their data, so a child process whose memory
//! is capped fits and scores a data directory 8× larger than the cap.

mod common;

use std::path::Path;

use ekfac::curvature::fit::fit;
use ekfac::curvature::influence::{InfluenceOptions, influence};
use ekfac::curvature::options::{FisherType, LossKind, Options};
use ekfac::data::{BatchBuffer, DataSource, MappedFile, ShardDirectory};
use ekfac::distributed::Partition;
use ekfac::graph::ModelSpec;
use ekfac::model::{Dataset, Targets};
use ekfac::progress::Silent;
use safetensors::{Dtype, tensor::TensorView};

use common::TestRng;
use common::child::{proc_status_kib, run_child};

/// Writes `x` (F32 `[n, *shape]`) and `y` (class indices as `y_dtype`, or F32 values
/// `[n, cols]`) of examples `range` of `data`.
fn write_part(path: &Path, data: &Dataset, range: std::ops::Range<usize>, y_dtype: Dtype) {
    let e = data.example_len();
    let n = range.len();
    let x = &data.x[range.start * e..range.end * e];
    let mut x_shape = vec![n];
    x_shape.extend(&data.example_shape);
    let (y_bytes, y_shape): (Vec<u8>, Vec<usize>) = match &data.y {
        Targets::Classes(c) => {
            let c = &c[range];
            match y_dtype {
                Dtype::I32 => {
                    let v: Vec<i32> = c.iter().map(|&k| k as i32).collect();
                    (bytemuck::cast_slice(&v).to_vec(), vec![n])
                }
                _ => (bytemuck::cast_slice(c).to_vec(), vec![n]),
            }
        }
        Targets::Values { data, cols } => (
            bytemuck::cast_slice(&data[range.start * cols..range.end * cols]).to_vec(),
            vec![n, *cols],
        ),
    };
    let y_dtype = match data.y {
        Targets::Classes(_) => y_dtype,
        Targets::Values { .. } => Dtype::F32,
    };
    let views = vec![
        (
            "x".to_string(),
            TensorView::new(Dtype::F32, x_shape, bytemuck::cast_slice(x)).unwrap(),
        ),
        (
            "y".to_string(),
            TensorView::new(y_dtype, y_shape, &y_bytes).unwrap(),
        ),
    ];
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Writes `data` as shards of `sizes` examples into `dir` (names sort in order).
fn write_shards(dir: &Path, data: &Dataset, sizes: &[usize]) {
    assert_eq!(sizes.iter().sum::<usize>(), data.len);
    let mut start = 0;
    for (i, &size) in sizes.iter().enumerate() {
        write_part(
            &dir.join(format!("part-{i:03}.safetensors")),
            data,
            start..start + size,
            Dtype::I64,
        );
        start += size;
    }
}

fn mlp() -> ModelSpec {
    ModelSpec::from_json_str(
        r#"{"input_shape": [4], "layers": [
        {"type": "linear", "name": "0", "in_features": 4, "out_features": 5},
        {"type": "relu"},
        {"type": "linear", "name": "2", "in_features": 5, "out_features": 3}]}"#,
        "data source test model",
    )
    .unwrap()
}

/// Reads `[start, end)` of `source` into fresh buffers.
fn read(source: &dyn DataSource, start: usize, end: usize) -> BatchBuffer {
    let mut b = BatchBuffer::new(source);
    b.read(source, start, end).unwrap();
    b
}

#[test]
fn shards_read_exactly_the_concatenated_examples() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = TestRng::new(14);
    let mut data = common::random_classification(&mut rng, 37, &[2, 3], 4);
    let file = tmp.path().join("all.safetensors");
    write_part(&file, &data, 0..37, Dtype::I64);
    let dir = tmp.path().join("shards");
    std::fs::create_dir(&dir).unwrap();
    write_shards(&dir, &data, &[5, 13, 1, 18]);
    // Not a shard: ignored.
    std::fs::write(dir.join("README.txt"), "notes").unwrap();
    let mapped = MappedFile::open(&file, "--data").unwrap();
    let shards = ShardDirectory::open(&dir).unwrap();
    assert_eq!(shards.shards().len(), 4);
    for source in [&mapped as &dyn DataSource, &shards] {
        assert_eq!(source.len(), 37);
        assert_eq!(source.example_shape(), &[2, 3]);
    }
    for (start, end) in [
        (0, 37),
        (3, 6),
        (4, 19),
        (17, 19),
        (18, 19),
        (18, 37),
        (36, 37),
    ] {
        let want = read(&data, start, end);
        assert_eq!(
            read(&mapped, start, end),
            want,
            "file, examples {start}..{end}"
        );
        assert_eq!(
            read(&shards, start, end),
            want,
            "shards, examples {start}..{end}"
        );
    }
    // Values targets (F32 [N, C]) across shards too.
    let values: Vec<f32> = rng.vec(37 * 2);
    data.y = Targets::Values {
        data: values,
        cols: 2,
    };
    let dir = tmp.path().join("values");
    std::fs::create_dir(&dir).unwrap();
    write_shards(&dir, &data, &[20, 17]);
    let shards = ShardDirectory::open(&dir).unwrap();
    assert_eq!(read(&shards, 11, 30), read(&data, 11, 30));
}

#[test]
fn fits_on_a_file_and_on_shards_are_bitwise_the_same() {
    let Some(ctx) = common::gpu() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = TestRng::new(15);
    let model = common::random_model(mlp(), &mut rng);
    let data = common::random_classification(&mut rng, 37, &[4], 3);
    let file = tmp.path().join("all.safetensors");
    write_part(&file, &data, 0..37, Dtype::I64);
    let dir = tmp.path().join("shards");
    std::fs::create_dir(&dir).unwrap();
    write_shards(&dir, &data, &[5, 13, 1, 18]);
    let mapped = MappedFile::open(&file, "--data").unwrap();
    let shards = ShardDirectory::open(&dir).unwrap();
    for fisher in [FisherType::Mc, FisherType::Type2] {
        // Batches of 8 cross every shard boundary (5, 18, 19).
        let options = Options {
            fisher,
            batch_size: 8,
            mc_samples: if fisher == FisherType::Mc { 2 } else { 1 },
            ..Options::default()
        };
        let want = fit(&ctx, &model, &data, &options, Some(1e-3))
            .unwrap()
            .state;
        for (name, source) in [("file", &mapped as &dyn DataSource), ("shards", &shards)] {
            let got = fit(&ctx, &model, source, &options, Some(1e-3)).unwrap();
            assert!(
                got.state == want,
                "{fisher:?}: the fit on the {name} differs from the in-memory data"
            );
            assert_eq!(got.ranks.len(), 1);
            assert_eq!(got.ranks[0].examples, 37);
            assert_eq!(got.ranks[0].batches, 5);
        }
    }
}

#[test]
fn shards_that_disagree_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = TestRng::new(16);
    let data = common::random_classification(&mut rng, 10, &[4], 3);
    let other = common::random_classification(&mut rng, 10, &[5], 3);
    let open_err = |dir: &Path| match ShardDirectory::open(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    };

    // A different per-example shape in the second shard.
    let dir = tmp.path().join("shape");
    std::fs::create_dir(&dir).unwrap();
    write_part(&dir.join("a.safetensors"), &data, 0..10, Dtype::I64);
    write_part(&dir.join("b.safetensors"), &other, 0..4, Dtype::I64);
    let msg = open_err(&dir);
    assert!(
        msg.contains("b.safetensors")
            && msg.contains("a.safetensors")
            && msg.contains("[N, 5]")
            && msg.contains("[N, 4]"),
        "{msg}"
    );

    // A different target dtype (I32 against I64).
    let dir = tmp.path().join("dtype");
    std::fs::create_dir(&dir).unwrap();
    write_part(&dir.join("a.safetensors"), &data, 0..5, Dtype::I64);
    write_part(&dir.join("b.safetensors"), &data, 5..10, Dtype::I32);
    let msg = open_err(&dir);
    assert!(
        msg.starts_with(&dir.join("b.safetensors").display().to_string())
            && msg.contains("I32")
            && msg.contains("I64"),
        "{msg}"
    );

    // A broken shard is named; so is a directory without shards.
    let dir = tmp.path().join("broken");
    std::fs::create_dir(&dir).unwrap();
    write_part(&dir.join("a.safetensors"), &data, 0..5, Dtype::I64);
    std::fs::write(dir.join("b.safetensors"), b"not a safetensors file").unwrap();
    let msg = open_err(&dir);
    assert!(msg.contains("b.safetensors"), "{msg}");
    let dir = tmp.path().join("empty");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "no shards").unwrap();
    let msg = open_err(&dir);
    assert!(msg.contains("without any *.safetensors shard"), "{msg}");

    // A non-finite input in a later shard names that shard and the example.
    let dir = tmp.path().join("nan");
    std::fs::create_dir(&dir).unwrap();
    let mut bad = data.clone();
    bad.x[7 * 4 + 2] = f32::NAN;
    write_part(&dir.join("a.safetensors"), &bad, 0..5, Dtype::I64);
    write_part(&dir.join("b.safetensors"), &bad, 5..10, Dtype::I64);
    let shards = ShardDirectory::open(&dir).unwrap();
    let graph = common::random_model(mlp(), &mut rng).graph;
    let check = |ranges: Vec<(usize, usize)>| {
        ekfac::data::check(
            &shards,
            &graph,
            LossKind::CrossEntropy,
            FisherType::Mc,
            ranges.into_iter(),
        )
    };
    let err = ekfac::data::check_all(&shards, &graph, LossKind::CrossEntropy, FisherType::Mc)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("b.safetensors") && err.contains("x[7, 2] is NaN"),
        "{err}"
    );
    // Each rank of a distributed fit checks only its own batches: with batches of 3
    // over 2 ranks, example 7 (batch 2) is rank 0's.
    let rank = |rank| {
        Partition { rank, size: 2 }
            .batches(10, 3)
            .map(|span| (span.start, span.len))
            .collect::<Vec<_>>()
    };
    assert_eq!(rank(0), [(0, 3), (6, 3)]);
    assert_eq!(rank(1), [(3, 3), (9, 1)]);
    check(rank(1)).unwrap();
    let err = check(rank(0)).unwrap_err().to_string();
    assert!(
        err.contains("b.safetensors") && err.contains("x[7, 2] is NaN"),
        "{err}"
    );
}

/// The child's environment variable: the data directory to fit.
const DIR_VAR: &str = "EKFAC_DATA_SOURCES_DIR";

/// How much the child's memory may grow over a warmed-up fit of two batches.
const CAP_BYTES: u64 = 16 << 20;

/// A model whose input is large (`[1, 64, 64]`, 16 KiB per example) and whose curvature
/// is small: 16×16 average pooling, then `Linear(16, 3)`.
fn pooled_model(rng: &mut TestRng) -> ekfac::graph::Model {
    let spec = ModelSpec::from_json_str(
        r#"{"input_shape": [1, 64, 64], "layers": [
        {"type": "avg_pool2d", "kernel_size": 16, "stride": 16, "padding": 0},
        {"type": "flatten"},
        {"type": "linear", "name": "2", "in_features": 16, "out_features": 3}]}"#,
        "streaming test model",
    )
    .unwrap();
    common::random_model(spec, rng)
}

fn streaming_options() -> Options {
    Options {
        fisher: FisherType::Type2,
        batch_size: 128,
        ..Options::default()
    }
}

/// Fits [`pooled_model`] on the directory in [`DIR_VAR`] after a warm-up fit and
/// influence scoring of two batches, with the data segment limited (`RLIMIT_DATA`) to
/// what it used after the warm-up plus [`CAP_BYTES`], then scores the directory's
/// examples as influence training data against 4 queries under the same limit, and
/// prints the peak resident set of the warm-up, of the fit and of the scoring
/// (`VmHWM`, reset in between).
#[test]
#[ignore = "run in a child process by a_capped_child_fits_and_scores_a_directory_8x_larger_than_its_cap"]
fn streamed_fit_in_child() {
    let dir = std::env::var(DIR_VAR).expect("the parent sets the directory");
    let ctx = common::gpu().expect("the parent checked for a GPU");
    let mut rng = TestRng::new(17);
    let model = pooled_model(&mut rng);
    let options = streaming_options();
    let warm = common::random_classification(&mut rng, 256, &[1, 64, 64], 3);
    let queries = common::random_classification(&mut rng, 4, &[1, 64, 64], 3);
    let scoring = InfluenceOptions {
        batch_size: 128,
        ..InfluenceOptions::default()
    };
    let warm_state = fit(&ctx, &model, &warm, &options, Some(1e-3))
        .unwrap()
        .state;
    influence(
        &ctx,
        &model,
        &warm_state,
        [&warm, &queries],
        &scoring,
        &Silent,
    )
    .unwrap();
    drop(warm);
    let warm_peak = proc_status_kib("VmHWM:").unwrap();
    // Resets VmHWM to the current resident set (Linux 4.0+).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let data_kib = proc_status_kib("VmData:").unwrap();
    let limit = data_kib * 1024 + CAP_BYTES;
    let rlimit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_DATA, &rlimit) }, 0);
    let source = ShardDirectory::open(Path::new(&dir)).unwrap();
    let fitted = fit(&ctx, &model, &source, &options, Some(1e-3)).unwrap();
    assert_eq!(fitted.state.meta.num_data, source.len());
    let fit_peak = proc_status_kib("VmHWM:").unwrap();
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let scores = influence(
        &ctx,
        &model,
        &fitted.state,
        [&source, &queries],
        &scoring,
        &Silent,
    )
    .unwrap();
    assert_eq!(scores.scores.len(), 4 * source.len());
    println!(
        "usage {warm_peak} {fit_peak} {data_kib} {} {}",
        proc_status_kib("VmData:").unwrap(),
        proc_status_kib("VmHWM:").unwrap(),
    );
}

#[test]
fn a_capped_child_fits_and_scores_a_directory_8x_larger_than_its_cap() {
    if proc_status_kib("VmHWM:").is_none() || common::gpu().is_none() {
        eprintln!("SKIPPING: needs /proc/self/status and a GPU");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = TestRng::new(18);
    // 9 shards of 1000 examples of 16 KiB: 137 MiB ≥ 8 × 16 MiB.
    let mut bytes = 0;
    for i in 0..9 {
        let part = common::random_classification(&mut rng, 1000, &[1, 64, 64], 3);
        let path = tmp.path().join(format!("part-{i}.safetensors"));
        write_part(&path, &part, 0..1000, Dtype::I64);
        bytes += std::fs::metadata(&path).unwrap().len();
    }
    assert!(bytes >= 8 * CAP_BYTES, "{bytes} bytes of data");
    let (v, stderr) = run_child(
        "streamed_fit_in_child",
        DIR_VAR,
        tmp.path(),
        &format!("the capped child fit of {bytes} bytes"),
    );
    let [warm_peak, fit_peak, data_before, data_after, scoring_peak] =
        [v[0], v[1], v[2], v[3], v[4]];
    eprintln!(
        "data {bytes} bytes; peak RSS warm-up {warm_peak} KiB, streamed fit {fit_peak} KiB, \
         streamed influence scoring {scoring_peak} KiB; VmData {data_before} → {data_after} \
         KiB\n{stderr}"
    );
    for (what, peak) in [("fit", fit_peak), ("influence scoring", scoring_peak)] {
        assert!(
            peak * 1024 <= warm_peak * 1024 + CAP_BYTES,
            "the streamed {what} peaked at {peak} KiB, more than the warm-up's {warm_peak} \
             KiB + {} KiB",
            CAP_BYTES >> 10
        );
    }
}
