//! `lumen augment` end to end on the embedded shapes model: labels aligned
//! with the outputs (pixel-exact on constructed masks, boxes, polygons and
//! RLE), resume after `kill -9`, shards covering the dataset exactly once,
//! every kind of bad input listed and skipped, and the remote mode against
//! spawned `lumen serve` replicas that answer 429 and die mid-run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{root, s};
use serde_json::{json, Value};

/// Few steps: the tests check plumbing, not image quality.
const STEPS: &str = "4";

/// Run `lumen augment` on the embedded model.
fn augment<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lumen"))
        .arg("augment")
        .args(args)
        .args(["--steps", STEPS, "--quiet"])
        .env_remove("RUST_LOG")
        .env_remove("LUMEN_MODELS")
        .output()
        .expect("lumen runs")
}

fn augment_ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let o = augment(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The shapes guides, downscaled to `side` (nearest, so colours stay pure).
fn guide(i: usize, side: u32) -> image::RgbImage {
    let name = [
        "shapes-guide.png",
        "shapes-guide-2.png",
        "shapes-guide-3.png",
    ][i % 3];
    let img = image::open(root().join("tests/fixtures/images").join(name))
        .unwrap()
        .to_rgb8();
    let img = if i >= 3 {
        image::imageops::flip_horizontal(&img)
    } else {
        img
    };
    image::imageops::resize(&img, side, side, image::imageops::FilterType::Nearest)
}

fn put(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// `--input INPUT --out OUT` and `extra`.
fn job(input: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "--input".to_string(),
        s(input).to_string(),
        "--out".into(),
        s(out).to_string(),
    ];
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

fn png_of(img: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

const PALETTE: [u8; 12] = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255];

/// An indexed (palette) PNG class map: class = (x / 5 + 2 * (y / 7)) % 4.
fn palette_mask(w: u32, h: u32) -> (Vec<u8>, Vec<u8>) {
    let idx: Vec<u8> = (0..h)
        .flat_map(|y| (0..w).map(move |x| ((x / 5 + 2 * (y / 7)) % 4) as u8))
        .collect();
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w, h);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(PALETTE.to_vec());
        let mut wr = enc.write_header().unwrap();
        wr.write_image_data(&idx).unwrap();
    }
    (bytes, idx)
}

/// Raw indices and palette of an indexed PNG.
fn read_indexed(path: &Path) -> (u32, u32, Vec<u8>, Vec<u8>) {
    let mut dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Indexed);
    let palette = r.info().palette.as_ref().unwrap().to_vec();
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf, palette)
}

/// The lines of a JSON-lines file under OUT (none if it is not there).
fn jsonl(out: &Path, name: &str) -> Vec<Value> {
    std::fs::read_to_string(out.join(name))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn manifest(out: &Path) -> Vec<Value> {
    jsonl(out, "manifest.jsonl")
}

/// The rows of `metadata.jsonl`.
fn metadata(out: &Path) -> Vec<Value> {
    jsonl(out, "metadata.jsonl")
}

/// `metadata.jsonl` describes exactly the manifest's outputs.
fn assert_metadata_matches_manifest(out: &Path) {
    let rows: BTreeMap<String, Value> = metadata(out)
        .into_iter()
        .map(|r| (r["file_name"].as_str().unwrap().to_string(), r))
        .collect();
    let lines = manifest(out);
    assert_eq!(rows.len(), lines.len());
    for l in &lines {
        let row = &rows[l["output"].as_str().unwrap()];
        assert_eq!(row["text"], l["prompt"]);
        assert_eq!(row["seed"], l["seed"]);
        assert_eq!(row["source"], l["source"]);
        assert!(out.join(row["file_name"].as_str().unwrap()).is_file());
    }
}

/// The output images of a run: path relative to OUT → bytes.
fn outputs(out: &Path) -> BTreeMap<String, Vec<u8>> {
    manifest(out)
        .iter()
        .map(|l| {
            let rel = l["output"].as_str().unwrap().to_string();
            let bytes = std::fs::read(out.join(&rel)).unwrap();
            (rel, bytes)
        })
        .collect()
}

/// A dataset of `n` 64×64 shapes guides (`sub/` holds the odd ones) with captions.
fn plain_dataset(dir: &Path, n: usize) -> PathBuf {
    let images = dir.join("images");
    for i in 0..n {
        let rel = if i % 2 == 1 {
            format!("sub/g{i}.png")
        } else {
            format!("g{i}.png")
        };
        put(&images.join(&rel), &png_of(&guide(i, 64)));
    }
    images
}

#[test]
fn labels_follow_the_outputs_pixel_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Two 32×32 guides; the model's default size makes 64×64 outputs: ×2.
    let (mask_png, idx) = palette_mask(32, 32);
    for rel in ["a.png", "sub/b.png"] {
        put(&d.join("in").join(rel), &png_of(&guide(rel.len(), 32)));
        put(&d.join("masks").join(rel), &mask_png);
    }
    put(
        &d.join("yolo/a.txt"),
        b"0 0.25 0.5 0.125 0.25\n2 0.7 0.3 0.2 0.1\n",
    );
    // COCO: a box + polygon, an RLE (compressed) 4×6 block at (3, 5), and an
    // image entry whose file does not exist.
    let mut rle = vec![0u8; 32 * 32];
    for x in 3..7 {
        for y in 5..11 {
            rle[x * 32 + y] = 1; // column-major
        }
    }
    let counts = runs(&rle);
    let coco = json!({
        "info": {"description": "constructed"},
        "categories": [{"id": 1, "name": "thing"}],
        "images": [
            {"id": 7, "file_name": "a.png", "width": 32, "height": 32},
            {"id": 8, "file_name": "sub/b.png", "width": 32, "height": 32},
            {"id": 9, "file_name": "gone.png", "width": 32, "height": 32},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": 80.0,
             "bbox": [4, 6, 10, 8], "segmentation": [[4, 6, 14, 6, 14, 14, 4, 14]]},
            {"id": 2, "image_id": 8, "category_id": 1, "iscrowd": 1, "area": 24,
             "bbox": [3, 5, 4, 6],
             "segmentation": {"size": [32, 32], "counts": lumen::jobs::augment::coco::rle_to_string(&counts)}},
            {"id": 3, "image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1]},
        ],
    });
    put(&d.join("coco.json"), coco.to_string().as_bytes());
    let out = d.join("out");
    let (input, masks, yolo, coco_file) = (
        d.join("in"),
        d.join("masks"),
        d.join("yolo"),
        d.join("coco.json"),
    );
    let args = [
        "--input",
        s(&input),
        "--out",
        s(&out),
        "--masks",
        s(&masks),
        "--yolo",
        s(&yolo),
        "--coco",
        s(&coco_file),
        "--per-image",
        "2",
        "--components",
        "1,8",
        "--seed",
        "7",
    ];
    let summary = augment_ok(&args);
    assert!(summary.contains("8 images written"), "{summary}");
    assert!(
        summary.contains("gone.png") && summary.contains("missing"),
        "{summary}"
    );
    let lines = manifest(&out);
    assert_eq!(lines.len(), 8);
    let names: BTreeSet<&str> = lines
        .iter()
        .map(|l| l["output"].as_str().unwrap())
        .collect();
    for n in [
        "images/a-k1-v0.png",
        "images/a-k8-v1.png",
        "images/sub/b-k1-v1.png",
        "images/sub/b-k8-v0.png",
    ] {
        assert!(names.contains(n), "{names:?}");
    }
    for l in &lines {
        for field in [
            "source",
            "output",
            "labels",
            "seed",
            "components",
            "prompt",
            "score",
            "negative_prompt",
            "steps",
            "scheduler",
            "guidance_scale",
            "control_scale",
            "model",
            "timings",
        ] {
            assert!(l.get(field).is_some(), "{field} missing in {l}");
        }
        assert_eq!(l["steps"], 4);
        let score = l["score"].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&score), "{l}");
        let out_img = image::open(out.join(l["output"].as_str().unwrap())).unwrap();
        assert_eq!((out_img.width(), out_img.height()), (64, 64));
        // The mask: every output pixel is the source pixel (x / 2, y / 2), palette kept.
        let mask_rel = l["labels"][0].as_str().unwrap();
        assert!(mask_rel.starts_with("masks/"), "{l}");
        let (w, h, got, palette) = read_indexed(&out.join(mask_rel));
        assert_eq!((w, h), (64, 64));
        assert_eq!(palette, PALETTE);
        for y in 0..64usize {
            for x in 0..64usize {
                assert_eq!(got[y * 64 + x], idx[(y / 2) * 32 + x / 2], "({x}, {y})");
            }
        }
    }
    // Seeds: the same variant has the same seed at every K, another variant another.
    let seed = |o: &str| {
        lines.iter().find(|l| l["output"] == o).unwrap()["seed"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(seed("images/a-k1-v0.png"), seed("images/a-k8-v0.png"));
    assert_ne!(seed("images/a-k1-v0.png"), seed("images/a-k1-v1.png"));
    // YOLO copied unchanged for a.png only (b has no file: a background image).
    assert_eq!(
        std::fs::read(out.join("labels/a-k8-v1.txt")).unwrap(),
        b"0 0.25 0.5 0.125 0.25\n2 0.7 0.3 0.2 0.1\n"
    );
    assert!(!out.join("labels/sub").exists());
    // COCO: 8 images with new ids, geometry ×2.
    let ann: Value =
        serde_json::from_slice(&std::fs::read(out.join("annotations.json")).unwrap()).unwrap();
    assert_eq!(ann["info"], coco["info"]);
    assert_eq!(ann["categories"], coco["categories"]);
    let images = ann["images"].as_array().unwrap();
    assert_eq!(images.len(), 8);
    let ids: BTreeSet<u64> = images.iter().map(|i| i["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), 8);
    for l in &lines {
        let id = l["coco_image_id"].as_u64().unwrap();
        let entry = images.iter().find(|i| i["id"] == id).unwrap();
        assert_eq!(
            format!("images/{}", entry["file_name"].as_str().unwrap()),
            l["output"].as_str().unwrap()
        );
        assert_eq!(
            (entry["width"].as_u64(), entry["height"].as_u64()),
            (Some(64), Some(64))
        );
        let anns: Vec<&Value> = ann["annotations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["image_id"] == id)
            .collect();
        assert_eq!(anns.len(), 1, "{l}");
        let a = anns[0];
        let bbox: Vec<f64> = a["bbox"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        if l["source"] == "a.png" {
            assert_eq!(bbox, [8.0, 12.0, 20.0, 16.0]);
            let poly: Vec<f64> = a["segmentation"][0]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(poly, [8.0, 12.0, 28.0, 12.0, 28.0, 28.0, 8.0, 28.0]);
            assert_eq!(a["area"].as_f64(), Some(320.0));
        } else {
            assert_eq!(bbox, [6.0, 10.0, 8.0, 12.0]);
            assert_eq!(a["segmentation"]["size"], json!([64, 64]));
            let counts = lumen::jobs::augment::coco::rle_from_string(
                a["segmentation"]["counts"].as_str().unwrap(),
            )
            .unwrap();
            let mut want = vec![0u8; 64 * 64];
            for x in 6..14 {
                for y in 10..22 {
                    want[x * 64 + y] = 1;
                }
            }
            assert_eq!(counts, runs(&want));
            assert_eq!(a["area"].as_f64(), Some(96.0));
            assert_eq!(a["iscrowd"], 1);
        }
    }
    let ann_ids: BTreeSet<u64> = ann["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ann_ids.len(), 8);

    // metadata.jsonl: the Hugging Face imagefolder view, objects from COCO.
    assert_metadata_matches_manifest(&out);
    for row in metadata(&out) {
        let l = lines
            .iter()
            .find(|l| l["output"] == row["file_name"])
            .unwrap();
        assert_eq!(row["mask_file_name"], l["labels"][0]);
        let id = l["coco_image_id"].as_u64().unwrap();
        let a = ann["annotations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["image_id"] == id)
            .unwrap();
        assert_eq!(
            row["objects"],
            json!({"bbox": [a["bbox"]], "categories": [1]})
        );
    }
    // classes.json: every value and id, named only where the input names it.
    let classes: Value =
        serde_json::from_slice(&std::fs::read(out.join("classes.json")).unwrap()).unwrap();
    let mask_classes: Vec<Value> = (0..4)
        .map(|v| json!({"value": v, "name": null, "colour": &PALETTE[v * 3..v * 3 + 3]}))
        .collect();
    assert_eq!(
        classes,
        json!({
            "masks": {"names_from": null, "classes": mask_classes},
            "coco": {"names_from": s(&coco_file), "classes": [{"id": 1, "name": "thing"}]},
            "yolo": {"names_from": null, "classes": [
                {"id": 0, "name": null}, {"id": 1, "name": null}, {"id": 2, "name": null}
            ]},
            "objects": "coco",
        })
    );
    let yaml = std::fs::read_to_string(out.join("data.yaml")).unwrap();
    assert!(
        yaml.ends_with("train: images\nval: images\nnames:\n  0: null\n  1: null\n  2: null\n"),
        "{yaml}"
    );

    // A rerun finds everything done and changes nothing.
    let before = outputs(&out);
    let manifest_before = std::fs::read(out.join("manifest.jsonl")).unwrap();
    let again = augment_ok(&args);
    assert!(
        again.contains("0 images written by this run, 8 done before"),
        "{again}"
    );
    assert_eq!(outputs(&out), before);
    assert_eq!(
        std::fs::read(out.join("manifest.jsonl")).unwrap(),
        manifest_before
    );
    // Another job into the same folder is refused, naming what differs.
    let mut other = args.to_vec();
    let last = other.len() - 1;
    other[last] = "8";
    let o = augment(&other);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("another augment job") && err.contains("seed"),
        "{err}"
    );
}

/// COCO's run lengths of a column-major binary mask (starting with zeros).
fn runs(m: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    let (mut cur, mut n) = (0u8, 0u64);
    for &v in m {
        if v != cur {
            out.push(n);
            cur = v;
            n = 0;
        }
        n += 1;
    }
    out.push(n);
    out
}

#[test]
fn killed_mid_run_resumes_without_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let input = plain_dataset(tmp.path(), 3);
    let (out, reference) = (tmp.path().join("out"), tmp.path().join("ref"));
    let args = |o: &Path| job(&input, o, &["--per-image", "3", "--components", "8"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_lumen"))
        .arg("augment")
        .args(args(&out))
        .args(["--steps", STEPS, "--quiet"])
        .env_remove("LUMEN_MODELS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while manifest(&out).len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(120), "no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = manifest(&out).len();
    assert!((2..9).contains(&partial), "{partial}");
    // Every file with a final name is whole.
    for entry in walk(&out.join("images")) {
        if entry.extension().is_some_and(|e| e == "png") {
            image::open(&entry).unwrap_or_else(|e| panic!("{}: {e}", entry.display()));
        }
    }
    resumes_as_if_never_stopped(&args(&out), &out, &args(&reference), partial, 9);
}

/// A rerun after a stop with `partial` of `total` outputs done makes only
/// the rest, without duplicates or temporary files, and the same images as
/// a run that was never stopped (`reference`).
fn resumes_as_if_never_stopped(
    rerun: &[String],
    out: &Path,
    reference: &[String],
    partial: usize,
    total: usize,
) {
    let summary = augment_ok(rerun);
    assert!(
        summary.contains(&format!(
            "{} images written by this run, {partial} done before",
            total - partial
        )),
        "{summary}"
    );
    let lines = manifest(out);
    let unique: BTreeSet<&str> = lines
        .iter()
        .map(|l| l["output"].as_str().unwrap())
        .collect();
    assert_eq!((lines.len(), unique.len()), (total, total));
    assert!(walk(out)
        .iter()
        .all(|p| !p.to_string_lossy().ends_with(".tmp")));
    assert_metadata_matches_manifest(out);
    augment_ok(reference);
    let reference_out =
        PathBuf::from(&reference[reference.iter().position(|a| a == "--out").unwrap() + 1]);
    assert_eq!(outputs(out), outputs(&reference_out));
}

/// SIGTERM (as `kubectl delete` or `podman stop` send it) stops the job
/// cleanly: what was in flight is recorded, the summary says a rerun
/// continues, the status is 143; with stderr not a terminal, progress came
/// as log lines. The rerun gives the images of an uninterrupted run.
#[test]
fn sigterm_stops_with_the_summary_and_a_rerun_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let input = plain_dataset(tmp.path(), 3);
    let (out, reference) = (tmp.path().join("out"), tmp.path().join("ref"));
    let args = |o: &Path| job(&input, o, &["--per-image", "3", "--components", "8"]);
    let child = Command::new(env!("CARGO_BIN_EXE_lumen"))
        .arg("augment")
        .args(args(&out))
        .args(["--steps", STEPS, "--progress-every-s", "0.05"])
        .env_remove("LUMEN_MODELS")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while manifest(&out).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let o = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(143), "{stdout}\n{stderr}");
    let partial = manifest(&out).len();
    assert!((1..9).contains(&partial), "{partial}: {stdout}");
    assert!(
        stdout.contains(&format!("{partial} images written by this run"))
            && stdout.contains("interrupted by SIGTERM")
            && stdout.contains("rerun the same command to continue"),
        "{stdout}"
    );
    assert!(!stdout.contains("incomplete"), "{stdout}");
    assert!(
        stderr.contains("augment progress") && stderr.contains("augment interrupted"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_metadata_matches_manifest(&out);
    resumes_as_if_never_stopped(&args(&out), &out, &args(&reference), partial, 9);
}

/// A rerun with a higher `--min-score` removes the earlier outputs it now
/// refuses; one with none makes them again, the same bytes.
#[test]
fn a_changed_min_score_is_reapplied_on_a_rerun() {
    let tmp = tempfile::tempdir().unwrap();
    let input = plain_dataset(tmp.path(), 3);
    let out = tmp.path().join("out");
    let args = |extra: &[&str]| {
        let mut a = job(&input, &out, &["--per-image", "2", "--components", "1,8"]);
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    augment_ok(&args(&[]));
    let all = outputs(&out);
    let mut scores: Vec<f64> = manifest(&out)
        .iter()
        .map(|l| l["score"].as_f64().unwrap())
        .collect();
    scores.sort_by(f64::total_cmp);
    assert_eq!(scores.len(), 12);
    // A threshold between two recorded scores: half of them fall below.
    let min = (scores[5] + scores[6]) / 2.0;
    assert!(scores[5] < scores[6], "{scores:?}");
    let summary = augment_ok(&args(&["--min-score", &min.to_string()]));
    assert!(
        summary.contains("0 images written by this run, 6 done before")
            && summary.contains("re-filtered: 6 images")
            && summary.contains("filtered: 6 images scored below"),
        "{summary}"
    );
    let kept = manifest(&out);
    assert_eq!(kept.len(), 6);
    assert!(kept.iter().all(|l| l["score"].as_f64().unwrap() >= min));
    assert_metadata_matches_manifest(&out);
    let images = walk(&out.join("images"));
    assert_eq!(
        images.len(),
        6,
        "refused outputs' files removed: {images:?}"
    );
    // Without the filter, the refused ones come back, byte for byte.
    let summary = augment_ok(&args(&[]));
    assert!(
        summary.contains("6 images written by this run, 6 done before"),
        "{summary}"
    );
    assert_eq!(outputs(&out), all);
    assert_metadata_matches_manifest(&out);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn shards_cover_the_dataset_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let input = plain_dataset(tmp.path(), 5);
    let (out, whole) = (tmp.path().join("out"), tmp.path().join("whole"));
    let run = |o: &Path, extra: &[&str]| {
        let mut a = vec!["--components", "2"];
        a.extend(extra);
        augment_ok(&job(&input, o, &a))
    };
    let first = run(&out, &["--shard", "1/2"]);
    assert!(
        first.contains("2 images written") && first.contains("incomplete"),
        "{first}"
    );
    for file in ["manifest.jsonl", "metadata.jsonl", "classes.json"] {
        assert!(
            !out.join(file).exists(),
            "{file} written before every shard was done"
        );
    }
    let second = run(&out, &["--shard", "0/2"]);
    assert!(
        second.contains("3 images written") && !second.contains("incomplete"),
        "{second}"
    );
    run(&whole, &[]);
    let lines = manifest(&out);
    let sources: Vec<&str> = lines
        .iter()
        .map(|l| l["source"].as_str().unwrap())
        .collect();
    let unique: BTreeSet<&str> = sources.iter().copied().collect();
    assert_eq!((sources.len(), unique.len()), (5, 5));
    assert_eq!(outputs(&out), outputs(&whole));
    assert_metadata_matches_manifest(&out);
    let sorted = |o: &Path| {
        let mut rows: Vec<String> = metadata(o).iter().map(Value::to_string).collect();
        rows.sort();
        rows
    };
    assert_eq!(sorted(&out), sorted(&whole));
    // A shard of another size is another job.
    let o = augment(&job(&input, &out, &["--components", "2", "--shard", "0/3"]));
    assert!(!o.status.success());
    for bad in ["2/2", "x", "1/0"] {
        let o = augment(&job(&input, &out, &["--components", "2", "--shard", bad]));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("`shard`"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn bad_inputs_are_listed_and_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let input = d.join("in");
    let masks = d.join("masks");
    let (mask32, _) = palette_mask(32, 32);
    let (mask20, _) = palette_mask(20, 20);
    // Good, with a mask.
    put(&input.join("good.png"), &png_of(&guide(0, 32)));
    put(&masks.join("good.png"), &mask32);
    // Garbage bytes; a PNG whose header reads but whose data is cut.
    put(&input.join("garbage.png"), b"this is not an image at all");
    let whole = png_of(&guide(1, 32));
    put(
        &input.join("cut.png"),
        &common::png_with_header(32, 32, Some(&whole[40..60])),
    );
    put(&masks.join("garbage.png"), &mask32);
    put(&masks.join("cut.png"), &mask32);
    // A mask of the wrong size; no mask; a mask that is not a PNG.
    put(&input.join("small-mask.png"), &png_of(&guide(2, 32)));
    put(&masks.join("small-mask.png"), &mask20);
    put(&input.join("no-mask.png"), &png_of(&guide(0, 32)));
    put(&input.join("bad-mask.png"), &png_of(&guide(1, 32)));
    put(&masks.join("bad-mask.png"), b"GIF89a");
    // COCO: good.png annotated; an entry for a file that is not there; an
    // annotation of an image that does not exist; no-mask.png absent.
    let coco = json!({
        "images": [
            {"id": 1, "file_name": "good.png", "width": 32, "height": 32},
            {"id": 2, "file_name": "elsewhere/missing.png", "width": 32, "height": 32},
            {"id": 3, "file_name": "small-mask.png", "width": 32, "height": 32},
            {"id": 4, "file_name": "bad-mask.png", "width": 64, "height": 64},
            {"id": 5, "file_name": "garbage.png", "width": 32, "height": 32},
            {"id": 6, "file_name": "cut.png", "width": 32, "height": 32},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]},
            {"id": 2, "image_id": 99, "category_id": 1, "bbox": [1, 2, 3, 4]},
        ],
        "categories": [{"id": 1, "name": "x"}],
    });
    put(&d.join("coco.json"), coco.to_string().as_bytes());
    let out = d.join("out");
    let summary = augment_ok(&[
        "--input",
        s(&input),
        "--out",
        s(&out),
        "--masks",
        s(&masks),
        "--coco",
        s(&d.join("coco.json")),
        "--components",
        "8",
    ]);
    eprintln!("{summary}");
    assert!(summary.contains("1 images written"), "{summary}");
    for needle in [
        "garbage.png",
        "cut.png",
        "small-mask.png: mask",
        "is 20x20 but the image is 32x32",
        "no-mask.png",
        "bad-mask.png",
        "elsewhere/missing.png",
        "annotation 2",
    ] {
        assert!(
            summary.contains(needle),
            "summary lacks `{needle}`:\n{summary}"
        );
    }
    assert_eq!(manifest(&out).len(), 1);
    let ann: Value =
        serde_json::from_slice(&std::fs::read(out.join("annotations.json")).unwrap()).unwrap();
    assert_eq!(ann["images"].as_array().unwrap().len(), 1);
    assert_eq!(ann["annotations"].as_array().unwrap().len(), 1);

    // What stops the whole job, with a clear error and no panic.
    for (args, needle) in [
        (vec!["--input", "/nonexistent"], "`input`"),
        (
            vec!["--input", s(&input), "--masks", "/nonexistent"],
            "`masks`",
        ),
        (vec!["--input", s(&input), "--per-image", "0"], "per-image"),
        (
            vec!["--input", s(&input), "--components", "9"],
            "components",
        ),
        (
            vec!["--input", s(&input), "--components", "2,2"],
            "components",
        ),
        (vec!["--input", s(&input), "--format", "gif"], "`format`"),
        (
            vec!["--input", s(&input), "--coco", s(&masks.join("good.png"))],
            "coco",
        ),
    ] {
        let out2 = d.join(format!("o{}", needle.len()));
        let mut a = args.clone();
        a.extend(["--out", s(&out2)]);
        let o = augment(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{a:?} should fail");
        assert!(
            !err.contains("panicked") && err.contains(needle),
            "{a:?}: {err}"
        );
    }
}

/// A `lumen serve` on a free loopback port with the embedded model.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let (child, url, _) = common::spawn_serve(extra, None);
        let t = Instant::now();
        while ureq::get(&format!("{url}/ready")).call().is_err() {
            assert!(t.elapsed() < Duration::from_secs(60), "never ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        Server { child, url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn remote_mode_survives_429s_and_a_dying_server() {
    let tmp = tempfile::tempdir().unwrap();
    let input = plain_dataset(tmp.path(), 4);
    let (out, local) = (tmp.path().join("out"), tmp.path().join("local"));
    // A queue of 1 and 3 requests in flight per server: 429s are certain.
    let a = Server::start(&["--max-queue", "1", "--max-batch", "1"]);
    let mut b = Server::start(&["--max-queue", "1", "--max-batch", "1"]);
    let common_args = [
        "--input",
        s(&input),
        "--per-image",
        "2",
        "--components",
        "1,8",
    ];
    let child = Command::new(env!("CARGO_BIN_EXE_lumen"))
        .arg("augment")
        .args(common_args)
        .args(["--out", s(&out), "--steps", STEPS, "--quiet"])
        .args([
            "--server",
            &a.url,
            "--server",
            &b.url,
            "--server-concurrency",
            "3",
        ])
        .env_remove("LUMEN_MODELS")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while manifest(&out).len() < 3 {
        assert!(t.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Server b dies mid-run (SIGKILL): its requests go to a.
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let o = child.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{summary}");
    eprintln!("{summary}");
    assert!(summary.contains("16 images written"), "{summary}");
    let busy: u64 = summary
        .split("servers: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(busy > 0, "no 429 was seen: {summary}");
    let moved: u64 = summary
        .split("waited out, ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        moved > 0,
        "nothing was moved off the dead server: {summary}"
    );
    let lines = manifest(&out);
    assert!(lines
        .iter()
        .all(|l| l["server"].is_string() && l["score"].is_number()));
    // Exactly what the local engine makes.
    let mut l = common_args.to_vec();
    l.extend(["--out", s(&local)]);
    augment_ok(&l);
    assert_eq!(outputs(&out), outputs(&local));
    let scores = |o: &Path| -> BTreeMap<String, f64> {
        manifest(o)
            .iter()
            .map(|l| {
                (
                    l["output"].as_str().unwrap().into(),
                    l["score"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    for ((k, x), (_, y)) in scores(&out).iter().zip(scores(&local).iter()) {
        assert!((x - y).abs() < 1e-5, "{k}: {x} vs {y}");
    }

    // No server answers at all: a clear error, and what was there stays.
    drop(a);
    let o = augment(&[
        "--input",
        s(&input),
        "--out",
        s(&tmp.path().join("none")),
        "--components",
        "8",
        "--server",
        "http://127.0.0.1:9",
        "--server-wait-s",
        "2",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("no server answered") && err.contains("127.0.0.1:9"),
        "{err}"
    );
    // Remote mode needs explicit K.
    let o = augment(&[
        "--input",
        s(&input),
        "--out",
        s(&tmp.path().join("k")),
        "--server",
        "http://127.0.0.1:9",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--components"));
}
