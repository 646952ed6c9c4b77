//! `lumen serve` over real TCP on loopback, for what needs a real network and
//! a real process: queue overload, batching of concurrent clients, draining
//! on SIGTERM, bodies over the limit while the client still sends, startup
//! options. Each test starts the binary on a free port with the random
//! `models/tiny`. (Request handling itself is tested in-process in `tests/api.rs`.)

mod common;

use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{b64, guide_bytes, max_pixel_diff, metric_sum, rgb, root, s, synth_body, unb64};
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
        let tiny = common::tiny_models();
        let (child, base, logs) = common::spawn_serve(extra, Some(&tiny));
        let server = Server {
            child,
            base,
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

async fn json_of(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, v)
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

    // The burst's abandoned work leaves the queue (on a loaded machine this
    // takes a while) before the next request needs a slot.
    let t = Instant::now();
    loop {
        let m = srv.metrics().await;
        if metric_sum(&m, "lumen_queue_depth") == 0.0
            && metric_sum(&m, "lumen_queue_in_flight") == 0.0
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the queue never drained: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

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
    common::fails_with(
        &["serve", "--port", "0", "--protect-all"],
        &["`protect_all`", "--api-key"],
    );
    common::fails_with(
        &["serve", "--port", "0", "--max-steps", "0"],
        &["`max_steps`"],
    );
    // Limits the model cannot meet stop the server once its specs are read.
    common::fails_with(
        &["serve", "--port", "0", "--max-side", "8"],
        &["`max_side`", "size multiple 16"],
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_over_the_limit_get_413_while_the_client_sends_and_the_server_keeps_serving() {
    let srv = Server::start(&["--body-limit-mb", "1"]).await;
    let big = json!({"image": b64(&vec![7u8; 1_200_000])});
    let (status, v) = json_of(srv.post_json("/layout", &big).await).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(v["error"]["code"], "payload_too_large");
    let form = reqwest::multipart::Form::new().part(
        "image",
        reqwest::multipart::Part::bytes(vec![1u8; 1_500_000]),
    );
    let r = srv
        .client
        .post(srv.url("/layout"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = json_of(
        srv.post_json("/layout", &json!({"image": b64(&common::guide_bytes())}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(!srv
        .logs
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("panicked")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_vanishes_mid_synthesis_frees_the_engine() {
    let srv = Server::start(&[]).await;
    let dropped = |m: &str| metric_sum(m, "lumen_queue_dropped_total{reason=\"disconnected\"}");
    let before = dropped(&srv.metrics().await);
    // About a minute of work, abandoned after one second: the client closes
    // its connection, the handler is dropped, the batch stops at the next step.
    let long = synth_body(json!({
        "image": b64(&guide_bytes()), "steps": 999, "width": 512, "height": 512
    }));
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let r = impatient
        .post(srv.url("/synthesize"))
        .json(&long)
        .send()
        .await;
    assert!(r.is_err(), "the client gave up");
    let t = Instant::now();
    loop {
        let m = srv.metrics().await;
        if dropped(&m) > before && metric_sum(&m, "lumen_queue_in_flight") == 0.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the engine still works for a client that has gone"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    let (status, _) = json_of(
        srv.post_json(
            "/synthesize",
            &synth_body(json!({"image": b64(&guide_bytes())})),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn protect_all_guards_metrics_and_docs_and_the_key_is_never_logged() {
    const SECRET: &str = "k3y-that-must-never-appear-9f8e7d";
    let (child, base, logs) = common::spawn_serve_env(
        &["--api-key", SECRET, "--protect-all"],
        None,
        &[("RUST_LOG", "trace")],
    );
    let mut srv = Server {
        child,
        base,
        client: Client::new(),
        logs,
    };
    let t = Instant::now();
    while srv
        .client
        .get(srv.url("/ready"))
        .send()
        .await
        .map(|r| r.status())
        .ok()
        != Some(StatusCode::OK)
    {
        assert!(t.elapsed() < Duration::from_secs(60), "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let get = |path: &str, key: Option<&str>| {
        let mut r = srv.client.get(srv.url(path));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    // Probes stay open; the rest needs the key, in either header.
    for path in ["/health", "/ready"] {
        assert_eq!(
            get(path, None).await.unwrap().status(),
            StatusCode::OK,
            "{path}"
        );
    }
    for path in ["/metrics", "/openapi.json", "/docs/"] {
        let wrong = format!("{SECRET}-but-wrong");
        for key in [
            None,
            Some(wrong.as_str()),
            Some(&SECRET[..SECRET.len() - 1]),
        ] {
            let r = get(path, key).await.unwrap();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path} with {key:?}");
        }
    }
    for path in ["/metrics", "/openapi.json", "/docs/"] {
        assert_eq!(
            get(path, Some(SECRET)).await.unwrap().status(),
            StatusCode::OK,
            "{path}"
        );
        let r = srv
            .client
            .get(srv.url(path))
            .header("x-api-key", SECRET)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path} with x-api-key");
    }
    let body = json!({"image": b64(&guide_bytes())});
    let r = srv
        .client
        .post(srv.url("/layout"))
        .bearer_auth(SECRET)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    srv.terminate();
    let t = Instant::now();
    while srv.child.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(30), "server did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Give the log reader a moment to drain the pipe.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = srv.logs.lock().unwrap().join("\n");
    assert!(
        logs.lines().count() > 20 && logs.contains("TRACE"),
        "trace logging was on: {}",
        logs.len()
    );
    assert!(
        logs.contains("/metrics") && logs.contains("/layout"),
        "requests were logged"
    );
    assert!(
        !logs.contains(SECRET) && !logs.contains(&SECRET[..SECRET.len() - 1]),
        "the key leaked into the logs"
    );
}
