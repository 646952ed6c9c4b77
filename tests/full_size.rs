//! Full-size check, ignored by default (needs ~10 GB of random weights that
//! are built locally, never committed): SD1.5 UNet + ControlNet (64 layout
//! channels) + VAE + CLIP ViT-L text encoder + DINOv2-L/14 from their public
//! configurations, one 512×512 denoising step with guidance, then decode.
//!
//! ```sh
//! ~/venv/bin/python scripts/make_big_models.py          # writes scripts/.cache/sd15-random
//! cargo test --release --test full_size -- --ignored --nocapture
//! ```
//!
//! `LUMEN_BIG_MODELS` points elsewhere if the folder lives somewhere else;
//! `LUMEN_TEST_DEVICE` / `LUMEN_TEST_DTYPE` run it on a GPU (tests/common).

mod common;

use std::path::PathBuf;

use lumen::model_folder::ModelSource;
use lumen::models::schedulers::SchedulerKind;
use lumen::pipeline::layout::LayoutModel;
use lumen::pipeline::synthesis::{SynthesisItem, SynthesisModel, SynthesisSettings};

#[test]
#[ignore = "needs scripts/make_big_models.py output (full-size random weights)"]
fn sd15_sized_models_run_one_512_step() {
    let dir = std::env::var_os("LUMEN_BIG_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/.cache/sd15-random")
        });
    let src = ModelSource::Dir(dir);
    let layout_model =
        LayoutModel::load(&src, &common::test_device()).expect("encoder and PCA load");
    assert_eq!(layout_model.encoder.hidden_size(), 1024);
    let guide = image::open(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/images/tiny-street.png"
    ))
    .unwrap()
    .to_rgb8();
    let prepared = layout_model.prepare(&guide, None).unwrap();
    let layout = layout_model.layouts(&[(&prepared, 32)]).unwrap().remove(0);
    assert_eq!(layout.grid, (26, 37));
    drop(layout_model);
    let model = SynthesisModel::load_as(&src, &common::test_device(), common::test_dtype())
        .expect("full-size model set loads");
    assert_eq!(model.unet.layout.blocks.len(), 4);
    assert_eq!(model.vae.factor, 8);
    let settings = SynthesisSettings {
        width: 512,
        height: 512,
        steps: 1,
        scheduler: SchedulerKind::DpmSolverMultistep,
    };
    let item = SynthesisItem {
        layout,
        prompt: "a red house by the sea".into(),
        negative_prompt: "blurry".into(),
        guidance: 7.5,
        control_scale: 1.0,
        seed: 1,
        latents: None,
    };
    let t = std::time::Instant::now();
    let images = model.generate(&settings, &[item], |_, _| {}).unwrap();
    eprintln!(
        "one 512x512 CFG step + decode: {:.1} s, peak RSS {:.2} GiB",
        t.elapsed().as_secs_f64(),
        lumen::bench::peak_rss_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64
    );
    assert_eq!(images[0].dimensions(), (512, 512));
}
