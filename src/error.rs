//! The crate's one error type.

use std::path::PathBuf;

/// Every failure the crate reports. Messages name the file, key or layer involved and,
/// where it applies, what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No adapter could be found or opened.
    #[error(
        "no GPU adapter available: {0}\n  install a GPU driver, or on a headless Linux box the \
         software Vulkan driver (`apt-get install mesa-vulkan-drivers libvulkan1`, then \
         `WGPU_BACKEND=vulkan`)"
    )]
    NoAdapter(String),
    /// A shader, validation, out-of-memory or device-lost failure reported by wgpu.
    #[error("GPU error during {context}: {message}")]
    Gpu { context: String, message: String },
    /// An input file (model, weights, data, vectors, state) is malformed.
    #[error("{file}: {message}")]
    Input { file: String, message: String },
    /// The model description is inconsistent.
    #[error("model: layer {layer}: {message}")]
    Model { layer: String, message: String },
    /// Options that curvlinops would reject, or that do not fit the model or data.
    #[error("invalid options: {0}")]
    Options(String),
    /// A requested computation does not fit into the memory the crate may use.
    #[error("out of memory budget: {0}")]
    Memory(String),
    /// A rank of a distributed fit failed (every rank reports the first failure).
    #[error("rank {rank} of {size}: {message}")]
    Distributed {
        rank: usize,
        size: usize,
        message: String,
    },
    /// File-system failure.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// An [`Error::Input`] for `file`.
    pub fn input(file: impl std::fmt::Display, message: impl Into<String>) -> Self {
        Error::Input {
            file: file.to_string(),
            message: message.into(),
        }
    }

    /// An [`Error::Model`] for the layer called `layer`.
    pub fn model(layer: impl std::fmt::Display, message: impl Into<String>) -> Self {
        Error::Model {
            layer: layer.to_string(),
            message: message.into(),
        }
    }

    /// An [`Error::Gpu`] raised while doing `context`.
    pub fn gpu(context: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::Gpu {
            context: context.into(),
            message: message.to_string(),
        }
    }

    /// An [`Error::Io`] on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
