//! The `lumen` binary end to end: outputs of `layout` and `fit-pca`, and a
//! clear error with a non-zero exit (never a panic) for every kind of bad input.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{assert_close, cases, fails_with, lumen, png_with_header, reference, root, s};

fn tiny_guide() -> (PathBuf, common::Guide) {
    let (_, case) = cases().into_iter().find(|(n, _)| n == "tiny").unwrap();
    let g = case.guides.into_iter().next().unwrap();
    (root().join(&g.image), g)
}

/// A writable copy of models/tiny.
fn tiny_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = root().join("models/tiny");
    std::fs::create_dir_all(dir.path().join("encoder")).unwrap();
    for f in [
        "encoder/config.json",
        "encoder/model.safetensors",
        "pca.safetensors",
        "lumen.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    dir
}

#[test]
fn layout_writes_safetensors_matching_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("layout.safetensors");
    let (img, g) = tiny_guide();
    let ls = g.layout_size.to_string();
    let o = lumen(&[
        "layout",
        "--image",
        s(&img),
        "--components",
        "6",
        "--layout-size",
        &ls,
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let layout = &got["layout"];
    assert_eq!(layout.dims(), &[6, g.grid[0], g.grid[1]]);
    let want = reference("tiny")[&format!("{}.layout", g.name)]
        .narrow(0, 0, 6)
        .unwrap();
    assert_close("cli layout", layout, &want, 1e-4);
}

#[test]
fn layout_png_preview_has_the_guide_size() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("preview.png");
    let (img, _) = tiny_guide();
    let o = lumen(&["layout", "--image", s(&img), "--out", s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let guide = image::open(&img).unwrap();
    let preview = image::open(&out).unwrap();
    assert_eq!(
        (preview.width(), preview.height()),
        (guide.width(), guide.height())
    );
    // Three min–max scaled channels: each spans the full range.
    let rgb = preview.to_rgb8();
    for c in 0..3 {
        let vals: Vec<u8> = rgb.pixels().map(|p| p.0[c]).collect();
        assert_eq!(*vals.iter().min().unwrap(), 0);
        assert_eq!(*vals.iter().max().unwrap(), 255);
    }
}

#[test]
fn fit_pca_writes_a_basis_the_layout_command_accepts() {
    let model = tiny_copy();
    let pca = model.path().join("pca.safetensors");
    std::fs::remove_file(&pca).unwrap();
    let fit = root().join("tests/fixtures/images/fit");
    let o = lumen(&[
        "fit-pca",
        "--models",
        s(model.path()),
        "--images",
        s(&fit),
        "--components",
        "5",
        "--max-images",
        "4",
        "--layout-size",
        "112",
        "--quiet",
        "--out",
        s(&pca),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("from 4 images"), "{stdout}");
    let t = candle_core::safetensors::load(&pca, &Device::Cpu).unwrap();
    assert_eq!(t["components"].dims(), &[5, 32]);
    assert_eq!(t["mean"].dims(), &[32]);
    assert_eq!(t["explained_variance"].dims(), &[5]);
    let (img, _) = tiny_guide();
    let out = model.path().join("l.safetensors");
    let o = lumen(&[
        "layout",
        "--models",
        s(model.path()),
        "--image",
        s(&img),
        "-k",
        "5",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    fails_with(
        &[
            "layout",
            "--models",
            s(model.path()),
            "--image",
            s(&img),
            "-k",
            "6",
            "--out",
            s(&out),
        ],
        &["components", "1 to 5"],
    );
}

#[test]
fn bad_parameters_are_named() {
    let (img, _) = tiny_guide();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.safetensors");
    fails_with(
        &["layout", "--image", s(&img), "-k", "0", "--out", s(&out)],
        &["`components`", "1 to 16"],
    );
    fails_with(
        &["layout", "--image", s(&img), "-k", "17", "--out", s(&out)],
        &["`components`", "1 to 16"],
    );
    fails_with(
        &[
            "layout",
            "--image",
            s(&img),
            "--layout-size",
            "13",
            "--out",
            s(&out),
        ],
        &["`layout_size`", "one patch"],
    );
    fails_with(
        &[
            "layout",
            "--image",
            s(&img),
            "--out",
            s(&tmp.path().join("x.jpg")),
        ],
        &["`out`"],
    );
    fails_with(
        &[
            "layout",
            "--image",
            s(&tmp.path().join("none.png")),
            "--out",
            s(&out),
        ],
        &["none.png"],
    );
    fails_with(
        &[
            "layout",
            "--image",
            s(&img),
            "--device",
            "tpu",
            "--out",
            s(&out),
        ],
        &["`device`"],
    );
    let empty = tempfile::tempdir().unwrap();
    fails_with(
        &[
            "fit-pca",
            "--images",
            s(empty.path()),
            "--out",
            s(&tmp.path().join("p.safetensors")),
        ],
        &["`images`"],
    );
    let fit = root().join("tests/fixtures/images/fit");
    fails_with(
        &[
            "fit-pca",
            "--images",
            s(&fit),
            "-k",
            "33",
            "--out",
            s(&tmp.path().join("p.safetensors")),
        ],
        &["`components`"],
    );
}

#[test]
fn bad_images_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.safetensors");
    let (img, _) = tiny_guide();
    let good = std::fs::read(&img).unwrap();
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "text.png",
            b"hello, not an image".to_vec(),
            &["invalid image", "unrecognized"],
        ),
        (
            "truncated.png",
            good[..good.len() / 2].to_vec(),
            &["invalid image"],
        ),
        ("empty.png", Vec::new(), &["invalid image"]),
        ("zero.png", png_with_header(0, 10, None), &["invalid image"]),
        (
            "huge.png",
            png_with_header(10_000, 10_000, Some(b"garbage")),
            &["100000000 pixels", "40000000"],
        ),
        (
            "garbage-data.png",
            png_with_header(16, 16, Some(b"garbage")),
            &["invalid image"],
        ),
    ];
    for (name, bytes, needles) in cases {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        fails_with(&["layout", "--image", s(&p), "--out", s(&out)], needles);
    }
}

#[test]
fn broken_model_folders_name_the_file_and_the_fault() {
    let (img, _) = tiny_guide();
    let run = |dir: &Path| {
        let out = dir.join("x.safetensors");
        vec![
            "layout".to_string(),
            "--models".into(),
            s(dir).into(),
            "--image".into(),
            s(&img).into(),
            "--out".into(),
            s(&out).into(),
        ]
    };
    let check = |dir: &Path, needles: &[&str]| {
        let args = run(dir);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&args, needles);
    };

    let m = tiny_copy();
    std::fs::remove_file(m.path().join("pca.safetensors")).unwrap();
    check(m.path(), &["pca.safetensors", "missing"]);

    let m = tiny_copy();
    std::fs::remove_file(m.path().join("encoder/config.json")).unwrap();
    check(m.path(), &["encoder/config.json", "missing"]);

    let m = tiny_copy();
    std::fs::write(m.path().join("encoder/config.json"), "{ not json").unwrap();
    check(m.path(), &["encoder/config.json", "bad config"]);

    let m = tiny_copy();
    std::fs::write(
        m.path().join("encoder/config.json"),
        r#"{"hidden_size": 30, "num_attention_heads": 4}"#,
    )
    .unwrap();
    check(m.path(), &["encoder/config.json", "divisible"]);

    let m = tiny_copy();
    let cfg = std::fs::read_to_string(m.path().join("encoder/config.json")).unwrap();
    std::fs::write(
        m.path().join("encoder/config.json"),
        cfg.replace("\"hidden_size\": 32", "\"hidden_size\": 64"),
    )
    .unwrap();
    // The configs disagree before any weight is read.
    check(m.path(), &["encoder/config.json", "hidden_size is 64"]);

    let m = tiny_copy();
    let w = m.path().join("encoder/model.safetensors");
    let mut t = candle_core::safetensors::load(&w, &Device::Cpu).unwrap();
    t.remove("encoder.layer.1.mlp.fc2.weight");
    candle_core::safetensors::save(&t, &w).unwrap();
    check(
        m.path(),
        &["model.safetensors", "encoder.layer.1.mlp.fc2.weight"],
    );

    let m = tiny_copy();
    let w = m.path().join("encoder/model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 3]).unwrap();
    check(m.path(), &["model.safetensors"]);

    let m = tiny_copy();
    let p = m.path().join("pca.safetensors");
    let pca: std::collections::HashMap<String, Tensor> = [
        (
            "mean".to_string(),
            Tensor::zeros(32, candle_core::DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "components".to_string(),
            Tensor::zeros((4, 31), candle_core::DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "explained_variance".to_string(),
            Tensor::ones(4, candle_core::DType::F32, &Device::Cpu).unwrap(),
        ),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&pca, &p).unwrap();
    check(m.path(), &["pca.safetensors", "components"]);

    let m = tiny_copy();
    std::fs::write(m.path().join("lumen.json"), r#"{"layout_sise": 10}"#).unwrap();
    check(m.path(), &["lumen.json", "layout_sise"]);

    for (settings, needle) in [
        (
            r#"{"default_steps": 0}"#,
            "default_steps must be at least 1",
        ),
        (r#"{"default_size": 0}"#, "default_size must be at least 1"),
        (
            r#"{"default_guidance_scale": 1e9}"#,
            "default_guidance_scale",
        ),
        (
            r#"{"min_size": 128, "max_size": 64}"#,
            "min_size 128 is above max_size 64",
        ),
        (
            r#"{"default_size": 256, "max_size": 128}"#,
            "default_size 256 is outside min_size..=max_size",
        ),
    ] {
        let m = tiny_copy();
        std::fs::write(m.path().join("lumen.json"), settings).unwrap();
        check(m.path(), &["lumen.json", needle]);
    }
}

/// Every colour mode and container decodes to the same RGB content.
#[test]
fn colour_modes_and_formats_give_consistent_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, g) = tiny_guide();
    let rgb = image::open(&img).unwrap().to_rgb8();
    let layout_of = |p: &Path| {
        let out = tmp.path().join("l.safetensors");
        let ls = g.layout_size.to_string();
        let o = lumen(&[
            "layout",
            "--image",
            s(p),
            "-k",
            "4",
            "--layout-size",
            &ls,
            "--out",
            s(&out),
        ]);
        assert!(
            o.status.success(),
            "{p:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        candle_core::safetensors::load(&out, &Device::Cpu).unwrap()["layout"].clone()
    };
    let base = layout_of(&img);

    // Lossless containers and opaque alpha / 16-bit depth: identical pixels.
    let rgba = tmp.path().join("rgba.png");
    image::DynamicImage::ImageRgb8(rgb.clone())
        .to_rgba8()
        .save(&rgba)
        .unwrap();
    let rgb16 = tmp.path().join("rgb16.png");
    image::DynamicImage::ImageRgb8(rgb.clone())
        .to_rgb16()
        .save(&rgb16)
        .unwrap();
    let webp = tmp.path().join("lossless.webp");
    image::DynamicImage::ImageRgb8(rgb.clone())
        .save(&webp)
        .unwrap();
    for p in [&rgba, &rgb16, &webp] {
        assert_eq!(
            common::to_vec(&layout_of(p)),
            common::to_vec(&base),
            "{p:?}"
        );
    }
    // Grey and JPEG: decodable, right shape.
    let grey = tmp.path().join("grey.png");
    image::DynamicImage::ImageRgb8(rgb.clone())
        .to_luma8()
        .save(&grey)
        .unwrap();
    let jpeg = tmp.path().join("photo.jpg");
    image::DynamicImage::ImageRgb8(rgb.clone())
        .save(&jpeg)
        .unwrap();
    for p in [&grey, &jpeg] {
        assert_eq!(layout_of(p).dims(), base.dims(), "{p:?}");
    }
    // A JPEG cut short is refused.
    let bytes = std::fs::read(&jpeg).unwrap();
    let cut = tmp.path().join("cut.jpg");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(
        &[
            "layout",
            "--image",
            s(&cut),
            "--out",
            s(&tmp.path().join("x.png")),
        ],
        &["invalid image"],
    );
}
