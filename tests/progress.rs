//! Progress reporting: the library callback's event sequence during a fit, and the
//! command line's three modes (a terminal: live redrawn lines; a pipe: one plain line
//! per pass, no carriage returns or escape codes; `--quiet`: nothing).

mod common;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::Command;

use ekfac::curvature::eigen::{EigenSolver, JacobiSolver};
use ekfac::curvature::fit::{FitRun, fit_run};
use ekfac::curvature::options::FisherType;
use ekfac::ops::jacobi::JacobiPath;
use ekfac::progress::{Event, Stage};

const CASE: &str = "mlp_tanh_ce_mean_type2_sep";

fn fixture_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/curvature")
        .join(case)
}

/// The events of a fit of `case` with `fisher` and `solver`, in order.
fn fit_events(
    ctx: &ekfac::gpu::GpuContext,
    fisher: FisherType,
    solver: &dyn EigenSolver,
) -> (Vec<Event>, usize, usize) {
    let case = common::fixture(CASE);
    let options = ekfac::curvature::Options {
        fisher,
        batch_size: 3,
        ..case.options.clone()
    };
    let events = RefCell::new(Vec::new());
    let record = |e: &Event| events.borrow_mut().push(e.clone());
    let run = FitRun {
        damping: Some(case.damping),
        previous: None,
        solver,
        progress: &record,
    };
    let fitted = fit_run(ctx, &case.model, &case.data, &options, &run).unwrap();
    let factors = fitted
        .state
        .layers
        .iter()
        .map(|l| usize::from(l.input.is_some()) + usize::from(fisher != FisherType::ForwardOnly))
        .sum();
    (events.into_inner(), case.data.len, factors)
}

/// Checks one stage's events at the front of `events`: `Started` with `total`, then
/// `Advanced` with `done` = 1, 2, … ending at `total` (the eigendecomposition may repeat
/// a `done` for its per-sweep events), then `Finished`. Returns the `Advanced` events
/// and the rest.
fn take_stage(events: &[Event], stage: Stage, total: usize) -> (Vec<Event>, &[Event]) {
    assert_eq!(
        events.first(),
        Some(&Event::Started { stage, total }),
        "{events:#?}"
    );
    let end = events
        .iter()
        .position(|e| *e == Event::Finished { stage })
        .unwrap_or_else(|| panic!("no Finished for {stage:?}: {events:#?}"));
    let advanced = events[1..end].to_vec();
    let mut last = 0;
    for e in &advanced {
        let Event::Advanced {
            stage: s,
            done,
            total: t,
            ..
        } = e
        else {
            panic!("expected Advanced events of {stage:?}, found {e:?}");
        };
        assert_eq!((*s, *t), (stage, total));
        let repeats = stage == Stage::Eigendecomposition && *done == last;
        assert!((*done > last || repeats) && *done <= total, "{advanced:#?}");
        last = *done;
    }
    assert_eq!(last, total, "{stage:?} ended at {last} of {total}");
    (advanced, &events[end + 1..])
}

#[test]
fn a_fit_reports_every_stage_in_order() {
    let Some(ctx) = common::gpu() else { return };
    // The blocked path reads the off-diagonal norm back after every sweep, so the
    // eigendecomposition reports each sweep live.
    let blocked = JacobiSolver {
        path: JacobiPath::Blocked,
        ..JacobiSolver::default()
    };
    let (events, n, factors) = fit_events(&ctx, FisherType::Type2, &blocked);
    let batches = n.div_ceil(3);
    let (advanced, rest) = take_stage(&events, Stage::Factors, batches);
    // One event per batch, counting the examples done so far.
    let examples: Vec<usize> = advanced
        .iter()
        .map(|e| match e {
            Event::Advanced { examples, .. } => *examples,
            _ => unreachable!(),
        })
        .collect();
    let want: Vec<usize> = (1..=batches).map(|b| (3 * b).min(n)).collect();
    assert_eq!(examples, want);
    let (advanced, rest) = take_stage(rest, Stage::Eigendecomposition, factors);
    // The per-sweep events of all groups (swept together: `done` still 0, sweeps 1, 2,
    // …), then each group's final event (`done` advanced, its last count; the groups
    // start together, so the largest is the number of per-sweep events).
    let (mut counted, mut live, mut largest) = (0, 0, 0);
    for e in &advanced {
        let Event::Advanced {
            done,
            sweeps: Some(s),
            ..
        } = e
        else {
            panic!("an eigendecomposition event without sweeps: {e:?}");
        };
        assert!(s.off_diagonal.is_finite() && s.off_diagonal >= 0.0, "{s:?}");
        if *done == 0 {
            assert_eq!(s.sweeps, counted + 1, "{advanced:#?}");
            counted += 1;
            live += 1;
        } else {
            assert!(s.sweeps <= counted, "{advanced:#?}");
            largest = largest.max(s.sweeps);
        }
    }
    assert_eq!(largest, counted, "{advanced:#?}");
    assert!(live > 0, "no per-sweep events: {advanced:#?}");
    let (advanced, rest) = take_stage(rest, Stage::Correction, batches);
    assert_eq!(advanced.len(), batches);
    assert!(rest.is_empty(), "events after the correction: {rest:#?}");
}

#[test]
fn forward_only_has_no_correction_pass() {
    let Some(ctx) = common::gpu() else { return };
    let (events, n, factors) = fit_events(&ctx, FisherType::ForwardOnly, &JacobiSolver::default());
    let (_, rest) = take_stage(&events, Stage::Factors, n.div_ceil(3));
    let (_, rest) = take_stage(rest, Stage::Eigendecomposition, factors);
    assert!(rest.is_empty(), "{rest:#?}");
}

/// The `ekfac fit` arguments on the fixture, writing into `dir`.
fn fit_args(dir: &Path) -> Vec<String> {
    let f = fixture_dir(CASE);
    let p = |name: &str| f.join(name).to_string_lossy().into_owned();
    vec![
        "fit".into(),
        "--model".into(),
        p("model.json"),
        "--weights".into(),
        p("weights.safetensors"),
        "--data".into(),
        p("data.safetensors"),
        "--loss".into(),
        "cross_entropy".into(),
        "--batch-size".into(),
        "3".into(),
        "--out".into(),
        dir.join("state.safetensors").to_string_lossy().into_owned(),
    ]
}

/// A child process with a headless environment (no `XDG_RUNTIME_DIR`, no display), so
/// that any foreign lines from the graphics stack would show.
fn ekfac() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ekfac"));
    cmd.env_remove("XDG_RUNTIME_DIR")
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY");
    cmd
}

#[test]
fn piped_stderr_gets_one_plain_line_per_pass() {
    let Some(_ctx) = common::gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = ekfac().args(fit_args(dir.path())).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains('\r') && !err.contains('\x1b'), "{err:?}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "one line per pass expected:\n{err}");
    for (line, pass) in lines
        .iter()
        .zip(["factors:", "eigendecomposition:", "correction:"])
    {
        assert!(line.starts_with(pass), "{line:?} is not the {pass} line");
    }
    assert!(lines[1].contains(" sweep"), "{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("EKFAC"),
        "the summary is missing:\n{stdout}"
    );
    assert!(
        stdout.trim_end().ends_with("state.safetensors"),
        "the run does not end with where it wrote:\n{stdout}"
    );
}

#[test]
fn quiet_prints_nothing_on_success_and_errors_still() {
    let Some(_ctx) = common::gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut args = fit_args(dir.path());
    args.push("--quiet".into());
    let out = ekfac().args(&args).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    assert!(dir.path().join("state.safetensors").exists());

    let missing = dir.path().join("missing.safetensors");
    let data = args.iter().position(|a| a == "--data").unwrap() + 1;
    args[data] = missing.to_string_lossy().into_owned();
    let out = ekfac().args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(
        err.starts_with("error:") && err.contains("missing.safetensors"),
        "{err}"
    );
}

/// Under a pseudo-terminal (`script -q -c`) every pass is a redrawn line.
#[test]
fn a_terminal_gets_live_lines() {
    let Some(_ctx) = common::gpu() else { return };
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIPPING: `script` (util-linux) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let line = std::iter::once(env!("CARGO_BIN_EXE_ekfac").to_string())
        .chain(fit_args(dir.path()))
        .map(|a| quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &format!("{line} >/dev/null"), "/dev/null"])
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains('\r'), "no redrawn lines:\n{text:?}");
    for pass in ["factors", "eigendecomposition", "correction"] {
        assert!(text.contains(pass), "no line for {pass}:\n{text:?}");
    }
    assert!(text.contains("4/4 batches"), "{text:?}");
    assert!(!text.contains("XDG_RUNTIME_DIR"), "{text:?}");
}
