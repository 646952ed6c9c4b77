//! One output's files: its labels (the mask resized, the YOLO file copied),
//! then its image, each under a temporary name and renamed, and the
//! manifest line that describes them.

use std::path::Path;

use super::dispatch::Generated;
use super::mask::Mask;
use super::plan::{stem_of, Source};
use super::state::ManifestLine;
use crate::error::{Error, Result};
use crate::jobs::write_atomic;

pub(super) enum WriteError {
    /// The source's labels cannot be used after all.
    Source(String),
    /// OUT cannot be written.
    Fatal(Error),
}

/// Writes an output's files, labels first, each under a temporary name.
pub(super) struct Writer<'a> {
    out: &'a Path,
    sources: &'a [Source],
    /// Whether outputs get a COCO image id (`--coco`).
    coco_ids: bool,
    /// The last source's decoded mask: its outputs mostly arrive together.
    mask: Option<(usize, Mask)>,
}

impl<'a> Writer<'a> {
    pub fn new(out: &'a Path, sources: &'a [Source], coco_ids: bool) -> Self {
        Writer {
            out,
            sources,
            coco_ids,
            mask: None,
        }
    }

    pub fn write(&mut self, g: &Generated) -> std::result::Result<ManifestLine, WriteError> {
        let src = &self.sources[g.task.source];
        let name = g
            .task
            .output
            .strip_prefix("images/")
            .unwrap_or(&g.task.output)
            .to_string();
        let label_stem = stem_of(&name);
        let fatal = WriteError::Fatal;
        let mut labels = Vec::new();
        if let Some(m) = &src.mask {
            if self.mask.as_ref().map(|(s, _)| *s) != Some(g.task.source) {
                let decoded = Mask::read(m).map_err(|e| WriteError::Source(e.to_string()))?;
                self.mask = Some((g.task.source, decoded));
            }
            let Some((_, mask)) = &self.mask else {
                return Err(WriteError::Source("mask not read".into()));
            };
            let bytes = mask
                .resize_nearest(g.width, g.height)
                .to_png()
                .map_err(|e| WriteError::Source(e.to_string()))?;
            let rel = format!("masks/{label_stem}.png");
            self.put(&rel, &bytes).map_err(fatal)?;
            labels.push(rel);
        }
        if let Some(y) = &src.yolo {
            let bytes = std::fs::read(y)
                .map_err(|e| WriteError::Source(format!("{}: {e}", y.display())))?;
            let rel = format!("labels/{label_stem}.txt");
            self.put(&rel, &bytes).map_err(fatal)?;
            labels.push(rel);
        }
        if self.coco_ids {
            labels.push("annotations.json".into());
        }
        self.put(&g.task.output, &g.bytes).map_err(fatal)?;
        let p = &g.parameters;
        Ok(ManifestLine {
            source: src.rel.clone(),
            output: g.task.output.clone(),
            labels,
            seed: g.task.seed,
            components: g.task.components,
            variant: g.task.variant,
            prompt: p.prompt.clone(),
            negative_prompt: p.negative_prompt.clone(),
            steps: p.steps,
            scheduler: p.scheduler.clone(),
            guidance_scale: p.guidance_scale,
            control_scale: p.control_scale,
            layout_size: p.layout_size,
            width: g.width,
            height: g.height,
            model: p.model.clone(),
            score: g.score,
            coco_image_id: self.coco_ids.then_some(g.task.id + 1),
            server: g.server.clone(),
            timings: g.timings.clone(),
        })
    }

    fn put(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        let path = self.out.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        write_atomic(&path, bytes)
    }
}
