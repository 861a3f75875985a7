//! Progress of long operations: a fit's passes (factors, eigendecomposition,
//! correction) and influence's (preconditioning the queries, scoring the training set)
//! report [`Event`]s to a [`Progress`] observer, so that an application can draw its
//! own progress. [`Silent`] ignores them; [`Console`] is the command line's: live
//! lines on a terminal (indicatif), one plain line per pass otherwise, or nothing.
//!
//! Every stage reports `Started`, then `Advanced` after each unit of work (a batch of
//! examples, a group of factors decomposed together, a chunk of queries), then
//! `Finished`, in this order; units are counted from 1 to `total`. The
//! eigendecomposition also reports `Advanced` after each sweep of the Jacobi solver
//! (its [`Sweeps`]: the current sweep and off-diagonal norm) with `done` unchanged, so
//! `done` never decreases and ends at `total`.

use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A stage of a long operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The fit's first pass over the data: the Kronecker factors `A` and `G`.
    Factors,
    /// The eigendecomposition of every factor.
    Eigendecomposition,
    /// EKFAC's second pass over the data: the corrected eigenvalues.
    Correction,
    /// Influence: the query gradients and their damped inverse products.
    Preconditioning,
    /// Influence: one pass over the training set, scoring every example.
    Scoring,
}

impl Stage {
    /// The stage's name as printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Factors => "factors",
            Stage::Eigendecomposition => "eigendecomposition",
            Stage::Correction => "correction",
            Stage::Preconditioning => "preconditioning",
            Stage::Scoring => "scoring",
        }
    }

    /// What the stage counts.
    pub fn unit(self) -> &'static str {
        match self {
            Stage::Factors | Stage::Correction | Stage::Scoring => "batches",
            Stage::Eigendecomposition => "factors",
            Stage::Preconditioning => "queries",
        }
    }
}

/// Convergence of an iterative step (the Jacobi eigensolver's).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sweeps {
    /// `n`, the side of the matrices (factors) being decomposed.
    pub dim: usize,
    /// Sweeps run.
    pub sweeps: usize,
    /// `‖offdiag‖_F / ‖A‖_F` after them.
    pub off_diagonal: f64,
}

/// One report of progress.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// `stage` begins with `total` units of work ([`Stage::unit`]).
    Started { stage: Stage, total: usize },
    /// `done` of `total` units of `stage` are finished; `examples` examples (of the
    /// data, or queries) are done so far in this stage (0 where the stage does not
    /// count examples); `sweeps` for the eigendecomposition: of its last group, or of
    /// the group in progress (then `done` repeats the previous event's).
    Advanced {
        stage: Stage,
        done: usize,
        total: usize,
        examples: usize,
        sweeps: Option<Sweeps>,
    },
    /// `stage` is done.
    Finished { stage: Stage },
}

/// An observer of [`Event`]s. Any `Fn(&Event)` is one.
pub trait Progress {
    /// Called for every event, in order, on the thread running the operation.
    fn report(&self, event: &Event);
}

impl<F: Fn(&Event)> Progress for F {
    fn report(&self, event: &Event) {
        self(event)
    }
}

/// Ignores every event.
#[derive(Clone, Copy, Debug, Default)]
pub struct Silent;

impl Progress for Silent {
    fn report(&self, _: &Event) {}
}

/// How [`Console`] shows progress on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleMode {
    /// One live line per stage, redrawn in place (indicatif).
    Live,
    /// One plain line per stage when it finishes: no carriage returns, no escape codes.
    Plain,
    /// Nothing.
    Quiet,
}

impl ConsoleMode {
    /// [`ConsoleMode::Quiet`] when `quiet`, else [`ConsoleMode::Live`] when stderr is a
    /// terminal and [`ConsoleMode::Plain`] otherwise.
    pub fn detect(quiet: bool) -> Self {
        if quiet {
            ConsoleMode::Quiet
        } else if std::io::stderr().is_terminal() {
            ConsoleMode::Live
        } else {
            ConsoleMode::Plain
        }
    }
}

/// The command line's progress on stderr, in a [`ConsoleMode`].
pub struct Console {
    mode: ConsoleMode,
    current: RefCell<Option<Running>>,
}

/// The stage being shown.
struct Running {
    bar: Option<ProgressBar>,
    started: Instant,
    last: Option<Event>,
}

impl Console {
    pub fn new(mode: ConsoleMode) -> Self {
        Self {
            mode,
            current: RefCell::new(None),
        }
    }

    /// The message after the counter: examples per second, or the eigensolver's sweeps.
    fn detail(event: &Event, elapsed: Duration) -> String {
        match event {
            Event::Advanced {
                examples, sweeps, ..
            } => {
                let mut parts = Vec::new();
                if *examples > 0 {
                    let rate = *examples as f64 / elapsed.as_secs_f64().max(1e-9);
                    parts.push(format!("{examples} examples, {rate:.0}/s"));
                }
                if let Some(s) = sweeps {
                    let plural = if s.sweeps == 1 { "" } else { "s" };
                    parts.push(format!(
                        "n = {}: {} sweep{plural}, off-diagonal {:.1e}",
                        s.dim, s.sweeps, s.off_diagonal
                    ));
                }
                parts.join(", ")
            }
            _ => String::new(),
        }
    }
}

impl Progress for Console {
    fn report(&self, event: &Event) {
        if self.mode == ConsoleMode::Quiet {
            return;
        }
        let mut current = self.current.borrow_mut();
        match event {
            Event::Started { stage, total } => {
                let bar = (self.mode == ConsoleMode::Live).then(|| {
                    let bar = ProgressBar::with_draw_target(
                        Some(*total as u64),
                        ProgressDrawTarget::stderr(),
                    );
                    bar.set_style(
                        ProgressStyle::with_template(&format!(
                            "{{prefix:>18}} [{{bar:24}}] {{pos}}/{{len}} {} {{msg}} \
                             (elapsed {{elapsed}}, ETA {{eta}})",
                            stage.unit()
                        ))
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    bar.set_prefix(stage.as_str());
                    bar.enable_steady_tick(Duration::from_millis(250));
                    bar
                });
                *current = Some(Running {
                    bar,
                    started: Instant::now(),
                    last: None,
                });
            }
            Event::Advanced { done, .. } => {
                if let Some(running) = current.as_mut() {
                    if let Some(bar) = &running.bar {
                        bar.set_position(*done as u64);
                        bar.set_message(Self::detail(event, running.started.elapsed()));
                    }
                    running.last = Some(event.clone());
                }
            }
            Event::Finished { stage } => {
                let Some(running) = current.take() else {
                    return;
                };
                let elapsed = running.started.elapsed();
                match running.bar {
                    Some(bar) => bar.finish(),
                    None => {
                        let (done, detail) = match &running.last {
                            Some(e @ Event::Advanced { done, .. }) => {
                                (*done, Self::detail(e, elapsed))
                            }
                            _ => (0, String::new()),
                        };
                        let detail = if detail.is_empty() {
                            String::new()
                        } else {
                            format!(", {detail}")
                        };
                        let mut err = std::io::stderr().lock();
                        // Progress is best effort: a closed stderr must not fail the run.
                        let _ = writeln!(
                            err,
                            "{}: {done} {}{detail} in {:.2} s",
                            stage.as_str(),
                            stage.unit(),
                            elapsed.as_secs_f64()
                        );
                    }
                }
            }
        }
    }
}

/// Keeps Mesa's Vulkan device-selection layer from probing a Wayland display that
/// cannot exist: with `XDG_RUNTIME_DIR` unset (or not a directory) and no `DISPLAY`
/// or `WAYLAND_DISPLAY`, the layer's `wl_display_connect` makes libwayland print
/// `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` on stderr (twice,
/// once per instance), although nothing is wrong. Sets `NODEVICE_SELECT=1` (the
/// layer's own switch) then, unless the user set it or asked the layer for a device
/// (`MESA_VK_DEVICE_SELECT`, `DRI_PRIME`); the layer only orders adapters by the
/// display's, and there is none. Our own errors are untouched.
///
/// # Safety
///
/// Sets an environment variable: call it at the start of `main`, before any other
/// thread exists.
pub unsafe fn quiet_headless_vulkan() {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    let runtime_dir_ok =
        std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| std::path::Path::new(&d).is_dir());
    if cfg!(target_os = "linux")
        && !runtime_dir_ok
        && !set("DISPLAY")
        && !set("WAYLAND_DISPLAY")
        && !set("NODEVICE_SELECT")
        && !set("MESA_VK_DEVICE_SELECT")
        && !set("DRI_PRIME")
    {
        // SAFETY: the caller guarantees that no other thread runs.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}
