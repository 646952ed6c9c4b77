//! The crate's one error type. Every failure a user can cause (bad model
//! folder, bad image, bad parameter) has its own variant with a message that
//! names the file or field at fault; the HTTP layer maps variants to status
//! codes in exactly one place.

use std::path::PathBuf;

/// Result alias used throughout lumen.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model-folder file is missing, unreadable or inconsistent.
    #[error("model file `{file}`: {message}")]
    ModelFile { file: String, message: String },

    /// The guide image cannot be read or decoded.
    #[error("invalid image: {0}")]
    InvalidImage(String),

    /// The guide image's header announces more pixels than allowed.
    #[error("image is {width}x{height} ({pixels} pixels), over the limit of {limit} pixels")]
    ImageTooLarge {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },

    /// A request or command-line parameter is out of range.
    #[error("invalid parameter `{name}`: {message}")]
    InvalidParameter { name: String, message: String },

    /// A file outside the model folder (input or output) could not be used.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A failure inside the tensor library that no input should cause.
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),

    /// The work was abandoned because nobody waits for its result any more.
    #[error("cancelled: every client of this work has gone")]
    Cancelled,

    /// Anything else that is lumen's own fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn model_file(file: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::ModelFile {
            file: file.into(),
            message: message.to_string(),
        }
    }

    pub fn param(name: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::InvalidParameter {
            name: name.into(),
            message: message.to_string(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
