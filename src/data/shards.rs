//! A directory of safetensors shards read as one data set: every `*.safetensors` file
//! in it (hidden files excepted), in file-name order, each a [`MappedFile`] with `x`
//! and `y` of the same dtypes and per-example shapes. A read may span shards; the
//! examples are exactly those of the shards concatenated.

use std::path::Path;

use super::{DataSource, InputDtype, MappedFile, TargetKind, TargetsMut};
use crate::error::{Error, Result};

/// Shards `files` with `starts[i]` the index of the first example of `files[i]`.
pub struct ShardDirectory {
    label: String,
    files: Vec<MappedFile>,
    /// `files.len() + 1` entries; the last is `N`.
    starts: Vec<usize>,
}

impl ShardDirectory {
    /// Opens every `*.safetensors` shard of the directory `path` (see the module docs).
    /// A shard that is not a regular file, a directory without shards, and shards that
    /// disagree in dtype or per-example shape are errors naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let label = path.display().to_string();
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
            let entry = entry.map_err(|e| Error::io(path, e))?;
            let name = entry.file_name();
            let text = name.to_string_lossy();
            if text.starts_with('.') || !text.ends_with(".safetensors") {
                continue;
            }
            names.push(name);
        }
        names.sort();
        if names.is_empty() {
            return Err(Error::input(
                &label,
                "--data is a directory without any *.safetensors shard",
            ));
        }
        let mut files: Vec<MappedFile> = Vec::with_capacity(names.len());
        let mut starts = vec![0];
        for name in names {
            let shard = MappedFile::open(&path.join(&name), "a data shard in --data")?;
            if let Some(first) = files.first()
                && first.layout() != shard.layout()
            {
                let describe = |f: &MappedFile| {
                    let (xd, xs, yd, ys) = f.layout();
                    format!("x {xd:?} [N, {}], y {yd:?} [N{}]", join(xs), prefixed(ys))
                };
                return Err(Error::input(
                    shard.label(),
                    format!(
                        "this shard has {} but the first shard {} has {}; every shard of a \
                         data directory must have the same dtypes and per-example shapes",
                        describe(&shard),
                        first.label(),
                        describe(first)
                    ),
                ));
            }
            let end = starts.last().expect("starts begins with 0") + shard.len();
            starts.push(end);
            files.push(shard);
        }
        Ok(Self {
            label,
            files,
            starts,
        })
    }

    /// The shard holding example `index` (`< N`).
    fn shard_of(&self, index: usize) -> usize {
        self.starts.partition_point(|&s| s <= index) - 1
    }

    /// The shards, in reading order.
    pub fn shards(&self) -> &[MappedFile] {
        &self.files
    }
}

fn join(dims: &[usize]) -> String {
    dims.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn prefixed(dims: &[usize]) -> String {
    dims.iter().map(|d| format!(", {d}")).collect()
}

impl DataSource for ShardDirectory {
    fn label(&self) -> &str {
        &self.label
    }

    fn len(&self) -> usize {
        *self.starts.last().expect("starts begins with 0")
    }

    fn example_shape(&self) -> &[usize] {
        self.files[0].example_shape()
    }

    fn input_dtype(&self) -> InputDtype {
        self.files[0].input_dtype()
    }

    fn targets(&self) -> TargetKind {
        self.files[0].targets()
    }

    fn read(&self, start: usize, end: usize, x: &mut [u32], y: TargetsMut<'_>) -> Result<()> {
        let e = self.example_len();
        let per = self.targets().per_example();
        let mut y = y;
        let mut at = start;
        while at < end {
            let s = self.shard_of(at);
            let stop = end.min(self.starts[s + 1]);
            let (lo, hi) = (at - start, stop - start);
            let part = match &mut y {
                TargetsMut::Classes(c) => TargetsMut::Classes(&mut c[lo..hi]),
                TargetsMut::Values(v) => TargetsMut::Values(&mut v[lo * per..hi * per]),
            };
            let first = self.starts[s];
            self.files[s]
                .read(at - first, stop - first, &mut x[lo * e..hi * e], part)
                .map_err(|err| match err {
                    Error::Input { file, message } => Error::input(
                        file,
                        format!(
                            "{message} (indices within the shard, whose example 0 is example \
                             {first} of the directory)"
                        ),
                    ),
                    other => other,
                })?;
            at = stop;
        }
        Ok(())
    }

    fn locate(&self, index: usize) -> String {
        let s = self.shard_of(index);
        format!(
            "{} (example {} of the shard; example {index} of the directory)",
            self.files[s].label(),
            index - self.starts[s]
        )
    }
}
