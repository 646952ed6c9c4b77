//! Batch jobs over many images: long, resumable, with progress and a summary.
//! They build their work through the request model and the pipeline, as the
//! CLI and the server do.
//!
//! - [`layouts`]: `lumen layouts`, the training-data export;
//! - [`augment`]: `lumen augment`, a labelled dataset made larger with
//!   synthetic images whose labels still apply.

pub mod augment;
pub mod interrupt;
pub mod layouts;

use std::path::Path;

use crate::error::{Error, Result};

/// Write `bytes` to `path` through a temporary name in the same folder, so
/// that no half-written file ever has the final name.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// [`write_atomic`] for a file that several processes may write at once
/// (shards of one job): the temporary name is this process's own.
pub(crate) fn write_atomic_shared(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
