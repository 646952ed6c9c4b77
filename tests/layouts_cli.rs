//! `lumen layouts`: the dataset export equals `lumen layout` image by image,
//! carries the captions, skips unreadable images, and resumes.

mod common;

use std::collections::HashSet;
use std::path::Path;

use candle_core::{DType, Device};
use common::{fails_with, ok, root, s};
use serde_json::Value;

fn rows(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("index.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn summary(stdout: &str) -> Value {
    serde_json::from_str(stdout).expect("a JSON summary")
}

/// A folder: five guides (two nested), captions both ways, one broken file.
fn image_folder(dir: &Path) {
    let fixtures = root().join("tests/fixtures/images");
    std::fs::create_dir_all(dir.join("street/more")).unwrap();
    for (from, to) in [
        ("tiny-street.png", "street/a.png"),
        ("registers-street.png", "street/more/b.png"),
        ("tiny-portrait.png", "c.png"),
        ("tiny-room.png", "d.png"),
        ("registers-wide.png", "e.png"),
    ] {
        std::fs::copy(fixtures.join(from), dir.join(to)).unwrap();
    }
    std::fs::write(dir.join("broken.png"), b"not an image").unwrap();
    std::fs::write(dir.join("c.txt"), "a portrait\n").unwrap();
    std::fs::write(
        dir.join("street/metadata.jsonl"),
        "{\"file_name\": \"a.png\", \"text\": \"a quiet street\"}\n\
         {\"file_name\": \"more/b.png\", \"text\": \"another street\"}\n",
    )
    .unwrap();
}

#[test]
fn export_equals_the_layout_command_and_resumes_without_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    let out = tmp.path().join("layouts");
    image_folder(&images);
    let args = [
        "layouts",
        "--images",
        s(&images),
        "--out",
        s(&out),
        "--shard-size",
        "2",
        "--batch",
        "3",
        "--quiet",
    ];
    let first = summary(&ok(&args));
    assert_eq!(first["images"], 6);
    assert_eq!(first["rows"], 5);
    assert_eq!(first["shards"], 3);
    assert_eq!(first["skipped"][0]["source"], "broken.png");

    let index = rows(&out);
    let captions: Vec<(&str, Option<&str>)> = index
        .iter()
        .map(|r| (r["source"].as_str().unwrap(), r["caption"].as_str()))
        .collect();
    assert_eq!(
        captions,
        vec![
            ("c.png", Some("a portrait")),
            ("d.png", None),
            ("e.png", None),
            ("street/a.png", Some("a quiet street")),
            ("street/more/b.png", Some("another street")),
        ]
    );
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("dataset.json")).unwrap()).unwrap();
    assert_eq!(manifest["components"], 16);
    assert_eq!(manifest["layout_size"], 518);
    assert_eq!(manifest["pca_sha256"].as_str().unwrap().len(), 64);

    // Each row is what `lumen layout` computes for its image (f16 storage).
    for r in &index {
        let shard =
            candle_core::safetensors::load(out.join(r["shard"].as_str().unwrap()), &Device::Cpu)
                .unwrap();
        let got = &shard[&r["row"].as_u64().unwrap().to_string()];
        assert_eq!(got.dtype(), DType::F16);
        let single = tmp.path().join("one.safetensors");
        let src = images.join(r["source"].as_str().unwrap());
        ok(&[
            "layout",
            "--image",
            s(&src),
            "-k",
            "16",
            "--out",
            s(&single),
        ]);
        let want = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
        let want = &want["layout"];
        let grid = [
            r["grid"][0].as_u64().unwrap() as usize,
            r["grid"][1].as_u64().unwrap() as usize,
        ];
        assert_eq!(want.dims(), &[16, grid[0], grid[1]], "{}", r["source"]);
        common::assert_close(r["source"].as_str().unwrap(), got, want, 2e-3);
        let (w, h) = image::image_dimensions(&src).unwrap();
        assert_eq!(
            (r["width"].as_u64(), r["height"].as_u64()),
            (Some(w as u64), Some(h as u64))
        );
    }

    // An interrupted run: shard 1 never finished (its index is missing, a
    // temporary file is left over), and the merged index was not written.
    std::fs::remove_file(out.join("shard-00001.jsonl")).unwrap();
    std::fs::write(out.join("shard-00001.safetensors.tmp"), b"half").unwrap();
    std::fs::remove_file(out.join("index.jsonl")).unwrap();
    let again = summary(&ok(&args));
    assert_eq!(again["shards_reused"], 2);
    assert_eq!(again["processed"], 2, "only the unfinished shard is redone");
    let resumed = rows(&out);
    assert_eq!(resumed, index, "the same rows, once each");
    let unique: HashSet<&str> = resumed
        .iter()
        .map(|r| r["source"].as_str().unwrap())
        .collect();
    assert_eq!(unique.len(), resumed.len());

    // A finished export reruns as a no-op; other inputs are refused by name.
    assert_eq!(summary(&ok(&args))["processed"], 0);
    let mut other = args.to_vec();
    other[6] = "4";
    fails_with(&other, &["`out`", "shard size"]);
    std::fs::copy(images.join("d.png"), images.join("f.png")).unwrap();
    fails_with(&args, &["`out`", "image list"]);
    fails_with(
        &[
            "layouts",
            "--images",
            s(&tmp.path().join("none")),
            "--out",
            s(&out),
        ],
        &["`images`"],
    );
}
