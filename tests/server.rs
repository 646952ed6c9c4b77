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
        common::wait_ready(&server.client, &server.base).await;
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

    /// The status of a small synthesis of the test guide.
    async fn small_synthesis(&self) -> StatusCode {
        let body = synth_body(json!({"image": b64(&guide_bytes())}));
        self.post_json("/synthesize", &body).await.status()
    }

    /// Wait for the process to exit (30 s at most) and return its status.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
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

    // A request that cannot finish within --request-timeout-s is refused up
    // front (its estimate from the warm-up's measurements), naming what to
    // lower: the next request does not wait for it.
    let slow = synth_body(json!({"layout_id": id, "steps": 900, "width": 128, "height": 128}));
    let t = Instant::now();
    let r = srv.post_json("/synthesize", &slow).await;
    expect_error(
        r,
        StatusCode::UNPROCESSABLE_ENTITY,
        "over_time_budget",
        &["within 2 s", "steps (900)", "128×128"],
    )
    .await;
    assert!(t.elapsed() < Duration::from_secs(2));
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
    assert!(
        metric_sum(
            &m,
            "lumen_admission_refused_total{reason=\"over_time_budget\"}"
        ) >= 1.0,
        "{m}"
    );
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
    let code = srv.wait_exit();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_delay_fails_ready_but_keeps_serving_then_exits() {
    let mut srv = Server::start(&["--shutdown-delay-s", "2"]).await;
    // A fresh connection per request: what a load balancer's new traffic does.
    srv.client = Client::builder().pool_max_idle_per_host(0).build().unwrap();
    srv.terminate();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, v) = json_of(srv.client.get(srv.url("/ready")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["status"], "shutting_down");
    // Still serving during the delay.
    assert_eq!(srv.small_synthesis().await, StatusCode::OK);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the test was too slow to tell"
    );
    let code = srv.wait_exit();
    assert!(code.success(), "exit status {code:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(1900),
        "closed before the delay: {:?}",
        t.elapsed()
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
    // A timeout long enough for the 999-step request to be admitted.
    let srv = Server::start(&["--request-timeout-s", "36000"]).await;
    let dropped = |m: &str| metric_sum(m, "lumen_queue_dropped_total{reason=\"disconnected\"}");
    let before = dropped(&srv.metrics().await);
    // About a minute of work, abandoned after one second: the client closes
    // its connection, the handler is dropped, the batch stops at the next step.
    let size = json!({"image": b64(&guide_bytes()), "width": 512, "height": 512});
    let mut long = synth_body(size.clone());
    long["steps"] = json!(999);
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
    let gone = Instant::now();
    let freed = loop {
        let m = srv.metrics().await;
        if dropped(&m) > before && metric_sum(&m, "lumen_queue_in_flight") == 0.0 {
            break gone.elapsed();
        }
        assert!(
            gone.elapsed() < Duration::from_secs(15),
            "the engine still works for a client that has gone"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // One denoising step at that size, from the same server.
    let mut short = synth_body(size);
    short["steps"] = json!(8);
    let t = Instant::now();
    let (status, v) = json_of(srv.post_json("/synthesize", &short).await).await;
    assert_eq!(status, StatusCode::OK);
    eprintln!("8 steps at 512x512 answered in {:?}", t.elapsed());
    let step = v["timings"]["denoise_ms"].as_f64().unwrap() / 8.0 / 1e3;
    eprintln!(
        "engine freed {:.0} ms after the client went; one step takes {:.0} ms",
        freed.as_secs_f64() * 1e3,
        step * 1e3
    );
    // Within the step in progress, plus the polling of /metrics (with room
    // for the other tests that share these two cores).
    assert!(
        freed.as_secs_f64() <= 1.5 * step + 0.2,
        "freed after {freed:?}, one step is {step} s"
    );
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
    common::wait_ready(&srv.client, &srv.base).await;
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

/// Connect, send `head` then `trickle` one byte a second, and return how long
/// until the server closed the connection and what it answered.
fn trickle(base: &str, head: &str, trickle: &[u8]) -> (Duration, String) {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1000)))
        .unwrap();
    let t = Instant::now();
    s.write_all(head.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let mut next = 0;
    loop {
        assert!(t.elapsed() < Duration::from_secs(30), "never cut off");
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break, // reset
        }
        // One byte per second (each read waits up to a second).
        if next < trickle.len() && s.write_all(&trickle[next..next + 1]).is_ok() {
            next += 1;
        }
    }
    (t.elapsed(), String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_are_cut_off_and_hold_no_queue_slot() {
    // One queue slot: a trickling client that held it would make the normal
    // request below a 429.
    let srv = Server::start(&[
        "--header-timeout-s",
        "2",
        "--body-timeout-s",
        "3",
        "--max-queue",
        "1",
    ])
    .await;
    let base = srv.base.clone();
    let headers = tokio::task::spawn_blocking({
        let base = base.clone();
        move || {
            trickle(
                &base,
                "",
                b"POST /synthesize HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n",
            )
        }
    });
    let body = tokio::task::spawn_blocking({
        let base = base.clone();
        move || {
            let head = "POST /synthesize HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                        content-length: 4000\r\n\r\n{\"image\": \"";
            trickle(&base, head, &[b'A'; 100])
        }
    });
    let idle = tokio::task::spawn_blocking(move || trickle(&base, "", b""));
    // Meanwhile the one queue slot serves a normal request.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = srv.metrics().await;
    assert_eq!(metric_sum(&m, "lumen_queue_depth"), 0.0);
    assert!(metric_sum(&m, "lumen_http_connections_open") >= 4.0, "{m}");
    assert_eq!(srv.small_synthesis().await, StatusCode::OK);

    let (t_headers, a_headers) = headers.await.unwrap();
    let (t_body, a_body) = body.await.unwrap();
    let (t_idle, a_idle) = idle.await.unwrap();
    eprintln!(
        "cut off after: headers at 1 byte/s {:.2} s, body at 1 byte/s {:.2} s, idle {:.2} s",
        t_headers.as_secs_f64(),
        t_body.as_secs_f64(),
        t_idle.as_secs_f64()
    );
    // Headers: closed without an answer at the header timeout (2 s).
    assert!(a_headers.is_empty(), "{a_headers}");
    assert!(t_headers >= Duration::from_millis(1900) && t_headers < Duration::from_secs(4));
    assert!(a_idle.is_empty() && t_idle < Duration::from_secs(4));
    // Body: a 408 naming the body deadline at the body timeout (3 s).
    assert!(a_body.starts_with("HTTP/1.1 408"), "{a_body}");
    assert!(a_body.contains("\"body_timeout\"") && a_body.contains("within 3 s"));
    assert!(t_body >= Duration::from_millis(2900) && t_body < Duration::from_secs(5));

    let m = srv.metrics().await;
    assert!(
        metric_sum(&m, "lumen_http_header_timeouts_total") >= 2.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(
            &m,
            "lumen_http_requests_total{endpoint=\"/synthesize\",status=\"408\"}"
        ),
        1.0
    );
    assert!(metric_sum(&m, "lumen_http_connections_open") <= 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_1000_dropped_connections_leaves_the_server_serving() {
    let proc_fds_and_threads = |pid| {
        let (_, fds, threads) = common::proc_sample(pid);
        (fds, threads)
    };
    let mut srv = Server::start(&["--header-timeout-s", "5"]).await;
    // No pooled connections of our own: every request below opens and closes one.
    srv.client = Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let pid = srv.child.id();
    // Warm up (the first request starts the runtime's blocking threads).
    let r = srv
        .post_json("/layout", &json!({"image": b64(&guide_bytes())}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    drop(r.bytes().await);
    let addr = srv.base.trim_start_matches("http://").to_string();
    let (fds_before, threads_before) = proc_fds_and_threads(pid);
    let t = Instant::now();
    let opened = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut held = Vec::new();
        for i in 0..1000 {
            let Ok(mut s) = std::net::TcpStream::connect(&addr) else {
                continue;
            };
            // A third say nothing, a third send half a request line, a third
            // a whole request head with no body.
            let _ = match i % 3 {
                0 => Ok(()),
                1 => s.write_all(b"POST /synthe"),
                _ => s.write_all(
                    b"POST /synthesize HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 99\r\n\r\n",
                ),
            };
            held.push(s);
        }
        let n = held.len();
        drop(held);
        n
    })
    .await
    .unwrap();
    assert_eq!(opened, 1000, "every connection was accepted");
    let burst = t.elapsed();
    // Still serving, at once.
    let r = srv
        .post_json("/layout", &json!({"image": b64(&guide_bytes())}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    drop(r.bytes().await);
    // Every dropped connection is closed on the server's side too.
    let t = Instant::now();
    loop {
        let m = srv.metrics().await;
        let (fds, threads) = proc_fds_and_threads(pid);
        // Open: only the one that asks for /metrics.
        if metric_sum(&m, "lumen_http_connections_open") <= 1.0 && fds <= fds_before {
            eprintln!(
                "burst of 1000 opened in {:.2} s; closed within {:.2} s; fds {fds_before} -> {fds}, threads {threads_before} -> {threads}",
                burst.as_secs_f64(),
                t.elapsed().as_secs_f64()
            );
            assert!(metric_sum(&m, "lumen_http_connections_total") >= 1000.0);
            assert_eq!(threads, threads_before, "threads grew");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "connections still open: {fds} fds (before {fds_before}), gauge {}",
            metric_sum(&m, "lumen_http_connections_open")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
