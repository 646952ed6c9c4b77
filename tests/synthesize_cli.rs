//! `lumen synthesize` end to end on the random `models/tiny`: the PNG matches
//! diffusers' reference, carries its parameters, seeds are batch-invariant,
//! and bad input is refused with a clear message.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{fails_with, ok, root, s};

fn sd_case() -> serde_json::Value {
    let text =
        std::fs::read_to_string(root().join("tests/fixtures/reference/sd_cases.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["tiny"].clone()
}

fn guide() -> String {
    root()
        .join("tests/fixtures/images/tiny-street.png")
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn png_matches_diffusers_and_carries_parameters() {
    let case = sd_case();
    let refs: HashMap<String, Tensor> = candle_core::safetensors::load(
        root().join("tests/fixtures/reference/sd-tiny.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let latents = tmp.path().join("latents.safetensors");
    let map: HashMap<String, Tensor> = [("latents".to_string(), refs["latents"].clone())]
        .into_iter()
        .collect();
    candle_core::safetensors::save(&map, &latents).unwrap();
    let out = tmp.path().join("img.png");
    let num = |k: &str| case[k].to_string();
    let (prompt, negative) = (
        case["prompt"].as_str().unwrap(),
        case["negative_prompt"].as_str().unwrap(),
    );
    let g = guide();
    ok(&[
        "synthesize",
        "--image",
        &g,
        "--layout-size",
        &num("layout_size"),
        "-k",
        &num("components"),
        "--width",
        &num("width"),
        "--height",
        &num("height"),
        "--steps",
        &num("steps"),
        "--guidance",
        &num("guidance"),
        "--control-scale",
        &num("control_scale"),
        "--scheduler",
        "ddim",
        "--prompt",
        prompt,
        "--negative-prompt",
        negative,
        "--latents",
        s(&latents),
        "--quiet",
        "--out",
        s(&out),
    ]);
    let bytes = std::fs::read(&out).unwrap();
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    let want = refs["ddim.image"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let diffs: Vec<i32> = img
        .as_raw()
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .collect();
    assert_eq!(diffs.len(), want.len());
    let max = *diffs.iter().max().unwrap();
    let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
    assert!(max <= 3 && mean <= 0.5, "image max |Δ| {max}, mean {mean}");

    let meta = lumen::png_text::read(&bytes, lumen::png_text::KEYWORD).expect("parameters chunk");
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["prompt"], prompt);
    assert_eq!(meta["negative_prompt"], negative);
    assert_eq!(meta["scheduler"], "ddim");
    assert_eq!(meta["steps"], case["steps"]);
    assert_eq!(meta["components"], case["components"]);
    assert_eq!(meta["width"], case["width"]);
    // The model by content: what the library computes for the folder.
    let tiny = lumen::model_folder::ModelSource::Dir(common::tiny_models().into());
    assert_eq!(meta["model"], tiny.identity().unwrap());
}

#[test]
fn seeds_give_the_same_image_alone_or_in_a_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let g = guide();
    let common = [
        "--steps", "3", "--width", "48", "--height", "32", "--quiet", "--prompt", "a house",
    ];
    let batch = tmp.path().join("b.png");
    let stdout = ok(&[
        &[
            "synthesize",
            "--image",
            &g,
            "--seed",
            "41",
            "--num-images",
            "2",
            "--out",
            s(&batch),
        ][..],
        &common,
    ]
    .concat());
    assert!(
        stdout.contains("seed 41") && stdout.contains("seed 42"),
        "{stdout}"
    );
    let alone = tmp.path().join("a.png");
    ok(&[
        &[
            "synthesize",
            "--image",
            &g,
            "--seed",
            "42",
            "--out",
            s(&alone),
        ][..],
        &common,
    ]
    .concat());
    let second = image::open(tmp.path().join("b-1.png")).unwrap().to_rgb8();
    let single = image::open(&alone).unwrap().to_rgb8();
    let first = image::open(tmp.path().join("b-0.png")).unwrap().to_rgb8();
    assert_eq!(second.dimensions(), (48, 32));
    let max = second
        .as_raw()
        .iter()
        .zip(single.as_raw())
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .max()
        .unwrap();
    assert!(max <= 1, "seed 42 batched vs alone differs by {max}");
    assert_ne!(
        first.as_raw(),
        second.as_raw(),
        "different seeds, different images"
    );
    let meta = lumen::png_text::read(
        &std::fs::read(tmp.path().join("b-1.png")).unwrap(),
        "parameters",
    )
    .unwrap();
    assert!(meta.contains("\"seed\":42"), "{meta}");
}

#[test]
fn default_size_follows_the_guide() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("d.png");
    ok(&[
        "synthesize",
        "--image",
        &guide(),
        "--steps",
        "1",
        "--guidance",
        "1",
        "--quiet",
        "--out",
        s(&out),
    ]);
    // Guide 98×70 → longer side 512, shorter 512·70/98 = 365.7 → nearest multiple of 16 = 368.
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (512, 368));
}

/// A writable copy of models/tiny.
fn tiny_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&root().join("models/tiny"), dir.path());
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dst = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).unwrap();
        }
    }
}

#[test]
fn bad_requests_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.png");
    let g = guide();
    let base = [
        "synthesize",
        "--image",
        g.as_str(),
        "--quiet",
        "--out",
        s(&out),
    ];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }
    fails_with(
        &with(&base, &["--scheduler", "pndm"]),
        &["`scheduler`", "ddim"],
    );
    fails_with(
        &with(&base, &["--width", "40", "--height", "32"]),
        &["`width`", "multiple of 16"],
    );
    fails_with(&with(&base, &["--steps", "0"]), &["`steps`"]);
    fails_with(&with(&base, &["--steps", "1001"]), &["`steps`"]);
    fails_with(
        &with(&base, &["--guidance", "NaN"]),
        &["`guidance_scale`", "finite"],
    );
    fails_with(
        &with(&base, &["--control-scale", "inf"]),
        &["`control_scale`", "finite"],
    );
    fails_with(&with(&base, &["-k", "17"]), &["`components`", "1 to 16"]);
    fails_with(
        &with(&base, &["--num-images", "2", "--latents", "x.safetensors"]),
        &["`latents`"],
    );
    fails_with(
        &with(
            &base,
            &["--latents", s(&tmp.path().join("none.safetensors"))],
        ),
        &["`latents`"],
    );

    let m = tiny_copy();
    std::fs::remove_dir_all(m.path().join("controlnet")).unwrap();
    fails_with(
        &with(&base, &["--models", s(m.path())]),
        &["controlnet", "component"],
    );

    let m = tiny_copy();
    let pca = m.path().join("pca.safetensors");
    let mut t = candle_core::safetensors::load(&pca, &Device::Cpu).unwrap();
    for k in ["components", "explained_variance"] {
        let v = t[k].narrow(0, 0, 12).unwrap();
        t.insert(k.to_string(), v);
    }
    candle_core::safetensors::save(&t, &pca).unwrap();
    std::fs::write(m.path().join("lumen.json"), "{}").unwrap();
    fails_with(
        &with(&base, &["--models", s(m.path())]),
        &["conditioning_channels", "12"],
    );
}

#[test]
fn dtype_and_output_format_follow_the_request_model() {
    let tmp = tempfile::tempdir().unwrap();
    let g = guide();
    let run_with = |dtype: &str, extra: &[&str], out: &Path| {
        let mut args = vec![
            "synthesize",
            "--image",
            &g,
            "--steps",
            "3",
            "--width",
            "48",
            "--height",
            "32",
            "--seed",
            "3",
            "--quiet",
            "--dtype",
            dtype,
            "--out",
            s(out),
        ];
        args.extend(extra);
        ok(&args);
        image::open(out).unwrap().to_rgb8()
    };
    let run = |dtype: &str, out: &Path| run_with(dtype, &[], out);
    let f32_img = run("f32", &tmp.path().join("a.png"));
    // The f16 VAE: overriding the config's force_upcast (true in models/tiny).
    let f16_img = run_with("f16", &["--vae-upcast=false"], &tmp.path().join("b.png"));
    let max = f32_img
        .as_raw()
        .iter()
        .zip(f16_img.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(max <= 16, "f16 vs f32: max {max}/255");
    // --vae-upcast: the VAE decodes in f32, so the image moves towards f32's.
    let upcast = run_with("f16", &["--vae-upcast"], &tmp.path().join("u.png"));
    let mean = |x: &image::RgbImage| {
        f32_img
            .as_raw()
            .iter()
            .zip(x.as_raw())
            .map(|(a, b)| a.abs_diff(*b) as f64)
            .sum::<f64>()
            / x.as_raw().len() as f64
    };
    assert_ne!(upcast, f16_img, "--vae-upcast changed nothing");
    // Without the flag, the VAE config's force_upcast (true) decides.
    let default = run("f16", &tmp.path().join("d.png"));
    assert_eq!(
        default, upcast,
        "force_upcast: true in vae/config.json was not followed"
    );
    assert!(
        mean(&upcast) <= mean(&f16_img),
        "upcast {} vs f16 {} (mean |Δ| to f32)",
        mean(&upcast),
        mean(&f16_img)
    );
    let meta = lumen::png_text::read(
        &std::fs::read(tmp.path().join("a.png")).unwrap(),
        "parameters",
    )
    .unwrap();
    assert!(meta.contains("\"format\":\"png\""), "{meta}");

    // .webp (lossless) is the same image; its format is in the record of a PNG only.
    let webp = run("f32", &tmp.path().join("c.webp"));
    assert_eq!(webp, f32_img);
    assert!(std::fs::read(tmp.path().join("c.webp"))
        .unwrap()
        .starts_with(b"RIFF"));

    let bad = |extra: &[&str], needles: &[&str]| {
        let mut args = vec!["synthesize", "--image", g.as_str(), "--quiet"];
        args.extend_from_slice(extra);
        fails_with(&args, needles);
    };
    bad(&["--dtype", "fp8", "--out", "x.png"], &["`dtype`", "fp8"]);
    bad(
        &["--dtype", "bf16", "--out", "x.png"],
        &["`dtype`", "bf16", "CUDA only"],
    );
    bad(&["--out", "x.gif"], &["`out`", ".webp"]);
    // Limits are the API's: at most 8 images, guidance within ±1000.
    bad(&["--num-images", "9", "--out", "x.png"], &["`num_images`"]);
    bad(
        &["--guidance", "5000", "--out", "x.png"],
        &["`guidance_scale`"],
    );
}
