//! Tests that measure a whole process (peak resident set, resource limits) run in a
//! child process: the test binary re-run on one of its ignored tests, which prints a
//! line `usage <n> <n> …` for the parent.

use std::ffi::OsStr;
use std::process::Command;

/// The field `name` (e.g. `"VmHWM:"`, the peak resident set) of `/proc/self/status`,
/// KiB; `None` where there is no such file (not Linux).
pub fn proc_status_kib(name: &str) -> Option<u64> {
    process_status_kib("self", name)
}

/// The field `name` of `/proc/<process>/status` (`process` a pid or `"self"`), KiB;
/// `None` where there is no such file or field (not Linux, a process that has exited).
pub fn process_status_kib(process: &str, name: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(name))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs the ignored test `name` of this test binary in a child process with the
/// environment variable `var` set to `value`, checks that it succeeded (else panics
/// with `what` and the child's output), and returns the numbers of its `usage` line
/// and its stderr.
pub fn run_child(
    name: &str,
    var: &str,
    value: impl AsRef<OsStr>,
    what: &str,
) -> (Vec<u64>, String) {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", name, "--nocapture"])
        .env(var, value)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{what} failed: {stdout}{stderr}");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("usage "))
        .unwrap_or_else(|| panic!("the child printed no usage: {stdout}"));
    let usage = line
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    (usage, stderr)
}
