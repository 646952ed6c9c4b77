//! Jobs, admission, step-level scheduling and draining, against `lumen
//! serve` over loopback TCP with the random `models/tiny`: the job
//! lifecycle and its event stream (progress, previews, resume), cancel while
//! queued and while running (the engine is free within a step, through
//! `/metrics`), TTL expiry, the key on job routes, the callback allow-list,
//! a request refused up front for its cost, a short request finishing
//! while a long one runs, and SIGTERM bounded by the drain timeout. Order
//! and step counts are asserted rather than wall-clock bounds where possible.

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{b64, guide_bytes, metric_sum, synth_body, unb64};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

struct Server {
    child: Child,
    base: String,
    client: Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    async fn start(extra: &[&str]) -> Server {
        let tiny = common::tiny_models();
        let (child, base, _logs) = common::spawn_serve(extra, Some(&tiny));
        let client = Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        common::wait_ready(&client, &base).await;
        Server {
            child,
            base,
            client,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn delete(&self, path: &str) -> (StatusCode, Value) {
        let r = self.client.delete(self.url(path)).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A job's whole event stream (it ends with the job), resumed after `last`.
    async fn events(&self, query: &str, last: Option<u64>) -> String {
        let mut req = self.client.get(self.url(query));
        if let Some(l) = last {
            req = req.header("last-event-id", l.to_string());
        }
        req.send().await.unwrap().text().await.unwrap()
    }

    async fn metrics(&self) -> String {
        let r = self.client.get(self.url("/metrics")).send().await.unwrap();
        r.text().await.unwrap()
    }

    /// Poll a job until `done(status)` holds (a minute at most).
    async fn until(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            let (code, v) = self.get(&format!("/jobs/{id}")).await;
            assert_eq!(code, StatusCode::OK, "{v}");
            if done(&v) {
                return v;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "job stuck: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Server-Sent Events of a finished stream: (id, event, data).
fn parse_sse(text: &str) -> Vec<(u64, String, Value)> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let (mut id, mut name, mut data) = (0u64, String::new(), String::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().parse().unwrap_or(0);
            } else if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        if !name.is_empty() {
            out.push((id, name, serde_json::from_str(&data).unwrap_or(Value::Null)));
        }
    }
    out
}

fn guide_body(extra: Value) -> Value {
    let mut b = synth_body(extra);
    b["image"] = json!(b64(&guide_bytes()));
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_runs_end_to_end_with_events_previews_and_the_synchronous_answer() {
    let srv = Server::start(&[]).await;
    let body = guide_body(json!({"steps": 4, "seed": 11}));
    let r = srv
        .client
        .post(srv.url("/jobs"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let accepted: Value = r.json().await.unwrap();
    let id = accepted["id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/jobs/{id}"));
    assert!(id.len() >= 36, "ids are long random strings: {id}");
    assert_eq!(accepted["links"]["events"], format!("/jobs/{id}/events"));
    assert!(["queued", "running", "succeeded"].contains(&accepted["status"].as_str().unwrap()));

    // The whole stream (it ends with the job), previews every step.
    let text = srv
        .events(&format!("/jobs/{id}/events?preview=1"), None)
        .await;
    let events = parse_sse(&text);
    let names: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(names.last(), Some(&"succeeded"), "{names:?}");
    let steps: Vec<u64> = events
        .iter()
        .filter(|e| e.1 == "progress")
        .map(|e| e.2["step"].as_u64().unwrap())
        .collect();
    assert!(steps.ends_with(&[1, 2, 3, 4]), "progress steps {steps:?}");
    assert!(events
        .iter()
        .filter(|e| e.1 == "progress")
        .all(|e| e.2["steps"] == 4));
    let ids: Vec<u64> = events.iter().map(|e| e.0).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    // The stream may open after some previews were replaced: at least the last.
    let previews: Vec<&Value> = events
        .iter()
        .filter(|e| e.1 == "preview")
        .map(|e| &e.2)
        .collect();
    assert!(!previews.is_empty(), "no preview in {names:?}");
    let png = common::rgb(&unb64(&previews.last().unwrap()["image"]));
    assert!(png.width() > 1 && png.width() < 64, "a latent-size preview");

    // Resuming after the last event gives nothing more; after the first, the rest.
    let last = *ids.last().unwrap();
    let again = srv.events(&format!("/jobs/{id}/events"), Some(last)).await;
    assert!(parse_sse(&again).is_empty(), "{again}");
    let resumed = srv
        .events(&format!("/jobs/{id}/events"), Some(ids[0]))
        .await;
    let r_ids: Vec<u64> = parse_sse(&resumed).iter().map(|e| e.0).collect();
    assert!(r_ids.iter().all(|&i| i > ids[0]) && r_ids.contains(&last));

    // The status carries the /synthesize answer: the same image as a synchronous call.
    let (_, status) = srv.get(&format!("/jobs/{id}")).await;
    assert_eq!(status["status"], "succeeded");
    assert_eq!(
        (status["step"].as_u64(), status["steps"].as_u64()),
        (Some(4), Some(4))
    );
    for f in ["created_at", "started_at", "finished_at"] {
        assert!(status[f].as_str().unwrap().ends_with('Z'), "{f}: {status}");
    }
    let (code, sync) = srv.post("/synthesize", &body).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        status["result"]["images"][0]["data"], sync["images"][0]["data"],
        "the job's image differs from the synchronous answer"
    );

    // Prefer: respond-async makes /synthesize a job too.
    let r = srv
        .client
        .post(srv.url("/synthesize"))
        .header("prefer", "respond-async, wait=5")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(r.headers()["preference-applied"], "respond-async");
    let v: Value = r.json().await.unwrap();
    let done = srv
        .until(v["id"].as_str().unwrap(), |s| s["status"] == "succeeded")
        .await;
    assert_eq!(
        done["result"]["images"][0]["data"],
        sync["images"][0]["data"]
    );

    let m = srv.metrics().await;
    assert!(
        metric_sum(&m, "lumen_jobs_total{status=\"succeeded\"}") >= 2.0,
        "{m}"
    );
    let (code, v) = srv.get("/jobs/job_0000").await;
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_job"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_while_running_frees_the_engine_within_a_step_and_while_queued_leaves_the_queue() {
    let srv = Server::start(&["--max-batch", "1"]).await;
    let long = guide_body(json!({"steps": 900, "seed": 1}));
    let (code, a) = srv.post("/jobs", &long).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{a}");
    let a = a["id"].as_str().unwrap().to_string();
    srv.until(&a, |s| {
        s["status"] == "running" && s["step"].as_u64() >= Some(2)
    })
    .await;
    // --max-batch 1: the second waits in the queue behind the first.
    let (_, b) = srv.post("/jobs", &long).await;
    let b = b["id"].as_str().unwrap().to_string();
    let queued = srv.until(&b, |s| s["status"] == "queued").await;
    assert_eq!(queued["queue_position"], 0, "{queued}");

    let (code, cb) = srv.delete(&format!("/jobs/{b}")).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(cb["status"], "cancelled", "{cb}");
    let (code, ca) = srv.delete(&format!("/jobs/{a}")).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(ca["status"], "cancelled", "{ca}");
    let step_at_cancel = ca["step"].as_u64().unwrap();
    assert!(step_at_cancel < 900, "{ca}");
    assert_eq!(ca["error"]["code"], "cancelled");
    // Idempotent.
    let (_, again) = srv.delete(&format!("/jobs/{a}")).await;
    assert_eq!(again["status"], "cancelled");

    // The answer comes at once; the engine frees the slot at its next step
    // boundary, so the gauge reaches 0 within a step, not necessarily yet.
    let t = std::time::Instant::now();
    let mut m = srv.metrics().await;
    while metric_sum(&m, "lumen_queue_in_flight") != 0.0
        && t.elapsed() < std::time::Duration::from_secs(10)
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        m = srv.metrics().await;
    }
    assert!(
        metric_sum(&m, "lumen_queue_dropped_total{reason=\"cancelled\"}") >= 2.0,
        "{m}"
    );
    assert_eq!(metric_sum(&m, "lumen_queue_in_flight"), 0.0, "{m}");
    assert!(metric_sum(&m, "lumen_engine_cancel_free_seconds_count") >= 1.0);
    let (code, _) = srv.post("/synthesize", &guide_body(json!({}))).await;
    assert_eq!(code, StatusCode::OK, "the engine serves again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_request_finishes_while_a_long_one_runs() {
    let srv = Server::start(&[]).await;
    let (_, long) = srv
        .post("/jobs", &guide_body(json!({"steps": 400, "seed": 2})))
        .await;
    let long = long["id"].as_str().unwrap().to_string();
    srv.until(&long, |s| s["step"].as_u64() >= Some(1)).await;
    let (code, v) = srv
        .post("/synthesize", &guide_body(json!({"steps": 3, "seed": 3})))
        .await;
    assert_eq!(code, StatusCode::OK, "{v}");
    let (_, l) = srv.get(&format!("/jobs/{long}")).await;
    assert_eq!(l["status"], "running", "the long job ended first: {l}");
    assert!(l["step"].as_u64().unwrap() < 400);
    // Both shared model calls.
    assert_eq!(v["timings"]["batch_images"], 2, "{v}");
    srv.delete(&format!("/jobs/{long}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn too_costly_requests_are_refused_up_front_naming_the_fields() {
    let srv = Server::start(&["--request-timeout-s", "5"]).await;
    let body = guide_body(json!({"steps": 999, "width": 512, "height": 512, "num_images": 8}));
    let t = Instant::now();
    let (code, v) = srv.post("/synthesize", &body).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["code"], "over_time_budget");
    let msg = v["error"]["message"].as_str().unwrap();
    for needle in [
        "steps (999)",
        "num_images (8)",
        "512×512",
        "within 5 s",
        "estimate",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from {msg}");
    }
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "refused only after {:?}",
        t.elapsed()
    );
    let (code, v) = srv.post("/jobs", &body).await;
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("over_time_budget"))
    );
    let m = srv.metrics().await;
    assert!(
        metric_sum(
            &m,
            "lumen_admission_refused_total{reason=\"over_time_budget\"}"
        ) >= 2.0
    );
    // The encoder alone can be too costly too: the layout sizes that would
    // not fit the timeout are out of the served bounds.
    let (_, doc) = srv.get("/openapi.json").await;
    let max = doc["components"]["schemas"]["LayoutJson"]["properties"]["layout_size"]["maximum"]
        .as_u64()
        .unwrap();
    // (How large fits depends on this machine's speed: check the edge when
    // the timeout cuts below the configured 2048.)
    assert!(max <= 2048, "{max}");
    if max < 2048 {
        let too_big = json!({"image": b64(&guide_bytes()), "layout_size": max + 1});
        let (code, v) = srv.post("/layout", &too_big).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("layout_size"));
    }
    let fits = json!({"image": b64(&guide_bytes()), "layout_size": max});
    let (code, v) = srv.post("/layout", &fits).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    // The served document offers no callback_url when no host is allowed.
    let (_, doc) = srv.get("/openapi.json").await;
    assert!(doc["components"]["schemas"]["SynthesizeJson"]["properties"]["callback_url"].is_null());
    // What fits is served.
    let (code, _) = srv.post("/synthesize", &guide_body(json!({}))).await;
    assert_eq!(code, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_jobs_expire_and_job_routes_need_the_key() {
    let srv = Server::start(&["--job-ttl-s", "1", "--api-key", "sesame"]).await;
    let (code, _) = srv.post("/jobs", &guide_body(json!({}))).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, _) = srv.get("/jobs/job_x").await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let r = srv
        .client
        .post(srv.url("/jobs"))
        .bearer_auth("sesame")
        .json(&guide_body(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let get = |id: String| {
        let c = srv.client.clone();
        let u = srv.url(&format!("/jobs/{id}"));
        async move {
            let r = c.get(u).header("x-api-key", "sesame").send().await.unwrap();
            let code = r.status();
            (code, r.json::<Value>().await.unwrap())
        }
    };
    let t = Instant::now();
    loop {
        let (code, v) = get(id.clone()).await;
        assert_eq!(code, StatusCode::OK);
        if v["status"] == "succeeded" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (code, v) = get(id).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "kept past its TTL: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callbacks_go_only_to_allowed_hosts() {
    // A one-shot HTTP listener on loopback records the callback.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            let n = conn.read(&mut chunk).unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some(h) = text.find("\r\n\r\n") {
                let len = text[..h]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if buf.len() >= h + 4 + len {
                    break;
                }
            }
        }
        let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n");
        String::from_utf8_lossy(&buf).into_owned()
    });
    let allow = format!("127.0.0.1:{port}");
    let srv = Server::start(&["--webhook-allow", &allow]).await;
    let mut body = guide_body(json!({}));
    body["callback_url"] = json!("http://169.254.169.254/latest");
    let (code, v) = srv.post("/jobs", &body).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("callback_url"));
    body["callback_url"] = json!(format!("http://127.0.0.1:{port}/done"));
    let (code, v) = srv.post("/synthesize", &body).await;
    assert_eq!(
        code,
        StatusCode::BAD_REQUEST,
        "a synchronous call has no callback: {v}"
    );
    let (code, v) = srv.post("/jobs", &body).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{v}");
    let request = got.join().unwrap();
    assert!(request.starts_with("POST /done "), "{request}");
    let json_start = request.find('{').unwrap();
    let status: Value = serde_json::from_str(&request[json_start..]).unwrap();
    assert_eq!(status["id"], v["id"]);
    assert_eq!(status["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_stops_a_long_job_after_the_drain_timeout_and_exits_zero() {
    let mut srv = Server::start(&["--drain-timeout-s", "1"]).await;
    let long = guide_body(json!({"steps": 900}));
    let pending = {
        let c = srv.client.clone();
        let u = srv.url("/synthesize");
        tokio::spawn(async move { c.post(u).json(&long).send().await.map(|r| r.status()) })
    };
    // Wait until it runs.
    let t = Instant::now();
    loop {
        let m = srv.metrics().await;
        if metric_sum(&m, "lumen_queue_in_flight") >= 1.0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = srv.child.id().to_string();
    let t = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = pending.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let exit = loop {
        if let Some(e) = srv.child.try_wait().unwrap() {
            break e;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    eprintln!(
        "SIGTERM to exit with a 900-step job running: {:?}",
        t.elapsed()
    );
}
