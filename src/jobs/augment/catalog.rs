//! The files that describe the whole output set, written from
//! `manifest.jsonl` once it is complete (or after every unsharded run):
//! `annotations.json`, the COCO file of every output.

use std::collections::HashMap;
use std::path::Path;

use super::coco::{Coco, OutImage, Problem};
use super::plan::Source;
use super::state::{read_lines, ManifestLine};
use crate::error::{Error, Result};
use crate::jobs::write_atomic_shared;

/// `annotations.json` for every output in `manifest.jsonl`.
pub(super) fn write_coco(out: &Path, c: &Coco, sources: &[Source]) -> Result<Vec<Problem>> {
    let lines: Vec<ManifestLine> = read_lines(&out.join("manifest.jsonl"))?;
    let by_rel: HashMap<&str, &Source> = sources.iter().map(|s| (s.rel.as_str(), s)).collect();
    let mut images = Vec::new();
    for l in &lines {
        let (Some(id), Some(src)) = (l.coco_image_id, by_rel.get(l.source.as_str())) else {
            continue;
        };
        let Some(source) = src.coco else { continue };
        images.push(OutImage {
            id,
            file_name: l
                .output
                .strip_prefix("images/")
                .unwrap_or(&l.output)
                .to_string(),
            width: l.width,
            height: l.height,
            source,
        });
    }
    images.sort_by_key(|i| i.id);
    let (doc, problems) = c.output(&images);
    let text = serde_json::to_string(&doc).map_err(|e| Error::Internal(e.to_string()))?;
    write_atomic_shared(&out.join("annotations.json"), text.as_bytes())?;
    Ok(problems)
}
