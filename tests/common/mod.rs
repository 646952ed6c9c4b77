//! Shared helpers for the integration tests: fixture paths, the reference
//! manifest written by scripts/make_fixtures.py, tolerance checks.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use serde::Deserialize;

/// The checkout: `LUMEN_TEST_ROOT` when a test binary runs away from the
/// tree it was built in (scripts/gpu_check.sh), else the crate's folder.
pub fn root() -> PathBuf {
    std::env::var_os("LUMEN_TEST_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The random-weight test model, `models/tiny` (the binary embeds another).
pub fn tiny_models() -> String {
    root().join("models/tiny").to_string_lossy().into_owned()
}

#[derive(Debug, Deserialize)]
pub struct Guide {
    pub name: String,
    pub image: String,
    pub layout_size: u32,
    pub grid: [usize; 2],
}

#[derive(Debug, Deserialize)]
pub struct ModelCase {
    pub models: String,
    pub kmax: usize,
    pub registers: usize,
    pub fit_images: String,
    pub fit_layout_size: u32,
    pub guides: Vec<Guide>,
}

/// `tests/fixtures/reference/cases.json`, by model name.
pub fn cases() -> Vec<(String, ModelCase)> {
    let path = root().join("tests/fixtures/reference/cases.json");
    let text = std::fs::read_to_string(&path).expect("reference manifest");
    let map: HashMap<String, ModelCase> = serde_json::from_str(&text).expect("manifest parses");
    let mut v: Vec<_> = map.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The reference tensors of one model.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = root().join(format!("tests/fixtures/reference/{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu).expect("reference tensors")
}

/// The device the model tests run on: `LUMEN_TEST_DEVICE` (`cpu`, `cuda`,
/// `cuda:N`; default `cpu`). scripts/gpu_check.sh sets it on a GPU machine.
pub fn test_device() -> Device {
    let spec = std::env::var("LUMEN_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    lumen::config::parse_device(&spec).unwrap_or_else(|e| panic!("LUMEN_TEST_DEVICE: {e}"))
}

/// The diffusion weights' dtype in the model tests: `LUMEN_TEST_DTYPE`
/// (`f32`, `f16`, `bf16`; default `f32`). The encoder and PCA are f32 always.
pub fn test_dtype() -> candle_core::DType {
    let spec = std::env::var("LUMEN_TEST_DTYPE").unwrap_or_else(|_| "f32".into());
    lumen::config::parse_dtype(&spec, &test_device())
        .unwrap_or_else(|e| panic!("LUMEN_TEST_DTYPE: {e}"))
}

/// Whether the tests run as CI runs them (CPU, f32): the bit-exact checks
/// (alone vs batched) hold only there, since cuBLAS and cuDNN choose their
/// algorithms by shape and are not batch-invariant.
pub fn on_cpu_f32() -> bool {
    test_device().is_cpu() && test_dtype() == candle_core::DType::F32
}

/// The relative tolerance of a check stated for f32 on the CPU, on the test
/// device and dtype: at least 1e-4 for f32 on a GPU (other summation
/// orders), 3e-2 for f16 (11-bit mantissa through a UNet) and 1e-1 for
/// bf16 (8-bit).
pub fn tol(cpu_f32: f32) -> f32 {
    use candle_core::DType;
    let floor = match (test_device().is_cpu(), test_dtype()) {
        (true, DType::F32) => 0.0,
        (false, DType::F32) => 1e-4,
        (_, DType::BF16) => 1e-1,
        _ => 3e-2,
    };
    cpu_f32.max(floor)
}

/// The largest and mean |Δ| allowed between an 8-bit image and its
/// reference on the test device and dtype: 3 and 0.5 levels in f32; 16 and
/// 2.0 in f16; 32 and 4.0 in bf16.
pub fn image_tolerance() -> (u32, f64) {
    match test_dtype() {
        candle_core::DType::F16 => (16, 2.0),
        candle_core::DType::BF16 => (32, 4.0),
        _ => (3, 0.5),
    }
}

pub fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// (max |a − b|, max |b|) over two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (to_vec(a), to_vec(b));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    (diff, scale)
}

/// Assert max |a − b| ≤ rel · max |b|.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, rel: f32) {
    let (diff, scale) = max_abs_diff(a, b);
    assert!(
        diff <= rel * scale,
        "{what}: max |Δ| = {diff:e} exceeds {rel:e} · max|ref| ({scale:e})"
    );
    eprintln!(
        "{what}: max |Δ| = {diff:.3e}, max|ref| = {scale:.3e}, ratio {:.3e}",
        diff / scale
    );
}

/// Run the `lumen` binary with `args` (RUST_LOG cleared) on `models/tiny`
/// unless `args` name other models.
pub fn lumen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args(args)
        .env_remove("RUST_LOG")
        .env("LUMEN_MODELS", tiny_models())
        .output()
        .expect("lumen runs")
}

/// Run and expect success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let o = lumen(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run and expect a clean failure (no panic) whose stderr mentions every needle.
pub fn fails_with(args: &[&str], needles: &[&str]) {
    let out = lumen(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail; stderr: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr lacks `{n}`: {err}");
    }
}

/// A path as `&str` for command lines.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A PNG of `width × height` whose header is valid (right CRC) and whose
/// pixel data is `data` (IDAT, may be garbage or absent).
pub fn png_with_header(width: u32, height: u32, data: Option<&[u8]>) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], body: &[u8]| {
        v.extend((body.len() as u32).to_be_bytes());
        let mut c = kind.to_vec();
        c.extend(body);
        v.extend(&c);
        v.extend(crc32fast::hash(&c).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB
    chunk(b"IHDR", &ihdr);
    if let Some(d) = data {
        chunk(b"IDAT", d);
    }
    chunk(b"IEND", &[]);
    v
}

pub mod app;

/// Start `lumen serve` on a free loopback port with JSON logs (`models`:
/// a folder, or `None` for the embedded model) and wait until it listens.
/// Returns the child, its base URL and its log lines as they come.
pub fn spawn_serve(
    extra: &[&str],
    models: Option<&str>,
) -> (
    std::process::Child,
    String,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    spawn_serve_env(extra, models, &[])
}

/// [`spawn_serve`] with extra environment variables (set last, so they win).
pub fn spawn_serve_env(
    extra: &[&str],
    models: Option<&str>,
    env: &[(&str, &str)],
) -> (
    std::process::Child,
    String,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use std::io::BufRead;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lumen"));
    cmd.args([
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--log-format",
        "json",
    ])
    .args(extra)
    .env("RUST_LOG", "info")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    match models {
        Some(m) => cmd.env("LUMEN_MODELS", m),
        None => cmd.env_remove("LUMEN_MODELS"),
    };
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().expect("lumen serve starts");
    let stderr = child.stderr.take().expect("stderr");
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let logs = logs.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["fields"]["message"] == "listening" {
                        let _ = tx.send(v["fields"]["address"].as_str().unwrap_or("").to_string());
                    }
                }
                logs.lock().unwrap().push(line);
            }
        });
    }
    let addr = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("server did not listen: {:?}", logs.lock().unwrap()));
    (child, format!("http://{addr}"), logs)
}

/// Wait until `GET {base}/ready` answers 200 (a minute at most).
pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    let t = std::time::Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{base}/ready")).send().await {
            if r.status() == reqwest::StatusCode::OK {
                return;
            }
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "server never became ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// RSS (bytes), open file descriptors and threads of a process.
pub fn proc_sample(pid: u32) -> (u64, usize, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (field("VmRSS:") * 1024, fds, field("Threads:") as usize)
}

/// The guide image most HTTP tests use.
pub fn guide_path() -> PathBuf {
    root().join("tests/fixtures/images/tiny-street.png")
}

pub fn guide_bytes() -> Vec<u8> {
    std::fs::read(guide_path()).unwrap()
}

pub fn b64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

pub fn unb64(s: &serde_json::Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s.as_str().expect("base64 string"))
        .expect("valid base64")
}

/// Little-endian f32 values.
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn rgb(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory(bytes)
        .expect("decodable image")
        .to_rgb8()
}

pub fn max_pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Sum of a Prometheus series (all label sets whose line starts with `prefix`).
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A small, fast synthesis request on the tiny model, with `extra` fields.
pub fn synth_body(extra: serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::json!({
        "prompt": "a quiet street",
        "steps": 3,
        "width": 64,
        "height": 48,
        "scheduler": "ddim",
        "seed": 7,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}
