//! `ekfac influence` and `ekfac plot`: data attribution and spectrum pictures.

use std::path::PathBuf;

use clap::Args;

use ekfac::Result;
use ekfac::curvature::state::CurvatureState;
use ekfac::io::Outputs;
use ekfac::progress::Console;

use ekfac::curvature::operator::Approximation;
use ekfac::curvature::validate::check_eigenvectors;
use ekfac::error::Error;
use ekfac::gpu::GpuContext;

use crate::{budget_bytes, check_damping, check_files, load_model, stall_for_tests, written};

#[derive(Args)]
pub(crate) struct PlotArgs {
    /// State file written by `ekfac fit`.
    #[arg(long)]
    state: PathBuf,
    /// Output picture: PNG, or SVG when the name ends in .svg.
    #[arg(long)]
    out: PathBuf,
    /// The damping line (default: the value stored at fit time).
    #[arg(long, allow_negative_numbers = true)]
    damping: Option<f64>,
}

#[derive(Args)]
pub(crate) struct InfluenceArgs {
    /// State file written by `ekfac fit` (its loss, parameters and curvature).
    #[arg(long)]
    state: PathBuf,
    /// The model the state was fitted for (JSON).
    #[arg(long)]
    model: PathBuf,
    /// Its weights (safetensors).
    #[arg(long)]
    weights: PathBuf,
    /// Training data (safetensors with `x` and `y`, or a directory of such shards, as
    /// for fit's --data): the examples scored. Read a batch at a time.
    #[arg(long)]
    train: PathBuf,
    /// Query data (a safetensors file with `x` and `y`, or a directory of shards).
    #[arg(long)]
    query: PathBuf,
    /// Output safetensors file: `scores` F32 [Q, N], and what the options add.
    #[arg(long)]
    out: PathBuf,
    /// δ of (F + δI)⁻¹, exact damping (default: the value stored at fit time).
    #[arg(long, allow_negative_numbers = true)]
    damping: Option<f64>,
    /// Also write the K most helpful and harmful training examples per query.
    #[arg(long, allow_negative_numbers = true)]
    top_k: Option<usize>,
    /// Training examples per scoring batch (fewer when the memory budget asks).
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    batch_size: usize,
    /// Also write `self_influence` F32 [N]: ∇ℓ_nᵀ (F + δI)⁻¹ ∇ℓ_n.
    #[arg(long)]
    self_influence: bool,
    /// Use KFAC instead of EKFAC.
    #[arg(long)]
    kfac: bool,
    /// Write a Markdown report (README.md) into this directory, with an image grid per
    /// query for image inputs ([C, H, W], C = 1 or 3).
    #[arg(long)]
    report: Option<PathBuf>,
    /// GPU memory the scoring may plan for, in MiB (default: as for fit).
    #[arg(long, allow_negative_numbers = true)]
    memory_budget_mib: Option<u64>,
}

pub(crate) fn run_influence(args: &InfluenceArgs, console: &Console, quiet: bool) -> Result<()> {
    use ekfac::curvature::influence::{InfluenceOptions, check_state_matches, influence};
    use ekfac::report::{TopK, influence_file, influence_markdown};
    if let Some(d) = args.damping {
        check_damping(d)?;
    }
    if args.top_k == Some(0) {
        return Err(Error::Options("--top-k must be at least 1, found 0".into()));
    }
    if args.batch_size == 0 {
        return Err(Error::Options(
            "--batch-size must be at least 1, found 0".into(),
        ));
    }
    let budget = args.memory_budget_mib.map(budget_bytes).transpose()?;
    let inputs = [
        ("--state", args.state.as_path()),
        ("--model", args.model.as_path()),
        ("--weights", args.weights.as_path()),
        ("--train", args.train.as_path()),
        ("--query", args.query.as_path()),
    ];
    let report_file = args.report.as_ref().map(|d| d.join("README.md"));
    let mut outputs = vec![("--out", args.out.as_path())];
    if let (Some(dir), Some(file)) = (&args.report, &report_file) {
        // Created up front (empty), so that an impossible directory fails before any
        // work and nothing is written.
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::input(
                dir.display(),
                format!("--report: cannot create the report directory: {e}"),
            )
        })?;
        outputs.push(("--report", file.as_path()));
    }
    check_files(&inputs, &outputs, &["--train", "--query"])?;
    let model = load_model(&args.model, &args.weights)?;
    let state = CurvatureState::load(&args.state)?;
    check_state_matches(&state, &model, &args.state.display().to_string())?;
    // Memory-mapped (or every shard of a directory), read a batch at a time; the
    // shapes are checked here, before the GPU is opened, and the values as the scoring
    // streams over them.
    let train = ekfac::data::open_as(&args.train, "--train")?;
    let query = ekfac::data::open_as(&args.query, "--query")?;
    for data in [&train, &query] {
        ekfac::data::check_layout(data.as_ref(), &model.graph, state.meta.options.loss)?;
    }
    let (train, query) = (train.as_ref(), query.as_ref());
    if let Some(k) = args.top_k
        && k > train.len()
    {
        return Err(Error::Options(format!(
            "--top-k {k} is more than the {} training examples in {}",
            train.len(),
            args.train.display()
        )));
    }
    if !args.kfac && !state.has_ekfac() {
        return Err(Error::Options(format!(
            "{}: this state was fitted with --fisher forward-only, which has no EKFAC; \
             pass --kfac",
            args.state.display()
        )));
    }
    let ctx = GpuContext::new()?;
    if let Some(bytes) = budget {
        ctx.set_memory_budget(bytes);
    }
    check_eigenvectors(&ctx, &state, &args.state.display().to_string())?;
    let options = InfluenceOptions {
        damping: args.damping,
        approx: if args.kfac {
            Approximation::Kfac
        } else {
            Approximation::Ekfac
        },
        batch_size: args.batch_size,
        self_influence: args.self_influence,
    };
    let result = influence(&ctx, &model, &state, [train, query], &options, console)?;
    let top = args
        .top_k
        .or(args.report.as_ref().map(|_| train.len().min(5)))
        .map(|k| TopK::new(&result, train.len(), k))
        .transpose()?;
    let mut out = Outputs::new();
    let bytes = influence_file(
        &args.out,
        &result,
        query.len(),
        train.len(),
        args.top_k.and(top.as_ref()),
    )?;
    out.stage(&args.out, &bytes)?;
    if let (Some(file), Some(top)) = (&report_file, &top) {
        let mut images = vec![None; query.len()];
        if let [c @ (1 | 3), h, w] = train.example_shape()[..] {
            for (q, name) in images.iter_mut().enumerate() {
                let file_name = format!("query_{q}.png");
                let path = file.with_file_name(&file_name);
                let grid = ekfac::report::influence_grid(train, query, top, q, [c, h, w])?;
                out.stage(&path, &grid.encode(ekfac::plot::Format::Png, &path)?)?;
                *name = Some(file_name);
            }
        }
        let md = influence_markdown(train, query, &result, top, &images)?;
        out.stage(file, md.as_bytes())?;
    }
    stall_for_tests();
    out.commit()?;
    if !quiet {
        println!("wrote {}", written(&outputs));
    }
    Ok(())
}

pub(crate) fn run_plot(args: &PlotArgs, quiet: bool) -> Result<()> {
    if let Some(d) = args.damping {
        check_damping(d)?;
    }
    let inputs = [("--state", args.state.as_path())];
    ekfac::io::check_input(&args.state, "--state", None)?;
    ekfac::io::check_outputs(&inputs, &[("--out", args.out.as_path())])?;
    let state = CurvatureState::load(&args.state)?;
    let damping = args.damping.or(state.meta.damping).unwrap_or(0.0);
    let picture = ekfac::plot::spectrum(&state, damping);
    let bytes = picture.encode(ekfac::plot::Format::of(&args.out), &args.out)?;
    let mut out = Outputs::new();
    out.stage(&args.out, &bytes)?;
    out.commit()?;
    if !quiet {
        println!(
            "wrote {} ({} × {} pixels)",
            args.out.display(),
            picture.width,
            picture.height
        );
    }
    Ok(())
}
