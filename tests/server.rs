//! `lumen serve` over real TCP on loopback: each test starts the binary on a
//! free port with the embedded tiny model and talks HTTP to it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{png_with_header, root, s};
use reqwest::{header, Client, StatusCode};
use serde_json::{json, Value};

struct Server {
    child: Child,
    base: String,
    client: Client,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Server {
    async fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lumen"))
            .args([
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
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("lumen serve starts");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if v["fields"]["message"] == "listening" {
                            let _ =
                                tx.send(v["fields"]["address"].as_str().unwrap_or("").to_string());
                        }
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("server did not listen: {:?}", logs.lock().unwrap()));
        let server = Server {
            child,
            base: format!("http://{addr}"),
            client: Client::builder()
                .timeout(Duration::from_secs(300))
                .build()
                .unwrap(),
            logs,
        };
        let t = Instant::now();
        loop {
            if let Ok(r) = server.client.get(server.url("/ready")).send().await {
                if r.status() == StatusCode::OK {
                    break;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "server never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request")
    }

    async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Send SIGTERM.
    fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn guide_path() -> std::path::PathBuf {
    root().join("tests/fixtures/images/tiny-street.png")
}

fn guide_bytes() -> Vec<u8> {
    std::fs::read(guide_path()).unwrap()
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn unb64(s: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s.as_str().expect("base64 string"))
        .expect("valid base64")
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn rgb(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory(bytes)
        .expect("decodable image")
        .to_rgb8()
}

fn max_pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Sum of a Prometheus series (all label sets whose line starts with `prefix`).
fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn json_of(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, v)
}

/// A small, fast synthesis request on the tiny model.
fn synth_body(extra: Value) -> Value {
    let mut body = json!({
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn layout_endpoint_answers_json_png_and_safetensors_like_the_cli() {
    let srv = Server::start(&[]).await;
    let img = guide_bytes();
    let (status, v) = json_of(
        srv.post_json("/layout", &json!({"image": b64(&img), "components": 5}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["components"], 5);
    let grid = [
        v["grid"][0].as_u64().unwrap() as usize,
        v["grid"][1].as_u64().unwrap() as usize,
    ];
    let data = f32s(&unb64(&v["data"]));
    assert_eq!(data.len(), 5 * grid[0] * grid[1]);

    // Same numbers as `lumen layout` on the same image.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("l.safetensors");
    common::ok(&[
        "layout",
        "--image",
        s(&guide_path()),
        "-k",
        "5",
        "--out",
        s(&out),
    ]);
    let cli = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let cli = common::to_vec(&cli["layout"]);
    let scale = cli.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = cli
        .iter()
        .zip(&data)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= 1e-5 * scale,
        "server vs CLI layout: {diff} (scale {scale})"
    );

    // The preview has the guide's size.
    let guide = rgb(&img);
    let preview = rgb(&unb64(&v["preview_png"]));
    assert_eq!(preview.dimensions(), guide.dimensions());

    // Accept: image/png gives the preview itself.
    let r = srv
        .client
        .post(srv.url("/layout"))
        .header(header::ACCEPT, "image/png")
        .json(&json!({"image": b64(&img), "components": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[header::CONTENT_TYPE], "image/png");
    assert_eq!(rgb(&r.bytes().await.unwrap()), preview);

    // Accept: application/octet-stream gives safetensors with tensor `layout`.
    let r = srv
        .client
        .post(srv.url("/layout"))
        .header(header::ACCEPT, "application/octet-stream")
        .json(&json!({"image": b64(&img), "components": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let bytes = r.bytes().await.unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("layout").unwrap();
    assert_eq!(t.shape(), &[5, grid[0], grid[1]]);
    assert_eq!(f32s(t.data()), data);

    // Multipart gives the same layout and id; the repeat is served from the cache.
    let encoded_before = metric_sum(
        &srv.metrics().await,
        "lumen_stage_duration_seconds_count{stage=\"layout\"}",
    );
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(img.clone()).file_name("g.png"),
        )
        .text("components", "5");
    let (status, m) = json_of(
        srv.client
            .post(srv.url("/layout"))
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{m}");
    assert_eq!(m["layout_id"], v["layout_id"]);
    assert_eq!(f32s(&unb64(&m["data"])), data);
    let encoded_after = metric_sum(
        &srv.metrics().await,
        "lumen_stage_duration_seconds_count{stage=\"layout\"}",
    );
    assert_eq!(
        encoded_before, encoded_after,
        "a cached layout ran the encoder again"
    );

    // Another K of the same guide comes from the same cached layout: a prefix.
    let (_, k2) = json_of(
        srv.post_json("/layout", &json!({"image": b64(&img), "components": 2}))
            .await,
    )
    .await;
    let d2 = f32s(&unb64(&k2["data"]));
    assert_eq!(&d2[..], &data[..d2.len()]);
    assert_ne!(k2["layout_id"], v["layout_id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn synthesize_matches_the_cli_in_every_format_and_input_form() {
    let srv = Server::start(&[]).await;
    let img = guide_bytes();
    let body = synth_body(json!({"image": b64(&img), "num_images": 2, "components": 6}));
    let (status, v) = json_of(srv.post_json("/synthesize", &body).await).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0]["seed"], 7);
    assert_eq!(images[1]["seed"], 8);
    let p = &v["parameters"];
    assert_eq!(p["components"], 6);
    assert_eq!(p["scheduler"], "ddim");
    assert_eq!(
        (p["width"].as_u64(), p["height"].as_u64()),
        (Some(64), Some(48))
    );
    for key in [
        "queue_ms",
        "layout_ms",
        "denoise_ms",
        "decode_ms",
        "total_ms",
    ] {
        assert!(v["timings"][key].as_f64().is_some(), "timings.{key}");
    }
    let png0 = unb64(&images[0]["data"]);
    let img0 = rgb(&png0);
    assert_eq!(img0.dimensions(), (64, 48));
    let meta: Value = serde_json::from_str(
        &lumen::png_text::read(&png0, "parameters").expect("parameters chunk"),
    )
    .unwrap();
    assert_eq!(meta["seed"], 7);
    assert_eq!(meta["prompt"], "a quiet street");
    let img1 = rgb(&unb64(&images[1]["data"]));
    assert!(
        max_pixel_diff(&img0, &img1) > 0,
        "different seeds gave the same image"
    );

    // `lumen synthesize` with the same parameters makes the same images.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cli.png");
    common::ok(&[
        "synthesize",
        "--image",
        s(&guide_path()),
        "--prompt",
        "a quiet street",
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "48",
        "--scheduler",
        "ddim",
        "--seed",
        "7",
        "--num-images",
        "2",
        "-k",
        "6",
        "--quiet",
        "--out",
        s(&out),
    ]);
    let cli0 = image::open(tmp.path().join("cli-0.png")).unwrap().to_rgb8();
    let cli1 = image::open(tmp.path().join("cli-1.png")).unwrap().to_rgb8();
    assert!(max_pixel_diff(&cli0, &img0) <= 1, "server vs CLI image 0");
    assert!(max_pixel_diff(&cli1, &img1) <= 1, "server vs CLI image 1");

    // The layout_id from the answer skips the encoder and gives the same image.
    let id = p["layout_id"].as_str().unwrap();
    let (status, w) = json_of(
        srv.post_json("/synthesize", &synth_body(json!({"layout_id": id})))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{w}");
    assert_eq!(w["timings"]["layout_ms"], 0.0);
    assert_eq!(rgb(&unb64(&w["images"][0]["data"])), img0);

    // Accept: image/png with one image: the raw PNG, seed in a header.
    let r = srv
        .client
        .post(srv.url("/synthesize"))
        .header(header::ACCEPT, "image/png")
        .json(&synth_body(json!({"layout_id": id, "seed": 8})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[header::CONTENT_TYPE], "image/png");
    assert_eq!(r.headers()["x-lumen-seed"], "8");
    assert_eq!(rgb(&r.bytes().await.unwrap()), img1);

    // JPEG and (lossless) WebP.
    for (format, magic) in [("jpeg", &b"\xff\xd8"[..]), ("webp", &b"RIFF"[..])] {
        let (status, f) = json_of(
            srv.post_json(
                "/synthesize",
                &synth_body(json!({"layout_id": id, "format": format})),
            )
            .await,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{f}");
        let bytes = unb64(&f["images"][0]["data"]);
        assert!(bytes.starts_with(magic), "{format}");
        let decoded = rgb(&bytes);
        if format == "webp" {
            assert_eq!(decoded, img0);
        } else {
            assert!(max_pixel_diff(&decoded, &img0) < 64);
        }
    }

    // Multipart with a file part gives the same image.
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(img.clone()).file_name("g.png"),
        )
        .text("prompt", "a quiet street")
        .text("steps", "3")
        .text("width", "64")
        .text("height", "48")
        .text("scheduler", "ddim")
        .text("seed", "7")
        .text("components", "6");
    let (status, m) = json_of(
        srv.client
            .post(srv.url("/synthesize"))
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{m}");
    assert_eq!(rgb(&unb64(&m["images"][0]["data"])), img0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_ready_metrics_openapi_docs_cors_and_request_ids() {
    let srv = Server::start(&["--cors-origin", "https://app.example"]).await;
    let r = srv
        .client
        .get(srv.url("/health"))
        .header(header::ORIGIN, "https://app.example")
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://app.example"
    );
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let r = srv
        .client
        .get(srv.url("/health"))
        .header(header::ORIGIN, "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(!r
        .headers()
        .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
    assert!(
        !r.headers()["x-request-id"].is_empty(),
        "a request id is generated"
    );
    for path in ["/health", "/ready"] {
        let (status, v) = json_of(srv.client.get(srv.url(path)).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["status"], "ok");
        assert_eq!(v["device"], "cpu");
    }
    let served = srv
        .client
        .get(srv.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let committed = std::fs::read_to_string(root().join("openapi/openapi.json")).unwrap();
    assert!(
        served == committed,
        "openapi/openapi.json is stale: regenerate it with `cargo run -- openapi > openapi/openapi.json`"
    );
    let doc: Value = serde_json::from_str(&served).unwrap();
    for path in ["/layout", "/synthesize", "/health", "/ready", "/metrics"] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    let docs = srv.client.get(srv.url("/docs/")).send().await.unwrap();
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs
        .text()
        .await
        .unwrap()
        .to_lowercase()
        .contains("swagger"));
    let m = srv.metrics().await;
    for name in [
        "lumen_queue_depth",
        "lumen_queue_in_flight",
        "lumen_http_requests_total",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
}

/// Assert an error response: status, `code`, and message needles.
async fn expect_error(r: reqwest::Response, status: StatusCode, code: &str, needles: &[&str]) {
    let (got, v) = json_of(r).await;
    assert_eq!(got, status, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    let msg = v["error"]["message"].as_str().expect("message");
    for n in needles {
        assert!(msg.contains(n), "message lacks `{n}`: {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_client_error_gets_its_status_and_the_server_keeps_serving() {
    let srv = Server::start(&["--api-key", "sesame", "--body-limit-mb", "1"]).await;
    let img = guide_bytes();
    let post = |path: &str| srv.client.post(srv.url(path)).bearer_auth("sesame");

    // 401: no key, wrong key; the X-API-Key header works too.
    let body = json!({"image": b64(&img)});
    let r = srv
        .client
        .post(srv.url("/layout"))
        .json(&body)
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::UNAUTHORIZED, "unauthorized", &["API key"]).await;
    let r = srv
        .client
        .post(srv.url("/layout"))
        .bearer_auth("open")
        .json(&body)
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::UNAUTHORIZED, "unauthorized", &[]).await;
    let r = srv
        .client
        .post(srv.url("/layout"))
        .header("x-api-key", "sesame")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // 400: each names its field.
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/layout",
            json!({"image": b64(&img), "components": 0}),
            "`components`",
        ),
        (
            "/layout",
            json!({"image": b64(&img), "components": 99}),
            "`components`",
        ),
        (
            "/layout",
            json!({"image": b64(&img), "components": "five"}),
            "`components`",
        ),
        (
            "/layout",
            json!({"image": b64(&img), "layout_size": 3}),
            "`layout_size`",
        ),
        (
            "/layout",
            json!({"image": b64(&img), "colour": 1}),
            "`colour`",
        ),
        ("/layout", json!({"image": "@@not base64@@"}), "`image`"),
        ("/layout", json!({}), "`image`"),
        ("/layout", json!([1, 2]), "`body`"),
        (
            "/synthesize",
            synth_body(json!({"image": b64(&img), "steps": 0})),
            "`steps`",
        ),
        (
            "/synthesize",
            synth_body(json!({"image": b64(&img), "steps": 5000})),
            "`steps`",
        ),
        (
            "/synthesize",
            synth_body(json!({"image": b64(&img), "width": 65})),
            "`width`",
        ),
        (
            "/synthesize",
            synth_body(json!({"image": b64(&img), "width": null, "height": 64})),
            "`width`",
        ),
        (
            "/synthesize",
            synth_body(json!({"image": b64(&img), "num_images": 9})),
            "`num_images`",
        ),
        (
            "/synthesize",
            synth_body(json!({"image": b64(&img), "scheduler": "pndm"})),
            "`scheduler`",
        ),
        (
            "/synthesize",
            synth_body(json!({"image": b64(&img), "format": "gif"})),
            "`format`",
        ),
        (
            "/synthesize",
            synth_body(json!({"image": b64(&img), "seed": -1})),
            "`seed`",
        ),
        (
            "/synthesize",
            synth_body(json!({"image": b64(&img), "guidance_scale": 1e9})),
            "`guidance_scale`",
        ),
        (
            "/synthesize",
            synth_body(json!({"image": b64(&img), "layout_id": "x-1"})),
            "`layout_id`",
        ),
        (
            "/synthesize",
            synth_body(json!({"layout_id": "not-an-id"})),
            "`layout_id`",
        ),
        ("/synthesize", synth_body(json!({})), "`image`"),
    ];
    for (path, body, needle) in cases {
        let r = post(path).json(&body).send().await.unwrap();
        let (status, v) = json_of(r).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{path}: message lacks {needle}: {msg}"
        );
    }
    let r = post("/layout")
        .header(header::CONTENT_TYPE, "application/json")
        .body("{\"image\": ")
        .send()
        .await
        .unwrap();
    expect_error(
        r,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["invalid JSON"],
    )
    .await;
    let form = reqwest::multipart::Form::new()
        .text("image", "x")
        .text("steps", "many");
    let r = post("/synthesize").multipart(form).send().await.unwrap();
    expect_error(
        r,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["`steps`", "not a number"],
    )
    .await;
    let form = reqwest::multipart::Form::new().text("bogus", "1");
    let r = post("/layout").multipart(form).send().await.unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "invalid_request", &["`bogus`"]).await;

    // 404: unknown layout id, unknown route; 405.
    let id = format!("{}-3", "0".repeat(32));
    let r = post("/synthesize")
        .json(&synth_body(json!({"layout_id": id})))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "unknown_layout", &[&id]).await;
    let r = srv.client.get(srv.url("/nowhere")).send().await.unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "not_found", &["/nowhere"]).await;
    let r = srv.client.get(srv.url("/layout")).send().await.unwrap();
    expect_error(r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", &[]).await;

    // 406, 413, 415.
    let r = post("/layout")
        .header(header::ACCEPT, "text/html")
        .json(&json!({"image": b64(&img)}))
        .send()
        .await
        .unwrap();
    expect_error(
        r,
        StatusCode::NOT_ACCEPTABLE,
        "not_acceptable",
        &["text/html"],
    )
    .await;
    let r = post("/synthesize")
        .header(header::ACCEPT, "image/png")
        .json(&synth_body(json!({"image": b64(&img), "num_images": 2})))
        .send()
        .await
        .unwrap();
    expect_error(
        r,
        StatusCode::NOT_ACCEPTABLE,
        "not_acceptable",
        &["one image"],
    )
    .await;
    let big = json!({"image": b64(&vec![7u8; 1_200_000])});
    let r = post("/layout").json(&big).send().await.unwrap();
    expect_error(
        r,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        &["1048576"],
    )
    .await;
    let form = reqwest::multipart::Form::new().part(
        "image",
        reqwest::multipart::Part::bytes(vec![1u8; 1_500_000]),
    );
    let r = post("/layout").multipart(form).send().await.unwrap();
    expect_error(r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", &[]).await;
    let r = post("/layout")
        .header(header::CONTENT_TYPE, "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    expect_error(
        r,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        &["text/plain"],
    )
    .await;
    let r = post("/layout").body("hello").send().await.unwrap();
    expect_error(
        r,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        &[],
    )
    .await;

    // 422: images that cannot be decoded or are over the pixel limit.
    let mut jpeg = Vec::new();
    rgb(&img)
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let bad_images: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage",
            b"definitely not an image".to_vec(),
            "invalid_image",
        ),
        (
            "truncated png",
            img[..img.len() / 2].to_vec(),
            "invalid_image",
        ),
        (
            "truncated jpeg",
            jpeg[..jpeg.len() * 2 / 3].to_vec(),
            "invalid_image",
        ),
        ("zero-sized", png_with_header(0, 16, None), "invalid_image"),
        (
            "huge header",
            png_with_header(100_000, 100_000, Some(b"x")),
            "image_too_large",
        ),
        (
            "bad pixel data",
            png_with_header(16, 16, Some(b"garbage")),
            "invalid_image",
        ),
    ];
    for (what, bytes, code) in &bad_images {
        for path in ["/layout", "/synthesize"] {
            let body = synth_body(json!({"image": b64(bytes)}));
            let body = if path == "/layout" {
                json!({"image": b64(bytes)})
            } else {
                body
            };
            let r = post(path).json(&body).send().await.unwrap();
            let (status, v) = json_of(r).await;
            assert_eq!(
                status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{what} on {path}: {v}"
            );
            assert_eq!(v["error"]["code"], *code, "{what}: {v}");
        }
        let form = reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(bytes.clone()));
        let r = post("/layout").multipart(form).send().await.unwrap();
        assert_eq!(
            r.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{what} multipart"
        );
    }

    // Nothing above was a 5xx, and the server still serves.
    let m = srv.metrics().await;
    let server_errors: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("lumen_http_requests_total") && l.contains("status=\"5"))
        .filter(|l| !l.contains("endpoint=\"/ready\"")) // 503 while loading
        .collect();
    assert!(server_errors.is_empty(), "{server_errors:?}");
    let r = post("/layout")
        .json(&json!({"image": b64(&img)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(!srv
        .logs
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("panicked")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_429_and_a_late_request_503() {
    let srv = Server::start(&[
        "--max-queue",
        "2",
        "--max-batch",
        "1",
        "--request-timeout-s",
        "2",
    ])
    .await;
    let (_, l) = json_of(
        srv.post_json("/layout", &json!({"image": b64(&guide_bytes())}))
            .await,
    )
    .await;
    let id = l["layout_id"].as_str().unwrap().to_string();

    // 429 with Retry-After when more than --max-queue requests are outstanding.
    let body = synth_body(json!({"layout_id": id, "steps": 40}));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (c, u, b) = (srv.client.clone(), srv.url("/synthesize"), body.clone());
            tokio::spawn(async move { c.post(u).json(&b).send().await.unwrap() })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(r.headers().contains_key(header::RETRY_AFTER));
            expect_error(
                r,
                StatusCode::TOO_MANY_REQUESTS,
                "overloaded",
                &["queue is full"],
            )
            .await;
            statuses.push(429);
        } else {
            statuses.push(r.status().as_u16());
        }
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().any(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );

    // A request that cannot finish within --request-timeout-s gets 503, and its
    // work is abandoned: the next request does not wait for it.
    let slow = synth_body(json!({"layout_id": id, "steps": 900, "width": 128, "height": 128}));
    let t = Instant::now();
    let r = srv.post_json("/synthesize", &slow).await;
    expect_error(r, StatusCode::SERVICE_UNAVAILABLE, "timeout", &["2 s"]).await;
    assert!(t.elapsed() < Duration::from_secs(10));
    let t = Instant::now();
    let r = srv
        .post_json("/synthesize", &synth_body(json!({"layout_id": id})))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the abandoned job kept running: {:?}",
        t.elapsed()
    );
    let m = srv.metrics().await;
    assert!(metric_sum(&m, "lumen_queue_dropped_total") >= 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn thirty_two_clients_are_batched_and_match_their_images_alone() {
    let srv = Server::start(&["--max-batch", "4", "--max-wait-ms", "50"]).await;
    let (_, l) = json_of(
        srv.post_json("/layout", &json!({"image": b64(&guide_bytes())}))
            .await,
    )
    .await;
    let id = l["layout_id"].as_str().unwrap().to_string();
    let body = |seed: u64| synth_body(json!({"layout_id": id, "seed": seed, "steps": 4}));

    let tasks: Vec<_> = (0..32u64)
        .map(|i| {
            let (c, u, b) = (srv.client.clone(), srv.url("/synthesize"), body(100 + i));
            tokio::spawn(async move { json_of(c.post(u).json(&b).send().await.unwrap()).await })
        })
        .collect();
    let mut batched = Vec::new();
    let mut max_batch_seen = 0;
    for t in tasks {
        let (status, v) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{v}");
        max_batch_seen = max_batch_seen.max(v["timings"]["batch_images"].as_u64().unwrap());
        batched.push(rgb(&unb64(&v["images"][0]["data"])));
    }
    assert!(max_batch_seen > 1, "no request shared a batch");
    assert!(max_batch_seen <= 4, "a batch exceeded --max-batch");
    let m = srv.metrics().await;
    let sum = metric_sum(&m, "lumen_queue_batch_images_sum");
    let count = metric_sum(&m, "lumen_queue_batch_images_count");
    assert!(
        sum >= 32.0 && count < sum,
        "batching not visible in /metrics: {sum} images in {count} batches"
    );
    eprintln!("32 clients: {sum} images in {count} batches");

    // Each image is the same when its request runs alone.
    for i in [0u64, 5, 17, 31] {
        let (status, v) = json_of(srv.post_json("/synthesize", &body(100 + i)).await).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["timings"]["batch_images"], 1);
        let alone = rgb(&unb64(&v["images"][0]["data"]));
        let d = max_pixel_diff(&alone, &batched[i as usize]);
        assert_eq!(
            d,
            0,
            "seed {}: batched and alone differ by {d}/255",
            100 + i
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let mut srv = Server::start(&[]).await;
    let body =
        synth_body(json!({"image": b64(&guide_bytes()), "steps": 40, "width": 128, "height": 128}));
    let (c, u) = (srv.client.clone(), srv.url("/synthesize"));
    let running =
        tokio::spawn(async move { json_of(c.post(u).json(&body).send().await.unwrap()).await });
    // Wait until the job is on the inference thread.
    let t = Instant::now();
    while metric_sum(&srv.metrics().await, "lumen_queue_in_flight") < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the job never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.terminate();
    let (status, v) = running.await.unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "in-flight request was not drained: {v}"
    );
    assert_eq!(v["images"].as_array().unwrap().len(), 1);
    let t = Instant::now();
    let code = loop {
        if let Some(s) = srv.child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "exit status {code:?}");
    assert!(
        srv.client.get(srv.url("/health")).send().await.is_err(),
        "still accepting"
    );
    let logs = srv.logs.lock().unwrap().join("\n");
    assert!(
        logs.contains("draining") && logs.contains("stopped"),
        "{logs}"
    );
}

#[test]
fn bad_serve_options_fail_fast_with_the_culprit_named() {
    let missing = root().join("no-such-model-folder");
    common::fails_with(
        &["serve", "--port", "0", "--models", s(&missing)],
        &["no-such-model-folder"],
    );
    common::fails_with(&["serve", "--port", "0", "--dtype", "f8"], &["`dtype`"]);
    common::fails_with(
        &["serve", "--port", "0", "--max-batch", "0"],
        &["`max_batch`"],
    );
    common::fails_with(
        &["serve", "--port", "0", "--log-format", "xml"],
        &["`log_format`"],
    );
    common::fails_with(&["serve", "--port", "0", "--device", "tpu"], &["`device`"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn f16_weights_give_nearly_the_f32_image() {
    let body = synth_body(json!({"image": b64(&guide_bytes())}));
    let mut images = Vec::new();
    for dtype in ["f32", "f16"] {
        let srv = Server::start(&["--dtype", dtype]).await;
        let (_, h) = json_of(srv.client.get(srv.url("/health")).send().await.unwrap()).await;
        assert_eq!(h["dtype"], dtype);
        let (status, v) = json_of(srv.post_json("/synthesize", &body).await).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        images.push(rgb(&unb64(&v["images"][0]["data"])));
    }
    let diffs: Vec<f64> = images[0]
        .as_raw()
        .iter()
        .zip(images[1].as_raw())
        .map(|(a, b)| a.abs_diff(*b) as f64)
        .collect();
    let max = diffs.iter().cloned().fold(0.0, f64::max);
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    eprintln!("f16 vs f32: max {max}/255, mean {mean:.3}/255");
    assert!(
        max <= 16.0 && mean <= 1.5,
        "f16 vs f32: max {max}, mean {mean}"
    );
}
