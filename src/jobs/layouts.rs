//! `lumen layouts`: the Kmax-channel layouts of an image folder, written as
//! training data with exactly the computation serving uses.
//!
//! Output folder:
//! ```text
//! dataset.json               what was exported and how: model and PCA identity (sha256), layout size,
//!                            Kmax, dtype, shard size, and the planned image list
//! shard-00000.safetensors    one f16 tensor per readable image, keyed by its row ("0", "1", …): [Kmax, h, w]
//! shard-00000.jsonl          one line per planned image: row, source, caption, width, height, grid
//!                            (or source and `skipped` with the reason)
//! index.jsonl                every row of every shard: shard, row, source, caption, width, height, grid
//! ```
//! Images are assigned to shards by their sorted position, so a rerun
//! recomputes only the shards that are not complete. A shard is written to
//! temporary names and renamed, its `.jsonl` last: a shard whose `.jsonl`
//! exists is complete, and no half-written file ever has a final name.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::DType;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::dataset::{ImageEntry, ImageFolder};
use crate::error::{Error, Result};
use crate::guide;
use crate::jobs::write_atomic;
use crate::pipeline::layout::{LayoutModel, PreparedGuide};

/// The `format` of `dataset.json`.
pub const FORMAT: &str = "lumen-layouts/1";

/// `dataset.json`: what an export is, so that a rerun continues only the
/// same export and a trainer can check the basis it was made with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// The model folder's identity (`--models`).
    pub model: String,
    /// sha256 of `encoder/config.json` and the encoder weights.
    pub encoder_sha256: String,
    /// sha256 of `pca.safetensors`.
    pub pca_sha256: String,
    pub layout_size: u32,
    /// Kmax: the channels of every layout.
    pub components: usize,
    pub dtype: String,
    pub shard_size: usize,
    /// The images, relative to the image folder, in export order.
    pub files: Vec<String>,
    pub lumen_version: String,
}

/// How to export.
#[derive(Clone, Debug)]
pub struct LayoutsOptions {
    pub out: PathBuf,
    pub layout_size: u32,
    /// Images per encoder call.
    pub batch: usize,
    /// Images per shard.
    pub shard_size: usize,
    pub max_image_pixels: u64,
    pub progress: bool,
}

/// What an export did.
#[derive(Clone, Debug, Default)]
pub struct LayoutsReport {
    pub images: usize,
    pub shards: usize,
    /// Shards found complete from an earlier run.
    pub shards_reused: usize,
    /// Images read (and encoded, unless unreadable) by this run.
    pub processed: usize,
    /// Rows in the index.
    pub rows: usize,
    /// Unreadable images: (path relative to the folder, why).
    pub skipped: Vec<(String, String)>,
    /// Seconds spent encoding by this run.
    pub seconds: f64,
}

impl LayoutsReport {
    pub fn images_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.processed as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// One line of a shard's `.jsonl` (and, with `shard`, of `index.jsonl`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Row {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shard: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    row: Option<usize>,
    source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    caption: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    grid: Option<[usize; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    skipped: Option<String>,
}

fn shard_name(i: usize) -> String {
    format!("shard-{i:05}")
}

/// Whether shard `i` was completed by an earlier run.
fn shard_done(out: &Path, i: usize) -> bool {
    let name = shard_name(i);
    out.join(format!("{name}.jsonl")).is_file() && out.join(format!("{name}.safetensors")).is_file()
}

/// Start a new export in `out`, or check that the one there is this one.
fn plan(out: &Path, manifest: &Manifest) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let file = out.join("dataset.json");
    if !file.is_file() {
        let text =
            serde_json::to_string_pretty(manifest).map_err(|e| Error::Internal(e.to_string()))?;
        return write_atomic(&file, text.as_bytes());
    }
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let old: Manifest = serde_json::from_str(&text).map_err(|e| {
        Error::param(
            "out",
            format!("{}: not a lumen layouts export ({e})", file.display()),
        )
    })?;
    let differs = [
        ("format", old.format != manifest.format),
        ("model", old.model != manifest.model),
        (
            "encoder weights",
            old.encoder_sha256 != manifest.encoder_sha256,
        ),
        ("PCA basis", old.pca_sha256 != manifest.pca_sha256),
        ("layout size", old.layout_size != manifest.layout_size),
        ("shard size", old.shard_size != manifest.shard_size),
        ("image list", old.files != manifest.files),
    ];
    if let Some((what, _)) = differs.iter().find(|(_, d)| *d) {
        return Err(Error::param(
            "out",
            format!(
                "{} holds an export with another {what}; continue it with the same inputs, or use a new --out",
                out.display()
            ),
        ));
    }
    Ok(())
}

/// Export the layouts of `folder` with `model` (see the module docs).
pub fn export_layouts(
    model: &LayoutModel,
    folder: &ImageFolder,
    manifest: &Manifest,
    opts: &LayoutsOptions,
) -> Result<LayoutsReport> {
    if opts.batch == 0 || opts.shard_size == 0 {
        return Err(Error::param("batch/shard_size", "must be at least 1"));
    }
    plan(&opts.out, manifest)?;
    let shards: Vec<&[ImageEntry]> = folder.images.chunks(opts.shard_size).collect();
    let mut report = LayoutsReport {
        images: folder.images.len(),
        shards: shards.len(),
        ..Default::default()
    };
    let todo: usize = shards
        .iter()
        .enumerate()
        .filter(|(i, _)| !shard_done(&opts.out, *i))
        .map(|(_, s)| s.len())
        .sum();
    let bar = if opts.progress {
        indicatif::ProgressBar::new(todo as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>8} [{bar:40}] {pos}/{len} images ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message("layouts");
    let kmax = manifest.components;
    for (i, images) in shards.iter().enumerate() {
        let name = shard_name(i);
        if shard_done(&opts.out, i) {
            report.shards_reused += 1;
            continue;
        }
        let t = Instant::now();
        let mut tensors: Vec<(String, candle_core::Tensor)> = Vec::new();
        let mut rows = Vec::with_capacity(images.len());
        for chunk in images.chunks(opts.batch) {
            let prepared: Vec<std::result::Result<PreparedGuide, String>> = chunk
                .par_iter()
                .map(|e| {
                    guide::open(&e.path, opts.max_image_pixels)
                        .and_then(|img| model.prepare(&img.to_rgb8(), Some(opts.layout_size)))
                        .map_err(|err| err.to_string())
                })
                .collect();
            let ok: Vec<(&PreparedGuide, usize)> = prepared
                .iter()
                .filter_map(|p| p.as_ref().ok().map(|g| (g, kmax)))
                .collect();
            let mut layouts = model.layouts_batched(&ok, opts.batch)?.into_iter();
            for (entry, p) in chunk.iter().zip(&prepared) {
                let mut row = Row {
                    shard: None,
                    row: None,
                    source: entry.rel.clone(),
                    caption: entry.caption.clone(),
                    width: None,
                    height: None,
                    grid: None,
                    skipped: None,
                };
                match p {
                    Ok(g) => {
                        let layout = layouts
                            .next()
                            .ok_or_else(|| Error::Internal("a guide was not encoded".into()))?;
                        let r = tensors.len();
                        row.row = Some(r);
                        row.width = Some(g.source_size.0);
                        row.height = Some(g.source_size.1);
                        row.grid = Some([layout.grid.0, layout.grid.1]);
                        tensors.push((r.to_string(), layout.data.to_dtype(DType::F16)?));
                    }
                    Err(why) => {
                        bar.println(format!("skipping {}: {why}", entry.rel));
                        report.skipped.push((entry.rel.clone(), why.clone()));
                        row.skipped = Some(why.clone());
                    }
                }
                rows.push(row);
            }
            bar.inc(chunk.len() as u64);
        }
        write_shard(&opts.out, &name, &tensors, &rows, manifest)?;
        report.processed += images.len();
        report.seconds += t.elapsed().as_secs_f64();
    }
    bar.finish_and_clear();
    report.rows = write_index(&opts.out, shards.len(), &mut report)?;
    Ok(report)
}

/// A shard's tensors, then its rows (the completion mark), each through a temporary name.
fn write_shard(
    out: &Path,
    name: &str,
    tensors: &[(String, candle_core::Tensor)],
    rows: &[Row],
    manifest: &Manifest,
) -> Result<()> {
    let metadata = [
        ("format", manifest.format.clone()),
        ("pca_sha256", manifest.pca_sha256.clone()),
        ("layout_size", manifest.layout_size.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bytes =
        safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
            .map_err(|e| Error::Internal(format!("cannot serialize {name}: {e}")))?;
    write_atomic(&out.join(format!("{name}.safetensors")), &bytes)?;
    let mut lines = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut lines, r).map_err(|e| Error::Internal(e.to_string()))?;
        lines.push(b'\n');
    }
    write_atomic(&out.join(format!("{name}.jsonl")), &lines)
}

/// `index.jsonl`: every row of every shard; skipped images go to the report.
fn write_index(out: &Path, shards: usize, report: &mut LayoutsReport) -> Result<usize> {
    let mut index = Vec::new();
    let mut count = 0;
    report.skipped.clear();
    for i in 0..shards {
        let name = shard_name(i);
        let file = out.join(format!("{name}.jsonl"));
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        for (n, line) in text.lines().enumerate() {
            let mut row: Row = serde_json::from_str(line).map_err(|e| {
                Error::param("out", format!("{} line {}: {e}", file.display(), n + 1))
            })?;
            if let Some(why) = row.skipped.take() {
                report.skipped.push((row.source, why));
                continue;
            }
            row.shard = Some(format!("{name}.safetensors"));
            serde_json::to_writer(&mut index, &row).map_err(|e| Error::Internal(e.to_string()))?;
            index.write_all(b"\n").map_err(|e| Error::io(out, e))?;
            count += 1;
        }
    }
    write_atomic(&out.join("index.jsonl"), &index)?;
    Ok(count)
}

/// A JSON summary of a report (printed by the CLI).
pub fn summary(report: &LayoutsReport) -> serde_json::Value {
    json!({
        "images": report.images,
        "rows": report.rows,
        "shards": report.shards,
        "shards_reused": report.shards_reused,
        "processed": report.processed,
        "seconds": (report.seconds * 100.0).round() / 100.0,
        "images_per_second": (report.images_per_second() * 100.0).round() / 100.0,
        "skipped": report.skipped.iter().map(|(p, w)| json!({"source": p, "reason": w})).collect::<Vec<_>>(),
    })
}
