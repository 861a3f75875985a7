//! The `ekfac` command line: `info`, `fit`, `apply`, and with no arguments the main
//! job (KFAC/EKFAC of a small network on the bundled digits data, compared with a
//! committed curvlinops reference).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};

mod influence;
use influence::{InfluenceArgs, PlotArgs, run_influence, run_plot};

use ekfac::Result;
use ekfac::curvature::eigen::solver_for;
use ekfac::curvature::fit::{FitRun, fit_distributed};
use ekfac::curvature::operator::{Approximation, Operator, Transform};
use ekfac::curvature::options::{
    DampingMode, EigensolverKind, FisherType, KfacApprox, LossKind, Options, Reduction,
};
use ekfac::curvature::state::CurvatureState;
use ekfac::curvature::summary::Summary;
use ekfac::curvature::validate::check_eigenvectors;
use ekfac::data::DataSource;
use ekfac::distributed::{Communicator, agree};
use ekfac::error::Error;
use ekfac::gpu::GpuContext;
use ekfac::graph::Model;
use ekfac::io::{MatrixReader, MatrixWriter, Outputs};
use ekfac::model::TensorFile;
use ekfac::progress::{Console, ConsoleMode, Silent};

#[derive(Parser)]
#[command(
    name = "ekfac",
    version,
    about = "KFAC and EKFAC curvature of neural networks on the GPU (matches curvlinops 3.0.1)",
    long_about = "KFAC and EKFAC curvature of neural networks on the GPU (matches curvlinops \
                  3.0.1).\n\nWithout a subcommand, runs the main job: KFAC and EKFAC of a small \
                  network on the bundled 8×8 digits data, compared with a committed curvlinops \
                  reference."
)]
struct Cli {
    /// Print nothing on success (no progress, no summary); errors still print.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the adapter, backend, driver, device type, limits and features in use, the
    /// largest Kronecker factor the eigendecomposition takes and the memory budget.
    Info,
    /// Fit KFAC and EKFAC and write a state file.
    Fit(FitArgs),
    /// Multiply vectors by a fitted KFAC/EKFAC or its damped inverse.
    Apply(ApplyArgs),
    /// Influence of every training example on every query:
    /// score[q, n] = ∇ℓ_qᵀ (EKFAC + δI)⁻¹ ∇ℓ_n.
    Influence(InfluenceArgs),
    /// Draw each layer's KFAC and EKFAC eigenvalues (sorted, log scale) and the damping.
    Plot(PlotArgs),
}

#[derive(Args)]
struct FitArgs {
    /// Model description (JSON layer list).
    #[arg(long)]
    model: PathBuf,
    /// Weights (safetensors, PyTorch state_dict names and layouts).
    #[arg(long)]
    weights: PathBuf,
    /// Data: a safetensors file with `x` and `y`, or a directory of `*.safetensors`
    /// shards (read in file-name order as one data set).
    #[arg(long)]
    data: PathBuf,
    /// mse | cross_entropy | bce_with_logits.
    #[arg(long)]
    loss: LossKind,
    /// mean | sum.
    #[arg(long, default_value_t = Options::DEFAULTS.reduction)]
    reduction: Reduction,
    /// type-2 | mc | empirical | forward-only (forward-only: KFAC only).
    #[arg(long, default_value_t = Options::DEFAULTS.fisher)]
    fisher: FisherType,
    /// Monte-Carlo samples per example (only with --fisher mc).
    #[arg(long, default_value_t = Options::DEFAULTS.mc_samples, allow_negative_numbers = true)]
    mc_samples: usize,
    /// expand | reduce (weight-sharing layers).
    #[arg(long, default_value_t = Options::DEFAULTS.approx)]
    approx: KfacApprox,
    /// Treat each layer's weight and bias as one block.
    #[arg(long)]
    joint_bias: bool,
    /// Comma-separated parameter names (default: all).
    #[arg(long, value_delimiter = ',')]
    params: Option<Vec<String>>,
    #[arg(long, default_value_t = Options::DEFAULTS.batch_size, allow_negative_numbers = true)]
    batch_size: usize,
    /// Seed of the Monte-Carlo generator.
    #[arg(long, default_value_t = Options::DEFAULTS.seed, allow_negative_numbers = true)]
    seed: u64,
    /// δ for the damped logdet and the default of inverse products.
    #[arg(long, default_value_t = 1e-3, allow_negative_numbers = true)]
    damping: f64,
    /// GPU memory a fit may plan for, in MiB; batches and stacks of backpropagated
    /// vectors are split to fit (default: half the adapter's max buffer size, 256 MiB
    /// to 4 GiB).
    #[arg(long, allow_negative_numbers = true)]
    memory_budget_mib: Option<u64>,
    /// Warm-start the eigendecompositions from this earlier state (refitting after the
    /// weights moved).
    #[arg(long)]
    init_state: Option<PathBuf>,
    /// jacobi | host | auto: the eigensolver of the Kronecker factors. `jacobi`: parallel
    /// Jacobi on the GPU in f32; `host`: faer in f64 on the CPU; `auto`: `host` when
    /// the adapter is a CPU (a software driver), else `jacobi`.
    #[arg(long, default_value_t = EigensolverKind::default())]
    eigensolver: EigensolverKind,
    /// Fit twice and require bitwise-equal results.
    #[arg(long)]
    check_deterministic: bool,
    /// Output state file (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Also write the summary as JSON here.
    #[arg(long)]
    summary: Option<PathBuf>,
}

#[derive(Args)]
struct ApplyArgs {
    /// State file written by `ekfac fit`.
    #[arg(long)]
    state: PathBuf,
    /// Safetensors file holding a [P, K] or [P] matrix (f32 or f64).
    #[arg(long)]
    vectors: PathBuf,
    /// Key of the matrix in --vectors.
    #[arg(long, default_value = "V")]
    key: String,
    /// Use KFAC instead of EKFAC.
    #[arg(long)]
    kfac: bool,
    /// Apply the damped inverse.
    #[arg(long)]
    inverse: bool,
    /// δ of the inverse (default: the value stored at fit time).
    #[arg(long, requires = "inverse", allow_negative_numbers = true)]
    damping: Option<f64>,
    /// exact | plain | heuristic (plain and heuristic: KFAC only).
    #[arg(long, default_value = "exact", requires = "inverse")]
    damping_mode: DampingMode,
    /// GPU memory the products may plan for, in MiB; columns of --vectors are taken in
    /// chunks that fit (default: as for fit).
    #[arg(long, allow_negative_numbers = true)]
    memory_budget_mib: Option<u64>,
    /// Output safetensors file with key `out`.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    // SAFETY: no other thread exists yet.
    unsafe { ekfac::progress::quiet_headless_vulkan() };
    let cli = Cli::parse();
    remove_temporaries_on_signals();
    let console = Console::new(ConsoleMode::detect(cli.quiet));
    let quiet = cli.quiet;
    let result = match cli.command {
        None => main_job(&console, quiet),
        Some(Command::Info) => GpuContext::new().map(|ctx| {
            if quiet {
                return;
            }
            println!(
                "{}\nlargest Kronecker factor: {} × {} (Jacobi in up to three storage \
                 bindings)\nmemory budget: {} bytes",
                ctx.describe(),
                ekfac::ops::jacobi::max_dimension(&ctx),
                ekfac::ops::jacobi::max_dimension(&ctx),
                ctx.memory_budget()
            )
        }),
        Some(Command::Fit(args)) => run_fit(&args, &console, quiet),
        Some(Command::Apply(args)) => run_apply(&args, quiet),
        Some(Command::Influence(args)) => run_influence(&args, &console, quiet),
        Some(Command::Plot(args)) => run_plot(&args, quiet),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say_error(&e);
            ExitCode::FAILURE
        }
    }
}

/// Writes `error: {e}` and a newline to standard error in ONE write.
///
/// `eprintln!` on the unbuffered standard error issues one `write` per formatted
/// piece, and under `mpirun` the pieces of two ranks' messages can interleave
/// ("error: rank error: 1 of 2: …"). One write of a line shorter than `PIPE_BUF`
/// reaches the pipe whole.
fn say_error(e: &Error) {
    use std::io::Write;
    let line = format!("error: {e}\n");
    let mut stderr = std::io::stderr().lock();
    // Nothing is left to tell the user if standard error itself fails.
    let _ = stderr.write_all(line.as_bytes());
    let _ = stderr.flush();
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// The memory budget in bytes for `--memory-budget-mib`.
fn budget_bytes(mib: u64) -> Result<u64> {
    mib.checked_mul(1 << 20).ok_or_else(|| {
        Error::Options(format!(
            "--memory-budget-mib {mib} is too large: at most {} MiB (2^64 bytes) can be \
             counted",
            u64::MAX >> 20
        ))
    })
}

/// The damping as given on the command line, refused unless finite and non-negative.
fn check_damping(damping: f64) -> Result<()> {
    if !(damping.is_finite() && damping >= 0.0) {
        return Err(Error::Options(format!(
            "--damping must be a finite non-negative number, found {damping}"
        )));
    }
    Ok(())
}

fn run_fit(args: &FitArgs, console: &Console, quiet: bool) -> Result<()> {
    let comm = communicator()?;
    let result = fit_ranks(args, console, quiet, comm.as_ref());
    if let Err(e @ Error::Distributed { .. }) = &result {
        // Every rank has this error: each says it, and none exits before all have
        // (mpirun ends the whole job at the first non-zero exit).
        say_error(e);
        comm.barrier();
        drop(comm);
        std::process::exit(1);
    }
    result
}

fn fit_ranks(
    args: &FitArgs,
    console: &Console,
    quiet: bool,
    comm: &dyn Communicator,
) -> Result<()> {
    let start = Instant::now();
    let options = Options {
        loss: args.loss,
        reduction: args.reduction,
        fisher: args.fisher,
        mc_samples: args.mc_samples,
        approx: args.approx,
        joint_bias: args.joint_bias,
        params: args.params.clone(),
        batch_size: args.batch_size,
        seed: args.seed,
    };
    // One rank, or with the `mpi` feature every rank of `mpirun -np K`: each loads
    // the inputs and runs its share of the batches; a failure on any rank ends every
    // rank with that rank's message (`ekfac::distributed::agree`), and only rank 0
    // writes outputs.
    let Loaded {
        model,
        previous,
        data,
        ctx,
    } = agree(comm, load_fit_inputs(args, &options))?;
    let load_ms = ms(start);
    let solver = solver_for(args.eigensolver, &ctx);
    let run = FitRun {
        damping: Some(args.damping),
        previous: previous.as_ref(),
        solver: solver.as_ref(),
        progress: if comm.rank() == 0 { console } else { &Silent },
    };
    let mut fitted = fit_distributed(&ctx, &model, data.as_ref(), &options, &run, comm)?;
    if args.check_deterministic {
        let again = fit_distributed(&ctx, &model, data.as_ref(), &options, &run, comm)?;
        if again.state != fitted.state {
            return Err(Error::gpu(
                "--check-deterministic",
                "two fits on the same adapter gave different results",
            ));
        }
    }
    if comm.rank() != 0 {
        // Waits for rank 0's outputs, so that its failure is every rank's.
        return agree(comm, Ok(()));
    }
    fitted.timings.load = load_ms;
    let start = Instant::now();
    let mut summary = Summary::new(
        &fitted.state,
        args.damping,
        fitted.timings.clone(),
        fitted.peak_gpu_bytes,
    );
    summary.timings_ms.scalars = ms(start);
    summary.eigensolver = Some(solver.name().to_string());
    summary.world_size = comm.size();
    summary.ranks = fitted.ranks.clone();
    // Every output is written to a temporary file first; all are renamed into place
    // only once all of them were written.
    let staged = (|| {
        let start = Instant::now();
        let mut out = Outputs::new();
        out.stage(&args.out, &fitted.state.to_bytes(&args.out)?)?;
        summary.timings_ms.save = ms(start);
        if let Some(path) = &args.summary {
            let text = serde_json::to_string_pretty(&summary)
                .map_err(|e| Error::input(path.display(), format!("serialising JSON: {e}")))?;
            out.stage(path, text.as_bytes())?;
        }
        Ok(out)
    })();
    let out = agree(comm, staged)?;
    stall_for_tests();
    out.commit()?;
    if !quiet {
        print!("{}", summary.render());
        println!("wrote {}", written(&outputs(args)));
    }
    Ok(())
}

/// What a fit reads before it starts, loaded and checked on every rank.
struct Loaded {
    model: Model,
    previous: Option<CurvatureState>,
    data: Box<dyn DataSource>,
    ctx: GpuContext,
}

/// `--out` and `--summary`.
fn outputs(args: &FitArgs) -> Vec<(&'static str, &std::path::Path)> {
    let mut outputs = vec![("--out", args.out.as_path())];
    if let Some(p) = &args.summary {
        outputs.push(("--summary", p.as_path()));
    }
    outputs
}

/// Checks the fit's inputs and outputs, reads the model, weights, warm start and data
/// (memory-mapped, or every shard of a directory), and opens the GPU.
fn load_fit_inputs(args: &FitArgs, options: &Options) -> Result<Loaded> {
    // The options are validated once, by the fit.
    check_damping(args.damping)?;
    let budget = args.memory_budget_mib.map(budget_bytes).transpose()?;
    let mut inputs = vec![
        ("--model", args.model.as_path()),
        ("--weights", args.weights.as_path()),
        ("--data", args.data.as_path()),
    ];
    if let Some(p) = &args.init_state {
        inputs.push(("--init-state", p.as_path()));
    }
    check_files(&inputs, &outputs(args), &["--data"])?;
    let model = load_model(&args.model, &args.weights)?;
    let previous = args
        .init_state
        .as_deref()
        .map(CurvatureState::load)
        .transpose()?;
    // The data's shapes are checked against the model here, so that errors name the
    // data file and come before the GPU is opened; the fit checks the values as it
    // streams over them.
    let data = ekfac::data::open(&args.data)?;
    ekfac::data::check_layout(data.as_ref(), &model.graph, options.loss)?;
    let ctx = GpuContext::new()?;
    if let Some(bytes) = budget {
        ctx.set_memory_budget(bytes);
    }
    if let (Some(state), Some(path)) = (&previous, &args.init_state) {
        check_eigenvectors(&ctx, state, &path.display().to_string())?;
    }
    Ok(Loaded {
        model,
        previous,
        data,
        ctx,
    })
}

/// Checks a command's files before any work: each input exists and is readable
/// (`--model` within the JSON size limit; the flags in `data` are data inputs, a file or
/// a shard directory, that no output may be), and no output overwrites an input.
fn check_files(
    inputs: &[(&str, &std::path::Path)],
    outputs: &[(&str, &std::path::Path)],
    data: &[&str],
) -> Result<()> {
    for &(name, path) in inputs {
        if data.contains(&name) {
            ekfac::io::check_data_input(path, name, outputs)?;
            continue;
        }
        let limit = (name == "--model").then_some(ekfac::io::MAX_JSON_BYTES);
        ekfac::io::check_input(path, name, limit)?;
    }
    ekfac::io::check_outputs(inputs, outputs)
}

/// The model of `--model` (graph JSON) with the weights of `--weights` (safetensors).
fn load_model(model: &std::path::Path, weights: &std::path::Path) -> Result<Model> {
    let graph = ekfac::graph::json::from_json_str(
        &ekfac::io::read_json_text(model, "--model")?,
        model.display(),
    )?;
    Model::from_tensor_file(graph, &TensorFile::load(weights)?)
}

/// The ranks of this fit: MPI's world with the `mpi` feature (one rank without
/// `mpirun`), else one process.
fn communicator() -> Result<Box<dyn Communicator>> {
    #[cfg(feature = "mpi")]
    {
        Ok(Box::new(ekfac::distributed::mpi::MpiCommunicator::init()?))
    }
    #[cfg(not(feature = "mpi"))]
    {
        // Under mpirun, each process would be a whole fit racing to write the outputs.
        if let Some(size) = std::env::var("OMPI_COMM_WORLD_SIZE")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&k| k > 1)
        {
            return Err(Error::Options(format!(
                "started as one of {size} MPI ranks, but this ekfac was built without the \
                 `mpi` feature (cargo build --release --features mpi)"
            )));
        }
        Ok(Box::new(ekfac::distributed::Single))
    }
}

fn run_apply(args: &ApplyArgs, quiet: bool) -> Result<()> {
    if let Some(d) = args.damping {
        check_damping(d)?;
    }
    let budget = args.memory_budget_mib.map(budget_bytes).transpose()?;
    let inputs = [
        ("--state", args.state.as_path()),
        ("--vectors", args.vectors.as_path()),
    ];
    for &(name, path) in &inputs {
        ekfac::io::check_input(path, name, None)?;
    }
    ekfac::io::check_outputs(&inputs, &[("--out", args.out.as_path())])?;
    let state = CurvatureState::load(&args.state)?;
    let approx = if args.kfac {
        Approximation::Kfac
    } else {
        if !state.has_ekfac() {
            return Err(Error::Options(format!(
                "{}: this state was fitted with --fisher forward-only, which has no EKFAC; \
                 pass --kfac",
                args.state.display()
            )));
        }
        Approximation::Ekfac
    };
    let transform = if args.inverse {
        let damping = args.damping.or(state.meta.damping).ok_or_else(|| {
            Error::Options(format!(
                "--inverse needs --damping: {} records no damping",
                args.state.display()
            ))
        })?;
        Transform::Inverse {
            damping,
            mode: args.damping_mode,
        }
    } else {
        Transform::Forward
    };
    let v = MatrixReader::open(&args.vectors, &args.key, "--vectors")?;
    if v.rows() != state.layout.num_params {
        return Err(Error::input(
            args.vectors.display(),
            format!(
                "key `{}` has {} rows (shape {:?}) but the state has {} parameters",
                args.key,
                v.rows(),
                v.shape,
                state.layout.num_params
            ),
        ));
    }
    let ctx = GpuContext::new()?;
    if let Some(bytes) = budget {
        ctx.set_memory_budget(bytes);
    }
    check_eigenvectors(&ctx, &state, &args.state.display().to_string())?;
    let operator = Operator::new(&ctx, &state)?;
    // Columns are read, multiplied and written a chunk at a time: host and GPU memory
    // hold one chunk, however many columns --vectors has.
    let columns = v.cols();
    let chunk = operator.columns_per_chunk(columns);
    let mut out = Outputs::new();
    out.stage_with(&args.out, |file| {
        let writer = MatrixWriter::new(file, &args.out, "out", &v.shape)?;
        for first in (0..columns).step_by(chunk) {
            let count = chunk.min(columns - first);
            let part = v.read_columns(first, count)?;
            let product = operator.apply(&part, count, approx, transform)?;
            writer.write_columns(first, count, &product)?;
        }
        Ok(())
    })?;
    out.commit()?;
    if !quiet {
        println!("wrote {}", args.out.display());
    }
    Ok(())
}

/// Waits `EKFAC_TEST_STALL_BEFORE_COMMIT_MS` milliseconds (if set) between writing the
/// temporary outputs and renaming them, so that tests can interrupt a run there.
fn stall_for_tests() {
    if let Some(ms) = std::env::var("EKFAC_TEST_STALL_BEFORE_COMMIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// On SIGINT or SIGTERM, removes the temporary output files in flight and exits with
/// 128 + the signal's number (the shells' convention).
fn remove_temporaries_on_signals() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return;
    };
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            let removed = ekfac::io::remove_temporaries();
            eprintln!(
                "error: interrupted by signal {signal}; removed {removed} temporary file(s), \
                 no output was replaced"
            );
            std::process::exit(128 + signal);
        }
    });
}

fn main_job(console: &Console, quiet: bool) -> Result<()> {
    // Next to the build's other outputs when run from the repository (`cargo run`),
    // else in the temporary directory.
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let dir = if target.is_dir() {
        target
    } else {
        std::env::temp_dir()
    };
    let report = ekfac::demo::run_digits(Some(&dir.join("digits-spectrum.png")), console)?;
    if !quiet {
        print!("{report}");
    }
    Ok(())
}

/// The output paths, for the closing "wrote …" line.
fn written(outputs: &[(&str, &std::path::Path)]) -> String {
    outputs
        .iter()
        .map(|(_, p)| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
