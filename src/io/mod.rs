//! Files in and out, for the loaders and the command line.
//!
//! **Inputs** are read only from regular files (following symbolic links), checked with
//! `stat` before they are opened, so a FIFO, a device such as `/dev/zero` or
//! `/dev/urandom`, a socket or a directory is refused at once instead of blocking or
//! being read without end; JSON is read up to [`MAX_JSON_BYTES`].
//!
//! **Outputs** go through [`Outputs`]: each is written to a temporary file beside its
//! path, and all are renamed into place only when every one of them was written, so a
//! failure leaves every output path as it was. [`check_outputs`] refuses, before any
//! work, an output that is the same file as an input or as another output (same
//! canonical path, or same device and inode), and an existing output that is not a
//! regular file or that we may not write. New files get the mode `0666` less the umask.
//! Temporary files are registered so that a signal handler can remove them
//! ([`remove_temporaries`]).

use std::fs::{File, Metadata, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};
mod matrix;
pub use matrix::*;

/// The largest JSON file (a model description) read: 64 MiB.
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// How many items of a list a message shows before "… and N more".
pub const LIST_ITEMS_SHOWN: usize = 10;

/// Formats `items` as a list for a message, cut after [`LIST_ITEMS_SHOWN`] items with
/// "… and N more" (N with thousands separators).
pub fn cut_list<T: std::fmt::Debug>(items: &[T]) -> String {
    let shown: Vec<String> = items
        .iter()
        .take(LIST_ITEMS_SHOWN)
        .map(|i| format!("{i:?}"))
        .collect();
    let rest = items.len().saturating_sub(LIST_ITEMS_SHOWN);
    if rest == 0 {
        format!("[{}]", shown.join(", "))
    } else {
        format!("[{}, … and {} more]", shown.join(", "), thousands(rest))
    }
}

/// Like [`cut_list`] for names shown as they are: `a, b, c, … and N more`.
pub fn cut_names<S: AsRef<str>>(names: &[S]) -> String {
    let mut out: Vec<&str> = names
        .iter()
        .take(LIST_ITEMS_SHOWN)
        .map(AsRef::as_ref)
        .collect();
    let rest = names.len().saturating_sub(LIST_ITEMS_SHOWN);
    let more = format!("… and {} more", thousands(rest));
    if rest > 0 {
        out.push(&more);
    }
    out.join(", ")
}

/// `n` with a comma every three digits (`299990` → `299,990`).
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// What a file-system object is, in words.
fn kind_of(meta: &Metadata) -> &'static str {
    let ft = meta.file_type();
    if ft.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// Checks, without opening it, that `path` is a regular file (symbolic links followed)
/// of at most `max_bytes` bytes; returns its size. `what` says what the file is for
/// (an option such as `--model`).
pub fn check_input(path: &Path, what: &str, max_bytes: Option<u64>) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::input(
            path.display(),
            format!("{what} must be a regular file, found {}", kind_of(&meta)),
        ));
    }
    if let Some(max) = max_bytes
        && meta.len() > max
    {
        return Err(Error::input(
            path.display(),
            format!(
                "{what} is {} bytes, more than the limit of {} bytes",
                thousands(meta.len() as usize),
                thousands(max as usize)
            ),
        ));
    }
    Ok(meta.len())
}

/// Checks, without opening anything, that the data option `name` (`--data`,
/// `--train`, `--query`) is a regular file or a directory (of shards: see
/// [`crate::data::ShardDirectory`]), and that no output would land in that directory
/// as a `*.safetensors` file (it would be read as a shard next time).
pub fn check_data_input(path: &Path, name: &str, outputs: &[(&str, &Path)]) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_dir() {
        check_input(path, name, None)?;
        return Ok(());
    }
    let dir = path.canonicalize().map_err(|e| Error::io(path, e))?;
    for &(out_name, out) in outputs {
        let inside = canonical(out)
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .is_some_and(|parent| parent == dir);
        if inside && out.extension().is_some_and(|e| e == "safetensors") {
            return Err(Error::Options(format!(
                "{out_name} {} is inside the {name} directory {}, where it would be read as a \
                 data shard; write it elsewhere",
                out.display(),
                path.display()
            )));
        }
    }
    Ok(())
}

/// Opens `path` for reading without blocking (a FIFO swapped in after the check cannot
/// stall the open) and checks the opened file is still regular.
pub fn open_regular(path: &Path, what: &str) -> Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::input(
            path.display(),
            format!("{what} must be a regular file, found {}", kind_of(&meta)),
        ));
    }
    Ok(file)
}

/// Reads the regular file `path` whole, at most `max_bytes` bytes (a file that grows
/// past the limit while it is read is an error too). Anything but a regular file is
/// refused before it is opened.
pub fn read_input(path: &Path, what: &str, max_bytes: Option<u64>) -> Result<Vec<u8>> {
    let size = check_input(path, what, max_bytes)?;
    let file = open_regular(path, what)?;
    let limit = max_bytes.unwrap_or(u64::MAX);
    let mut bytes = Vec::with_capacity(usize::try_from(size.min(limit)).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::input(
            path.display(),
            format!(
                "{what} grew past the limit of {} bytes while it was read",
                thousands(limit as usize)
            ),
        ));
    }
    Ok(bytes)
}

/// Reads a UTF-8 text file of at most [`MAX_JSON_BYTES`] (see [`read_input`]).
pub fn read_json_text(path: &Path, what: &str) -> Result<String> {
    let bytes = read_input(path, what, Some(MAX_JSON_BYTES))?;
    String::from_utf8(bytes).map_err(|e| {
        Error::input(
            path.display(),
            format!(
                "{what} is not UTF-8 text (byte {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// `path` with its directory resolved (symbolic links, `..`), for comparing paths that
/// may not exist yet.
fn canonical(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = path.canonicalize() {
        return Some(p);
    }
    let name = path.file_name()?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Some(dir.canonicalize().ok()?.join(name))
}

/// Device and inode of an existing file (symbolic links followed).
fn file_id(path: &Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    if let (Some(x), Some(y)) = (file_id(a), file_id(b))
        && x == y
    {
        return true;
    }
    matches!((canonical(a), canonical(b)), (Some(x), Some(y)) if x == y)
}

/// Checks, before any work, that the outputs can be written without destroying
/// anything: no output is the same file as an input or another output, and every
/// existing output is a regular file we may write. Each entry is (option, path).
pub fn check_outputs(inputs: &[(&str, &Path)], outputs: &[(&str, &Path)]) -> Result<()> {
    for (i, &(name, path)) in outputs.iter().enumerate() {
        for &(other, input) in inputs {
            if same_file(path, input) {
                return Err(Error::Options(format!(
                    "{name} {} is the same file as the input {other} {}; refusing to \
                     overwrite an input",
                    path.display(),
                    input.display()
                )));
            }
        }
        for &(other, earlier) in &outputs[..i] {
            if same_file(path, earlier) {
                return Err(Error::Options(format!(
                    "{name} {} and {other} {} are the same file; give each output its own \
                     path",
                    path.display(),
                    earlier.display()
                )));
            }
        }
        check_replaceable(name, path)?;
    }
    Ok(())
}

/// An existing `path` must be a regular file with a write permission bit that the OS
/// lets us write (symbolic links followed); a missing one needs an existing directory.
fn check_replaceable(name: &str, path: &Path) -> Result<()> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            return match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => Ok(()),
                Ok(m) => Err(Error::input(
                    dir.display(),
                    format!("the directory of {name} is {}", kind_of(&m)),
                )),
                Err(e) => Err(Error::input(
                    dir.display(),
                    format!("the directory of {name} cannot be used: {e}"),
                )),
            };
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    if !meta.is_file() {
        return Err(Error::input(
            path.display(),
            format!(
                "{name} exists and is {}; refusing to replace what is not a regular file",
                kind_of(&meta)
            ),
        ));
    }
    if meta.permissions().readonly() {
        return Err(Error::input(
            path.display(),
            format!("{name} exists and is read-only (no write permission); refusing to replace it"),
        ));
    }
    // Opening for writing (without truncating) asks the OS whether we may write it,
    // whoever owns it; nothing is changed.
    let mut options = OpenOptions::new();
    options.write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    if let Err(e) = options.open(path) {
        return Err(Error::input(
            path.display(),
            format!("{name} exists and is read-only for us ({e}); refusing to replace it"),
        ));
    }
    Ok(())
}

/// Temporary files in flight, removed by [`remove_temporaries`]; the lock is held
/// while outputs are renamed into place, so a signal handler that takes it waits for
/// the renames to finish.
static TEMPORARIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn temporaries() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes every temporary output file still in flight and returns how many it
/// removed; for a handler of SIGINT and SIGTERM, which then exits.
/// Holds the registry's lock until the process exits, so no rename starts after it.
pub fn remove_temporaries() -> usize {
    let mut list = temporaries();
    let mut removed = 0;
    for p in list.drain(..) {
        if std::fs::remove_file(&p).is_ok() {
            removed += 1;
        }
    }
    std::mem::forget(list);
    removed
}

/// Output files written all or nothing: [`Outputs::stage`] writes each to a temporary
/// file beside its path; [`Outputs::commit`] renames them all into place. Dropped
/// without a commit (an error), it removes the temporaries and leaves every path as
/// it was.
#[derive(Default)]
pub struct Outputs {
    staged: Vec<(PathBuf, tempfile::TempPath)>,
}

impl Outputs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `bytes` to a temporary file in `path`'s directory (mode `0666` less the
    /// umask), synced to disk.
    pub fn stage(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        self.stage_with(path, |mut file| {
            file.write_all(bytes).map_err(|e| Error::io(path, e))
        })
    }

    /// Creates a temporary file beside `path` (mode `0666` less the umask), lets `write`
    /// fill it, and syncs it to disk.
    pub fn stage_with(
        &mut self,
        path: &Path,
        write: impl FnOnce(&File) -> Result<()>,
    ) -> Result<()> {
        check_replaceable("the output", path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut builder = tempfile::Builder::new();
        builder.prefix(".ekfac-").suffix(".tmp");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(std::fs::Permissions::from_mode(0o666));
        }
        let mut list = temporaries();
        let tmp = builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
        list.push(tmp.path().to_path_buf());
        drop(list);
        let written = write(tmp.as_file()).and_then(|()| {
            tmp.as_file()
                .sync_all()
                .map_err(|e| Error::io(tmp.path(), e))
        });
        self.staged.push((path.to_path_buf(), tmp.into_temp_path()));
        written
    }

    /// Renames every staged file into place.
    pub fn commit(mut self) -> Result<()> {
        let mut list = temporaries();
        let staged = std::mem::take(&mut self.staged);
        list.retain(|p| staged.iter().all(|(_, tmp)| p.as_path() != &**tmp));
        // A failed rename drops the remaining temporaries, which removes their files.
        for (path, tmp) in staged {
            tmp.persist(path.as_path())
                .map_err(|e| Error::io(path.as_path(), e.error))?;
        }
        Ok(())
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        let mut list = temporaries();
        for (_, tmp) in &self.staged {
            list.retain(|p| p.as_path() != &**tmp);
        }
        // The TempPaths remove their files as they drop.
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a
/// rename, so a failure never leaves a partial file at `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut out = Outputs::new();
    out.stage(path, bytes)?;
    out.commit()
}
