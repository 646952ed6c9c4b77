//! Parity of the synthesis path with diffusers on two random-weight model
//! sets (references by scripts/make_sd_fixtures.py): tokenizer ids, text
//! embeddings, ControlNet conditioning, the guided noise prediction of step 1,
//! final latents and decoded images for DDIM, Euler and DPM++ 2M, with and
//! without classifier-free guidance.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::{assert_close, root};
use lumen::model_folder::ModelSource;
use lumen::models::schedulers::SchedulerKind;
use lumen::pipeline::layout::Layout;
use lumen::pipeline::synthesis::{SynthesisItem, SynthesisModel, SynthesisSettings};
use serde::Deserialize;

#[derive(Deserialize)]
struct TokenCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct NoCfg {
    scheduler: String,
    guidance: f64,
}

#[derive(Deserialize)]
struct SdCase {
    models: String,
    guide: String,
    components: usize,
    width: u32,
    height: u32,
    steps: usize,
    guidance: f64,
    control_scale: f64,
    prompt: String,
    negative_prompt: String,
    schedulers: Vec<String>,
    nocfg: NoCfg,
    tokens: Vec<TokenCase>,
}

fn cases() -> Vec<(String, SdCase)> {
    let text =
        std::fs::read_to_string(root().join("tests/fixtures/reference/sd_cases.json")).unwrap();
    let map: HashMap<String, SdCase> = serde_json::from_str(&text).unwrap();
    let mut v: Vec<_> = map.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn refs(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        root().join(format!("tests/fixtures/reference/sd-{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

/// On `LUMEN_TEST_DEVICE` in `LUMEN_TEST_DTYPE` (CPU and f32 by default).
fn load(case: &SdCase) -> SynthesisModel {
    SynthesisModel::load_as(
        &ModelSource::Dir(root().join(&case.models)),
        &common::test_device(),
        common::test_dtype(),
    )
    .expect("model set loads")
}

/// The reference layout of the case's guide, cut to K components.
fn layout(name: &str, case: &SdCase) -> Layout {
    let full = common::reference(name)[&format!("{}.layout", case.guide)].clone();
    let (_, h, w) = full.dims3().unwrap();
    Layout {
        data: full.narrow(0, 0, case.components).unwrap(),
        components: case.components,
        grid: (h, w),
    }
}

fn item(name: &str, case: &SdCase, guidance: f64, r: &HashMap<String, Tensor>) -> SynthesisItem {
    SynthesisItem {
        layout: layout(name, case),
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        guidance,
        control_scale: case.control_scale,
        seed: 0,
        latents: Some(r["latents"].clone()),
    }
}

/// Compare decoded 8-bit images: max |Δ| ≤ 3 levels, mean |Δ| ≤ 0.5 in f32
/// (wider in f16 and bf16: [`common::image_tolerance`]).
fn assert_image_close(what: &str, got: &image::RgbImage, want: &Tensor) {
    let (max_allowed, mean_allowed) = common::image_tolerance();
    let want = want.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let got = got.as_raw();
    assert_eq!(got.len(), want.len(), "{what}: image size");
    let diffs: Vec<u32> = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as i32 - *b as i32).unsigned_abs())
        .collect();
    let max = *diffs.iter().max().unwrap();
    let mean = diffs.iter().sum::<u32>() as f64 / diffs.len() as f64;
    eprintln!("{what}: image max |Δ| = {max}, mean |Δ| = {mean:.4}");
    assert!(
        max <= max_allowed && mean <= mean_allowed,
        "{what}: image max |Δ| {max}, mean |Δ| {mean} (allowed {max_allowed}, {mean_allowed})"
    );
}

#[test]
fn tokenizer_ids_match_transformers() {
    for (name, case) in cases() {
        let model = load(&case);
        for t in &case.tokens {
            let ids = model.text.tokenizer.encode(&t.text).unwrap();
            assert_eq!(ids, t.ids, "{name}: tokens of {:?}", t.text);
        }
    }
}

#[test]
fn text_embeddings_and_conditioning_match() {
    for (name, case) in cases() {
        let model = load(&case);
        let r = refs(&name);
        let e = model
            .text_embeddings(&case.prompt, &case.negative_prompt, true)
            .unwrap();
        assert_close(
            &format!("{name} text.uncond"),
            &e.narrow(0, 0, 1).unwrap(),
            &r["text.uncond"],
            common::tol(1e-4),
        );
        assert_close(
            &format!("{name} text.cond"),
            &e.narrow(0, 1, 1).unwrap(),
            &r["text.cond"],
            common::tol(1e-4),
        );
        let cond = model
            .conditioning(&layout(&name, &case), case.width, case.height)
            .unwrap();
        assert_close(
            &format!("{name} cond"),
            &cond,
            &r["cond"],
            common::tol(1e-5),
        );
    }
}

#[test]
fn denoising_matches_diffusers_for_every_scheduler() {
    for (name, case) in cases() {
        let model = load(&case);
        let r = refs(&name);
        let mut runs: Vec<(String, String, f64)> = case
            .schedulers
            .iter()
            .map(|s| (s.clone(), s.clone(), case.guidance))
            .collect();
        runs.push((
            format!("nocfg.{}", case.nocfg.scheduler),
            case.nocfg.scheduler.clone(),
            case.nocfg.guidance,
        ));
        for (key, sched, guidance) in runs {
            let settings = SynthesisSettings {
                width: case.width,
                height: case.height,
                steps: case.steps,
                scheduler: SchedulerKind::parse(&sched).unwrap(),
            };
            let items = [item(&name, &case, guidance, &r)];
            let mut first = None;
            let latents = model
                .denoise_with(&settings, &items, &mut |_, _| {}, &mut |i, eps| {
                    if i == 0 {
                        first = Some(eps.clone());
                    }
                    Ok(())
                })
                .unwrap();
            let what = format!("{name}/{key}");
            assert_close(
                &format!("{what} noise_pred0"),
                &first.unwrap(),
                &r[&format!("{key}.noise_pred0")],
                common::tol(1e-3),
            );
            assert_close(
                &format!("{what} latents"),
                &latents,
                &r[&format!("{key}.latents_final")],
                common::tol(1e-3),
            );
            let img = model.decode(&latents).unwrap();
            assert_image_close(&what, &img, &r[&format!("{key}.image")]);
        }
    }
}

/// The time embedding in f16 (the sinusoidal projection in f32, cast after,
/// as diffusers' `get_time_embed`) against diffusers' f16 and f32 UNets, at
/// DDIM's t = 999, where an f16 projection errs by up to half a radian, and
/// at Euler's fractional timesteps, which f16 would round (references by
/// scripts/make_time_embedding_fixture.py).
#[test]
fn f16_time_embedding_matches_diffusers() {
    use candle_core::DType;
    use lumen::models::unet::UNet;
    let r = candle_core::safetensors::load(
        root().join("tests/fixtures/reference/time-embedding.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let timesteps = common::to_vec(&r["timesteps"]);
    let src = ModelSource::Dir(root().join("models/tiny"));
    let device = common::test_device();
    // (the UNet's dtype, the reference, max |Δ| / max |ref|)
    let checks = [
        (DType::F32, "f32", common::tol(1e-5)),
        (DType::F16, "f16", 5e-3),
        (DType::F16, "f32", 1e-2),
    ];
    for (dtype, key, rel) in checks {
        let unet = UNet::load(&src, &device, dtype).unwrap();
        let like = Tensor::zeros(1, dtype, &device).unwrap();
        for (i, &t) in timesteps.iter().enumerate() {
            let got = unet.time_embedding(&[t as f64], &like).unwrap();
            assert_eq!(got.dtype(), dtype);
            let want = r[key].get(i).unwrap();
            assert_close(
                &format!("{dtype:?} UNet vs diffusers {key}, t = {t}"),
                &got.squeeze(0).unwrap(),
                &want,
                rel,
            );
        }
    }
}
