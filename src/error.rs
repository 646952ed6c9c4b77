//! The crate's one error type. Every failure a user can cause (bad model
//! folder, bad image, bad request, bad parameter) has its own variant with a
//! message that names the file or field at fault; the HTTP layer maps
//! variants to status codes in exactly one place (`server::error`).
//!
//! The error is `Clone` (its foreign sources are shared behind `Arc`), so
//! when one batch fails, every job that waited on it learns the real cause.
//!
//! Two variants describe a request the caller got wrong, by one rule:
//! - [`Error::InvalidRequest`]: the body does not read as the request at all
//!   (not JSON or multipart, not an object, a field of the wrong type, an
//!   unknown or repeated field);
//! - [`Error::InvalidParameter`]: it reads, but a value is not allowed (out
//!   of range, not one of the choices, missing, or in conflict with another
//!   field).

use std::path::PathBuf;
use std::sync::Arc;

/// Result alias used throughout lumen.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// A model-folder file is missing, unreadable or inconsistent. `file` is
    /// the file's full name as [`crate::model_folder::ModelSource::path`]
    /// gives it (`DIR/unet/config.json`, `embedded:models/shapes/pca.safetensors`).
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

    /// The request does not have the request's shape (see the module docs).
    #[error("invalid request field `{field}`: {message}")]
    InvalidRequest { field: String, message: String },

    /// A request or command-line value is not allowed (see the module docs).
    #[error("invalid parameter `{name}`: {message}")]
    InvalidParameter { name: String, message: String },

    /// A file outside the model folder (input or output) could not be used.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },

    /// A failure inside the tensor library that no input should cause.
    #[error("tensor computation failed: {0}")]
    Tensor(#[source] Arc<candle_core::Error>),

    /// Every place in the queue is taken.
    #[error("the queue is full ({capacity} requests waiting or running)")]
    Overloaded { capacity: usize },

    /// The service is stopping and takes no new work.
    #[error("the server is shutting down")]
    ShuttingDown,

    /// The work was cancelled (`DELETE /jobs/{id}`), or nobody waits for
    /// its result any more.
    #[error("cancelled: the job was cancelled or its client has gone")]
    Cancelled,

    /// The work did not finish within the request timeout; it was stopped
    /// at the next denoising step.
    #[error("the request did not finish within {seconds} s")]
    DeadlineExceeded { seconds: u64 },

    /// The request would not finish within the request timeout on this
    /// device (estimated before it is admitted).
    #[error("{message}")]
    OverBudget {
        estimate_s: f64,
        budget_s: f64,
        message: String,
    },

    /// A batch job stopped on a signal (SIGINT, SIGTERM) after recording
    /// what was in flight; a rerun of the same command continues it.
    #[error("stopped by {}: a rerun of the same command continues", crate::jobs::interrupt::signal_name(*.signal))]
    Interrupted { signal: i32 },

    /// The device failed in a way that poisons its context (an illegal
    /// address, a kernel fault): every later call on it would fail too. The
    /// server turns not ready and exits non-zero so that it is replaced.
    #[error(
        "the device failed and cannot go on ({0}); this process stops so that it can be replaced"
    )]
    DeviceFailed(String),

    /// Anything else that is lumen's own fault.
    #[error("internal error: {0}")]
    Internal(String),
}

/// CUDA driver errors after which the context is unusable ("sticky"
/// errors: every later call returns them), as cudarc spells them. Running
/// out of memory is not among them: the next, smaller batch can succeed.
const STICKY_DEVICE_ERRORS: [&str; 10] = [
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_ASSERT",
    "CUDA_ERROR_ECC_UNCORRECTABLE",
    "CUDA_ERROR_CONTEXT_IS_DESTROYED",
];

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Tensor(Arc::new(e))
    }
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

    pub fn request(field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::InvalidRequest {
            field: field.into(),
            message: message.to_string(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source: Arc::new(source),
        }
    }

    /// Whether the device is unusable after this error (see
    /// [`Error::DeviceFailed`]).
    pub fn is_device_fatal(&self) -> bool {
        match self {
            Error::DeviceFailed(_) => true,
            Error::Tensor(e) => {
                let mut text = format!("{e} {e:?}");
                let mut source = std::error::Error::source(&**e);
                while let Some(s) = source {
                    text.push(' ');
                    text.push_str(&s.to_string());
                    source = s.source();
                }
                STICKY_DEVICE_ERRORS.iter().any(|name| text.contains(name))
            }
            _ => false,
        }
    }

    /// The request field or parameter this error is about, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::InvalidRequest { field, .. } => Some(field),
            Error::InvalidParameter { name, .. } => Some(name),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_keep_the_cause() {
        let e = Error::io("/x/y.png", std::io::Error::other("disk on fire"));
        let c = e.clone();
        assert_eq!(e.to_string(), c.to_string());
        assert!(c.to_string().contains("disk on fire"));
        let t: Error = candle_core::Error::Msg("shape mismatch".into()).into();
        assert!(t.clone().to_string().contains("shape mismatch"));
        assert_eq!(Error::param("steps", "x").field(), Some("steps"));
    }

    #[test]
    fn sticky_device_errors_are_fatal_and_out_of_memory_is_not() {
        // As candle reports cudarc's driver errors.
        let driver = |name: &str| -> Error {
            candle_core::Error::Msg(format!("DriverError({name}, \"...\")"))
                .context("softmax")
                .into()
        };
        assert!(driver("CUDA_ERROR_ILLEGAL_ADDRESS").is_device_fatal());
        assert!(driver("CUDA_ERROR_LAUNCH_FAILED").is_device_fatal());
        assert!(!driver("CUDA_ERROR_OUT_OF_MEMORY").is_device_fatal());
        assert!(!Error::param("steps", "CUDA_ERROR_ILLEGAL_ADDRESS").is_device_fatal());
        assert!(Error::DeviceFailed("x".into()).is_device_fatal());
    }
}
