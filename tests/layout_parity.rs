//! Parity of the layout path with transformers + scikit-learn on random-weight
//! models (references written by scripts/make_fixtures.py): encoder hidden
//! states, PCA layouts, batching, K prefixes and fit-pca.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, cases, reference, root};
use lumen::config::LumenSettings;
use lumen::guide;
use lumen::model_folder::ModelSource;
use lumen::models::pca::Pca;
use lumen::pipeline::fit_pca::{fit_pca, list_images};
use lumen::pipeline::layout::{LayoutModel, PreparedGuide};

const TOL: f32 = 1e-4;

fn load(models: &str) -> LayoutModel {
    LayoutModel::load(
        &ModelSource::Dir(root().join(models)),
        &common::test_device(),
    )
    .expect("model loads")
}

fn prepared(model: &LayoutModel, image: &str, layout_size: u32) -> PreparedGuide {
    let img = guide::open(&root().join(image), 40_000_000)
        .unwrap()
        .to_rgb8();
    model.prepare(&img, Some(layout_size)).unwrap()
}

#[test]
fn encoder_hidden_states_match_transformers() {
    for (name, case) in cases() {
        let model = load(&case.models);
        let refs = reference(&name);
        for g in &case.guides {
            let p = prepared(&model, &g.image, g.layout_size);
            assert_eq!(p.grid, (g.grid[0], g.grid[1]), "{name}/{}: grid", g.name);
            let hidden = model
                .encoder
                .forward(&p.pixels.unsqueeze(0).unwrap())
                .unwrap();
            let want = &refs[&format!("{}.hidden", g.name)];
            assert_close(
                &format!("{name}/{} hidden", g.name),
                &hidden.squeeze(0).unwrap(),
                want,
                TOL,
            );
        }
    }
}

#[test]
fn batched_layouts_match_reference_and_k_is_a_prefix() {
    for (name, case) in cases() {
        let model = load(&case.models);
        let refs = reference(&name);
        let guides: Vec<PreparedGuide> = case
            .guides
            .iter()
            .map(|g| prepared(&model, &g.image, g.layout_size))
            .collect();
        // All guides in one call: same-size ones share an encoder batch.
        let requests: Vec<(&PreparedGuide, usize)> =
            guides.iter().map(|g| (g, case.kmax)).collect();
        let layouts = model.layouts(&requests).unwrap();
        for (g, layout) in case.guides.iter().zip(&layouts) {
            let want = &refs[&format!("{}.layout", g.name)];
            assert_eq!(layout.data.dims(), &[case.kmax, g.grid[0], g.grid[1]]);
            assert_close(
                &format!("{name}/{} layout", g.name),
                &layout.data,
                want,
                TOL,
            );
        }
        // A smaller K keeps the leading components.
        let k = 3.min(case.kmax);
        let small = model.layouts(&[(&guides[0], k)]).unwrap().remove(0);
        let want = refs[&format!("{}.layout", case.guides[0].name)]
            .narrow(0, 0, k)
            .unwrap();
        assert_close(&format!("{name} K={k}"), &small.data, &want, TOL);
    }
}

#[test]
fn batch_gives_the_same_layout_as_alone() {
    let (_, case) = cases().into_iter().find(|(n, _)| n == "tiny").unwrap();
    let model = load(&case.models);
    let same: Vec<&common::Guide> = case.guides.iter().filter(|g| g.grid == [5, 7]).collect();
    assert!(same.len() >= 2, "fixture has two guides of one size");
    let a = prepared(&model, &same[0].image, same[0].layout_size);
    let b = prepared(&model, &same[1].image, same[1].layout_size);
    let batched = model.layouts(&[(&a, 4), (&b, 4)]).unwrap();
    let alone = model.layouts(&[(&b, 4)]).unwrap();
    assert_close(
        "batched vs alone",
        &batched[1].data,
        &alone[0].data,
        common::tol(1e-5),
    );
}

#[test]
fn embedded_model_is_models_shapes() {
    let folder = root().join(lumen::model_folder::embedded::DIR);
    let dir = load(lumen::model_folder::embedded::DIR);
    let emb = LayoutModel::load(&ModelSource::Embedded, &common::test_device()).unwrap();
    let a = prepared(&dir, "tests/fixtures/images/shapes-guide.png", 64);
    let x = dir.layouts(&[(&a, 5)]).unwrap().remove(0);
    let y = emb.layouts(&[(&a, 5)]).unwrap().remove(0);
    assert_eq!(common::to_vec(&x.data), common::to_vec(&y.data));
    // Every file of the folder is compiled in, byte for byte.
    for entry in walk(&folder) {
        let rel = entry.strip_prefix(&folder).unwrap();
        let rel = rel.to_str().unwrap();
        let embedded = lumen::model_folder::embedded::file(rel);
        assert!(embedded.is_some(), "{rel} is not embedded");
        assert_eq!(embedded, Some(&std::fs::read(&entry).unwrap()[..]), "{rel}");
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn fit_pca_matches_scikit_learn() {
    for (name, case) in cases() {
        let src = ModelSource::Dir(root().join(&case.models));
        let model = load(&case.models);
        let files = list_images(&root().join(&case.fit_images)).unwrap();
        let settings = LumenSettings::default();
        let (fitted, report) = fit_pca(
            &model.encoder,
            &settings,
            &files,
            case.kmax,
            Some(case.fit_layout_size),
            false,
        )
        .unwrap();
        assert_eq!(report.images, files.len());
        assert!(report.skipped.is_empty());
        let want = Pca::load(&src, &Device::Cpu).unwrap();
        assert_close(&format!("{name} mean"), fitted.mean(), want.mean(), TOL);
        assert_close(
            &format!("{name} components"),
            fitted.components(),
            want.components(),
            TOL,
        );
        let (a, b) = (
            common::to_vec(fitted.explained_variance()),
            common::to_vec(want.explained_variance()),
        );
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= TOL * y,
                "{name} explained_variance[{i}]: {x} vs {y}"
            );
        }
    }
}

#[test]
fn f16_checkpoint_loads_as_f32() {
    // Rewrite the tiny encoder in f16 and check the layout stays close.
    let dir = tempfile::tempdir().unwrap();
    let src = root().join("models/tiny");
    std::fs::create_dir_all(dir.path().join("encoder")).unwrap();
    for f in ["encoder/config.json", "pca.safetensors", "lumen.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let tensors =
        candle_core::safetensors::load(src.join("encoder/model.safetensors"), &Device::Cpu)
            .unwrap();
    let half: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(&half, dir.path().join("encoder/model.safetensors")).unwrap();
    let full = load("models/tiny");
    let halfm = LayoutModel::load(
        &ModelSource::Dir(dir.path().to_path_buf()),
        &common::test_device(),
    )
    .unwrap();
    assert_eq!(halfm.encoder.dtype(), DType::F32);
    let (_, case) = cases().into_iter().find(|(n, _)| n == "tiny").unwrap();
    let g = &case.guides[0];
    let p = prepared(&full, &g.image, g.layout_size);
    let a = full.layouts(&[(&p, 4)]).unwrap().remove(0);
    let b = halfm.layouts(&[(&p, 4)]).unwrap().remove(0);
    // f16 rounding of the weights only.
    assert_close("f16 checkpoint", &b.data, &a.data, 5e-2);
}
