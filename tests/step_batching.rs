//! Step-level batching on the CPU: a generation stepped beside others (at
//! other steps, with other schedulers, guidance on or off, other control
//! scales, admitted mid-flight) gives the same bits as when it runs alone.
//! (cuBLAS is not batch-invariant: this holds on the CPU, where every kernel
//! treats a batch row alone.)

mod common;

use std::sync::Arc;

use candle_core::Device;
use lumen::model_folder::ModelSource;
use lumen::models::schedulers::SchedulerKind;
use lumen::pipeline::denoise::Denoising;
use lumen::pipeline::layout::{Layout, LayoutModel};
use lumen::pipeline::synthesis::{SynthesisItem, SynthesisModel, SynthesisSettings};

fn item(layout: &Layout, guidance: f64, control_scale: f64, seed: u64) -> SynthesisItem {
    SynthesisItem {
        layout: layout.clone(),
        prompt: "a red square".into(),
        negative_prompt: "blurry".into(),
        guidance,
        control_scale,
        seed,
        latents: None,
    }
}

fn settings(steps: usize, scheduler: SchedulerKind) -> SynthesisSettings {
    SynthesisSettings {
        width: 64,
        height: 48,
        steps,
        scheduler,
    }
}

/// On the CPU whatever `LUMEN_TEST_DEVICE` says: bit identity is a property
/// of lumen's CPU kernels, not of cuBLAS.
#[test]
fn a_generation_stepped_beside_others_is_bit_identical_to_alone() {
    let src = ModelSource::from_arg(Some(common::tiny_models().into()));
    let lm = LayoutModel::load(&src, &Device::Cpu).unwrap();
    let model = SynthesisModel::load(&src, &Device::Cpu).unwrap();
    let img = image::open(common::guide_path()).unwrap().to_rgb8();
    let g = lm.prepare(&img, None).unwrap();
    let full = Arc::new(
        lm.layouts(&[(&g, lm.spec().max_components)])
            .unwrap()
            .remove(0),
    );
    let k2 = full.truncate(2).unwrap();

    let a_settings = settings(6, SchedulerKind::DpmSolverMultistep);
    let a_items = [item(&full, 5.0, 1.0, 3), item(&k2, 5.0, 1.0, 4)];
    let mut alone = Denoising::new(&model, &a_settings, &a_items).unwrap();
    while !alone.is_done() {
        model.step(&mut [&mut alone]).unwrap();
    }

    // The same A, with B (Euler, no guidance, another control scale) from
    // the start and C (DDIM, guided) admitted after A's second step.
    let mut a = Denoising::new(&model, &a_settings, &a_items).unwrap();
    let mut b = Denoising::new(
        &model,
        &settings(9, SchedulerKind::Euler),
        &[item(&k2, 1.0, 0.6, 9)],
    )
    .unwrap();
    let mut c = Denoising::new(
        &model,
        &settings(3, SchedulerKind::Ddim),
        &[item(&full, 7.5, 1.2, 5), item(&full, 2.0, 1.0, 6)],
    )
    .unwrap();
    let mut step = 0;
    while !a.is_done() {
        let mut batch: Vec<&mut Denoising> = vec![&mut a];
        if !b.is_done() {
            batch.push(&mut b);
        }
        if step >= 2 && !c.is_done() {
            batch.push(&mut c);
        }
        model.step(&mut batch).unwrap();
        step += 1;
    }
    assert!(
        c.is_done() && !b.is_done(),
        "the batch mixed steps as planned"
    );
    let x = common::to_vec(alone.latents());
    let y = common::to_vec(a.latents());
    assert_eq!(x.len(), y.len());
    let differing = x
        .iter()
        .zip(&y)
        .filter(|(p, q)| p.to_bits() != q.to_bits())
        .count();
    assert_eq!(differing, 0, "{differing} of {} latents differ", x.len());
    // And the decoded images, too.
    for i in 0..2 {
        let p = model.decode_one(&alone, i).unwrap();
        let q = model.decode_one(&a, i).unwrap();
        assert_eq!(common::max_pixel_diff(&p, &q), 0);
    }
}

#[test]
fn denoisings_of_different_sizes_do_not_step_together() {
    let src = ModelSource::from_arg(Some(common::tiny_models().into()));
    let device = common::test_device();
    let lm = LayoutModel::load(&src, &device).unwrap();
    let model = SynthesisModel::load_as(&src, &device, common::test_dtype()).unwrap();
    let img = image::open(common::guide_path()).unwrap().to_rgb8();
    let g = lm.prepare(&img, None).unwrap();
    let full = lm
        .layouts(&[(&g, lm.spec().max_components)])
        .unwrap()
        .remove(0);
    let mut a = Denoising::new(
        &model,
        &settings(2, SchedulerKind::Ddim),
        &[item(&full, 1.0, 1.0, 1)],
    )
    .unwrap();
    let mut other = settings(2, SchedulerKind::Ddim);
    other.width = 32;
    let mut b = Denoising::new(&model, &other, &[item(&full, 1.0, 1.0, 1)]).unwrap();
    let e = model.step(&mut [&mut a, &mut b]).unwrap_err();
    assert!(e.to_string().contains("latent sizes"), "{e}");
}
