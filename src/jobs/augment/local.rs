//! The local engine for `lumen augment`: one thread owns the models, takes
//! tasks in plan order (up to `batch` outputs of the same source and K per
//! model call), and keeps the last source's Kmax layout so that its other
//! variants and K skip the encoder.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::Device;

use super::dispatch::{Dispatch, Generated, Outcome};
use super::plan::Task;
use crate::error::{Error, Result};
use crate::guide;
use crate::model_folder::ModelSource;
use crate::pipeline::generation::{run_to_end, Generation};
use crate::pipeline::layout::{Layout, LayoutModel};
use crate::pipeline::layout_id::{guide_key, layout_id};
use crate::pipeline::request::{Bounds, GuideInfo, Limits, SynthesisRequest};
use crate::pipeline::spec::ModelSpecs;
use crate::pipeline::synthesis::{Precision, SynthesisModel};

pub struct LocalOptions {
    pub source: ModelSource,
    pub device: Device,
    pub precision: Precision,
    pub batch: usize,
}

/// Check the request against the model, then start the inference thread.
pub fn spawn(
    opts: LocalOptions,
    template: SynthesisRequest,
    guides: Vec<PathBuf>,
    dispatch: Arc<Dispatch>,
    tx: SyncSender<Outcome>,
) -> Result<Vec<JoinHandle<()>>> {
    let specs = ModelSpecs::read(&opts.source)?;
    let bounds = Bounds::new(&specs, Limits::default())?;
    template.validate(&bounds)?;
    let handle = std::thread::Builder::new()
        .name("lumen-augment".into())
        .spawn(move || {
            if let Err(e) = work(&opts, specs, &bounds, &template, &guides, &dispatch, &tx) {
                let _ = tx.send(Outcome::Fatal(e));
                dispatch.halt();
            }
        })
        .map_err(|e| Error::Internal(format!("cannot start the augment thread: {e}")))?;
    Ok(vec![handle])
}

/// The decoded guide of the last source and its Kmax layout.
struct Current {
    source: usize,
    bytes: Vec<u8>,
    size: (u32, u32),
    layout: Arc<Layout>,
}

fn work(
    opts: &LocalOptions,
    specs: ModelSpecs,
    bounds: &Bounds,
    template: &SynthesisRequest,
    guides: &[PathBuf],
    dispatch: &Dispatch,
    tx: &SyncSender<Outcome>,
) -> Result<()> {
    let layouts = LayoutModel::load_spec(&opts.source, specs.layout, &opts.device)?;
    let model =
        SynthesisModel::load_spec(&opts.source, specs.synthesis, &opts.device, opts.precision)?;
    let kmax = bounds.layout.max_components;
    let layout_size = template.layout_size(bounds)?;
    let mut current: Option<Current> = None;
    let same = |a: &Task, b: &Task| a.source == b.source && a.components == b.components;
    while let Some(group) = dispatch.take(opts.batch.max(1), same) {
        let n = group.len();
        let first = &group[0];
        // The guide and its layout, once per source.
        let t0 = Instant::now();
        let mut layout_ms = 0.0;
        if current.as_ref().map(|c| c.source) != Some(first.source) {
            current = None;
            let path = &guides[first.source];
            let read = std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    let img = guide::decode_named(&bytes, bounds.layout.max_image_pixels, path)
                        .map_err(|e| e.to_string())?
                        .to_rgb8();
                    Ok((bytes, img))
                });
            let (bytes, img) = match read {
                Ok(x) => x,
                Err(reason) => {
                    let _ = tx.send(Outcome::BadSource {
                        source: first.source,
                        reason,
                    });
                    dispatch.bad_source(first.source);
                    dispatch.finish(n);
                    continue;
                }
            };
            let prepared = layouts.prepare(&img, Some(layout_size))?;
            let layout = layouts
                .layouts(&[(&prepared, kmax)])?
                .pop()
                .ok_or_else(|| Error::Internal("no layout computed".into()))?;
            layout_ms = t0.elapsed().as_secs_f64() * 1e3;
            current = Some(Current {
                source: first.source,
                bytes,
                size: img.dimensions(),
                layout: Arc::new(layout),
            });
        }
        let Some(cur) = current.as_ref() else {
            dispatch.finish(n);
            continue;
        };
        // One plan (and generation) per output, stepped together.
        let key = guide_key(&bounds.model, layout_size, &cur.bytes);
        let mut records = Vec::with_capacity(n);
        let mut gens = Vec::with_capacity(n);
        for t in &group {
            let request = SynthesisRequest {
                prompt: Some(t.prompt.clone()),
                components: Some(t.components),
                seed: Some(t.seed),
                num_images: Some(1),
                score: Some(true),
                ..template.clone()
            };
            let plan = request.resolve(bounds, &GuideInfo::image(cur.size))?;
            records.push(plan.parameters(layout_id(&key, plan.components), &bounds.model));
            gens.push(Generation::start(&model, plan, cur.layout.clone(), None)?);
        }
        let format = template.format()?;
        let t1 = Instant::now();
        run_to_end(&model, &mut gens, &mut |_, _| {})?;
        let denoise_ms = t1.elapsed().as_secs_f64() * 1e3;
        let (mut images, mut scores) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut decode_ms, mut score_ms) = (0.0, 0.0);
        for g in &gens {
            let out = g.finish(&model, Some(&layouts))?;
            decode_ms += out.decode_s * 1e3;
            score_ms += out.score_s * 1e3;
            images.extend(out.images);
            scores.extend(out.scores);
        }
        for (((t, img), record), score) in group.into_iter().zip(images).zip(records).zip(scores) {
            let t4 = Instant::now();
            let bytes = format.encode(&img, &record)?;
            let timings = BTreeMap::from([
                ("layout_ms".to_string(), round(layout_ms)),
                ("denoise_ms".to_string(), round(denoise_ms / n as f64)),
                ("decode_ms".to_string(), round(decode_ms / n as f64)),
                ("score_ms".to_string(), round(score_ms / n as f64)),
                (
                    "encode_ms".to_string(),
                    round(t4.elapsed().as_secs_f64() * 1e3),
                ),
                ("batch_images".to_string(), n as f64),
            ]);
            let g = Generated {
                task: t,
                bytes,
                width: img.width(),
                height: img.height(),
                score: Some(score),
                parameters: record,
                server: None,
                timings,
            };
            if tx.send(Outcome::Done(Box::new(g))).is_err() {
                return Ok(());
            }
        }
        dispatch.finish(n);
    }
    Ok(())
}

fn round(ms: f64) -> f64 {
    (ms * 1e3).round() / 1e3
}
