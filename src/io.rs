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

use std::collections::HashMap;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::model::TensorFile;

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
            format!(
                "{what} must be a regular file, found {}{}",
                kind_of(&meta),
                if meta.is_dir() && what == "--data" {
                    " (directories of data shards are not read yet)"
                } else {
                    ""
                }
            ),
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

/// A row-major f32 matrix read from a safetensors file.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    /// The stored shape: `[rows]` or `[rows, cols]`.
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Matrix {
    /// Number of rows (the first dimension).
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    /// Number of columns (1 for a vector).
    pub fn cols(&self) -> usize {
        self.shape.get(1).copied().unwrap_or(1)
    }
}

/// Reads the `[P, K]` or `[P]` tensor `key` (F32 or F64, converted to f32) from a parsed
/// safetensors file; other keys are ignored. Non-finite values are errors.
pub fn matrix_from(file: &TensorFile, key: &str) -> Result<Matrix> {
    let t = file.require(key, "the [P, K] matrix to multiply")?;
    let shape = t.shape.to_vec();
    if shape.is_empty() || shape.len() > 2 {
        return Err(t.err(format!(
            "expected a [P] or [P, K] tensor, found shape {shape:?}"
        )));
    }
    let data = match t.dtype {
        safetensors::Dtype::F32 | safetensors::Dtype::F64 => t.to_f32()?,
        other => return Err(t.err(format!("expected F32 or F64, found {other:?}"))),
    };
    Ok(Matrix { shape, data })
}

/// Reads the `[P]` or `[P, K]` tensor `key` from the safetensors file at `path` (see
/// [`matrix_from`]).
pub fn read_matrix(path: &Path, key: &str) -> Result<Matrix> {
    matrix_from(&TensorFile::load(path)?, key)
}

/// The bytes of a safetensors file of `tensors` (name, shape, f32 data) and optional
/// string metadata; `path` names the output in errors.
pub fn tensor_bytes(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(data),
            )
            .map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::input(path.display(), format!("building the output: {e}")))?;
    safetensors::serialize(views, metadata)
        .map_err(|e| Error::input(path.display(), format!("serialising: {e}")))
}

/// Writes `tensors` (name, shape, f32 data) and optional string metadata as a
/// safetensors file, atomically.
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    write_atomic(path, &tensor_bytes(path, tensors, metadata)?)
}

/// The `[P]` or `[P, K]` F32 or F64 tensor `key` of a safetensors file, read a block of
/// columns at a time with positioned reads, so that a product over many columns needs
/// host memory for one block only. Values are checked as they are read: finite, and
/// from F64 within f32's range; errors name the file, the key and the index.
pub struct MatrixReader {
    file: File,
    label: String,
    key: String,
    /// The stored shape: `[rows]` or `[rows, cols]`.
    pub shape: Vec<usize>,
    f64: bool,
    /// File offset of the tensor's first byte.
    start: u64,
}

/// Bytes read at once when a block of columns is gathered (whole rows at a time).
const READ_BLOCK_BYTES: usize = 8 << 20;

impl MatrixReader {
    /// Opens `path` (a regular file; only its header is read) and finds `key`.
    pub fn open(path: &Path, key: &str, what: &str) -> Result<Self> {
        let (file, header) = crate::model::tensor_file::Header::read(path, what)?;
        let label = path.display().to_string();
        let info = header.tensors.get(key).ok_or_else(|| {
            let keys: Vec<&String> = header.tensors.keys().collect();
            Error::input(
                &label,
                format!(
                    "missing key \"{key}\" (the [P, K] matrix to multiply); the file has {}",
                    if keys.is_empty() {
                        "no tensors".to_string()
                    } else {
                        format!("keys {}", cut_list(&keys))
                    }
                ),
            )
        })?;
        let fail = |msg: String| Error::input(&label, format!("\"{key}\": {msg}"));
        if info.shape.is_empty() || info.shape.len() > 2 {
            return Err(fail(format!(
                "expected a [P] or [P, K] tensor, found shape {:?}",
                info.shape
            )));
        }
        let f64 = match info.dtype {
            safetensors::Dtype::F32 => false,
            safetensors::Dtype::F64 => true,
            other => return Err(fail(format!("expected F32 or F64, found {other:?}"))),
        };
        Ok(Self {
            file,
            key: key.to_string(),
            shape: info.shape.clone(),
            f64,
            start: header.data_start + info.data_offsets.0 as u64,
            label,
        })
    }

    /// Number of rows `P`.
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    /// Number of columns `K` (1 for a vector).
    pub fn cols(&self) -> usize {
        self.shape.get(1).copied().unwrap_or(1)
    }

    /// Columns `first .. first + count` as a row-major `[P, count]` f32 matrix.
    pub fn read_columns(&self, first: usize, count: usize) -> Result<Vec<f32>> {
        #[cfg(unix)]
        use std::os::unix::fs::FileExt;
        let (rows, cols) = (self.rows(), self.cols());
        let width = if self.f64 { 8 } else { 4 };
        let row_bytes = cols * width;
        // All columns: whole rows, many at a time. Some columns: just their range of
        // each row (one positioned read per row).
        let (rows_per_read, read_bytes, skip) = if count == cols {
            ((READ_BLOCK_BYTES / row_bytes.max(1)).max(1), row_bytes, 0)
        } else {
            (1, count * width, first * width)
        };
        let mut out = Vec::with_capacity(rows * count);
        let mut buf = Vec::new();
        for block_start in (0..rows).step_by(rows_per_read) {
            let n = rows_per_read.min(rows - block_start);
            buf.resize(n * read_bytes, 0);
            let offset = self.start + (block_start * row_bytes + skip) as u64;
            #[cfg(unix)]
            self.file
                .read_exact_at(&mut buf, offset)
                .map_err(|e| Error::io(&self.label, e))?;
            #[cfg(not(unix))]
            {
                use std::io::{Seek, SeekFrom};
                let mut f = &self.file;
                f.seek(SeekFrom::Start(offset))
                    .and_then(|_| f.read_exact(&mut buf))
                    .map_err(|e| Error::io(&self.label, e))?;
            }
            for (r, row) in buf.chunks_exact(read_bytes).enumerate() {
                for c in first..first + count {
                    let at = c * width - skip;
                    let bytes = &row[at..at + width];
                    let (value, wide) = if self.f64 {
                        let v = f64::from_le_bytes(bytes.try_into().expect("8 bytes"));
                        (v as f32, v)
                    } else {
                        let v = f32::from_le_bytes(bytes.try_into().expect("4 bytes"));
                        (v, f64::from(v))
                    };
                    if !value.is_finite() {
                        let index = if self.shape.len() == 1 {
                            format!("{}[{}]", self.key, block_start + r)
                        } else {
                            format!("{}[{}, {c}]", self.key, block_start + r)
                        };
                        let msg = if wide.is_finite() {
                            format!("{index} = {wide:e} overflows f32 (largest {:e})", f32::MAX)
                        } else {
                            format!("{index} is {wide} (values must be finite)")
                        };
                        return Err(Error::input(
                            &self.label,
                            format!("\"{}\": {msg}", self.key),
                        ));
                    }
                    out.push(value);
                }
            }
        }
        Ok(out)
    }
}

/// A `[P]` or `[P, K]` F32 safetensors file with one tensor, written a block of
/// columns at a time with positioned writes into a staged output file.
pub struct MatrixWriter<'a> {
    file: &'a File,
    path: PathBuf,
    cols: usize,
    start: u64,
}

impl<'a> MatrixWriter<'a> {
    /// Writes the header of a file holding `key` of `shape` (F32) into `file` and sizes
    /// it; the values follow by [`Self::write_columns`].
    pub fn new(file: &'a File, path: &Path, key: &str, shape: &[usize]) -> Result<Self> {
        #[cfg(unix)]
        use std::os::unix::fs::FileExt;
        let count: usize = shape.iter().product();
        let header = serde_json::json!({
            key: {"dtype": "F32", "shape": shape, "data_offsets": [0, count * 4]}
        });
        let mut text = header.to_string().into_bytes();
        text.resize(text.len().next_multiple_of(8), b' ');
        let mut prefix = (text.len() as u64).to_le_bytes().to_vec();
        prefix.extend_from_slice(&text);
        let start = prefix.len() as u64;
        let io = |e| Error::io(path, e);
        file.set_len(start + 4 * count as u64).map_err(io)?;
        #[cfg(unix)]
        file.write_all_at(&prefix, 0).map_err(io)?;
        #[cfg(not(unix))]
        {
            use std::io::{Seek, SeekFrom};
            let mut f = file;
            f.seek(SeekFrom::Start(0))
                .and_then(|_| f.write_all(&prefix))
                .map_err(io)?;
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            cols: shape.get(1).copied().unwrap_or(1),
            start,
        })
    }

    /// Writes columns `first .. first + count` from the row-major `[P, count]` `values`.
    pub fn write_columns(&self, first: usize, count: usize, values: &[f32]) -> Result<()> {
        #[cfg(unix)]
        use std::os::unix::fs::FileExt;
        let io = |e| Error::io(&self.path, e);
        let bytes: &[u8] = bytemuck::cast_slice(values);
        let write_at = |data: &[u8], offset: u64| -> std::io::Result<()> {
            #[cfg(unix)]
            {
                self.file.write_all_at(data, offset)
            }
            #[cfg(not(unix))]
            {
                use std::io::{Seek, SeekFrom};
                let mut f = self.file;
                f.seek(SeekFrom::Start(offset))?;
                f.write_all(data)
            }
        };
        if count == self.cols {
            return write_at(bytes, self.start + (first * 4) as u64).map_err(io);
        }
        for (row, values) in bytes.chunks_exact(count * 4).enumerate() {
            write_at(values, self.start + ((row * self.cols + first) * 4) as u64).map_err(io)?;
        }
        Ok(())
    }
}
