//! `lumen augment --server URL …`: the images come from running `lumen
//! serve` replicas. Each server gets `concurrency` worker threads; a worker
//! sends one output per `POST /synthesize` (the guide as base64 JSON, the
//! output's seed, `score: true`).
//!
//! - 429 or 503 (queue full, loading, draining): wait `Retry-After` (at most
//!   30 s; 1 s if absent) and send the task again — to whichever server's
//!   worker takes it first.
//! - A connection failure (refused, reset, cut before the answer, timed out):
//!   the task goes back to the queue for another server (a synthesis with a
//!   fixed seed makes the same image anywhere), and the server is probed
//!   with `GET /ready` with growing pauses until it answers again.
//! - If no server has answered for `wait` seconds, the job stops with an
//!   error naming each server and its last failure; what was written stays
//!   and a rerun continues.
//! - 422 / 413 (the guide cannot be decoded, or is too large): the source is
//!   bad input, skipped and listed. 400 (the job's parameters refused) and
//!   401 (the API key): the job stops.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

use super::dispatch::{Dispatch, Generated, Outcome};
use super::plan::Task;
use crate::error::{Error, Result};
use crate::pipeline::request::{SynthesisParameters, SynthesisRequest};

/// Where the servers are and how hard to push them.
#[derive(Clone, Debug)]
pub struct RemoteOptions {
    /// Base URLs (`http://host:port`).
    pub servers: Vec<String>,
    /// Requests in flight per server.
    pub concurrency: usize,
    /// Sent as `Authorization: Bearer`.
    pub api_key: Option<String>,
    /// Give up when no server has answered for this long.
    pub wait: Duration,
    /// Longest wait for one answer.
    pub request_timeout: Duration,
}

/// Shared record of when some server last answered, and each server's last failure.
struct Health {
    last_answer: Mutex<Instant>,
    last_error: Mutex<Vec<Option<String>>>,
}

impl Health {
    fn answered(&self, server: usize) {
        *self.last_answer.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.last_error.lock().unwrap_or_else(|p| p.into_inner())[server] = None;
    }

    fn failed(&self, server: usize, why: String) {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner())[server] = Some(why);
    }

    fn silent_for(&self) -> Duration {
        self.last_answer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    fn describe(&self, servers: &[String]) -> String {
        let errs = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        servers
            .iter()
            .zip(errs.iter())
            .map(|(s, e)| format!("{s} ({})", e.as_deref().unwrap_or("no answer")))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Start `concurrency` workers per server.
pub fn spawn(
    opts: RemoteOptions,
    template: SynthesisRequest,
    guides: Vec<PathBuf>,
    dispatch: Arc<Dispatch>,
    tx: SyncSender<Outcome>,
) -> Result<Vec<JoinHandle<()>>> {
    if opts.servers.is_empty() {
        return Err(Error::param("server", "give at least one server URL"));
    }
    let servers: Vec<String> = opts
        .servers
        .iter()
        .map(|s| s.trim_end_matches('/').to_string())
        .collect();
    for s in &servers {
        if !(s.starts_with("http://") || s.starts_with("https://")) {
            return Err(Error::param(
                "server",
                format!("`{s}` must be an http:// or https:// URL"),
            ));
        }
    }
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout(opts.request_timeout)
        .build();
    let health = Arc::new(Health {
        last_answer: Mutex::new(Instant::now()),
        last_error: Mutex::new(vec![None; servers.len()]),
    });
    let guides = Arc::new(guides);
    let template = Arc::new(template);
    let servers = Arc::new(servers);
    let opts = Arc::new(opts);
    let mut handles = Vec::new();
    for server in 0..servers.len() {
        for slot in 0..opts.concurrency.max(1) {
            let w = Worker {
                server,
                servers: servers.clone(),
                agent: agent.clone(),
                opts: opts.clone(),
                template: template.clone(),
                guides: guides.clone(),
                dispatch: dispatch.clone(),
                health: health.clone(),
                tx: tx.clone(),
            };
            let h = std::thread::Builder::new()
                .name(format!("augment-{server}-{slot}"))
                .spawn(move || w.run())
                .map_err(|e| Error::Internal(format!("cannot start a worker: {e}")))?;
            handles.push(h);
        }
    }
    Ok(handles)
}

struct Worker {
    server: usize,
    servers: Arc<Vec<String>>,
    agent: ureq::Agent,
    opts: Arc<RemoteOptions>,
    template: Arc<SynthesisRequest>,
    guides: Arc<Vec<PathBuf>>,
    dispatch: Arc<Dispatch>,
    health: Arc<Health>,
    tx: SyncSender<Outcome>,
}

/// What one attempt gave.
enum Attempt {
    Done(Box<Generated>),
    /// Busy (429/503): wait this long, then retry.
    Busy(Duration),
    /// The connection failed: move the task elsewhere.
    Unreachable(String),
    /// The source is bad input.
    BadSource(String),
    /// The job cannot go on.
    Fatal(Error),
    /// This output failed for a reason a rerun may not have.
    Failed(String),
}

impl Worker {
    fn url(&self) -> &str {
        &self.servers[self.server]
    }

    fn run(self) {
        let mut down_since: Option<Instant> = None;
        let mut pause = Duration::from_millis(250);
        let mut server_errors = 0u32;
        loop {
            // A server that failed is probed until it answers again.
            if down_since.is_some() {
                if self.dispatch.stop.load(Ordering::SeqCst) || self.dispatch.finished() {
                    return;
                }
                if self.health.silent_for() > self.opts.wait {
                    let _ = self.tx.send(Outcome::Fatal(Error::param(
                        "server",
                        format!(
                            "no server answered for {} s: {}",
                            self.opts.wait.as_secs(),
                            self.health.describe(&self.servers)
                        ),
                    )));
                    self.dispatch.halt();
                    return;
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(4));
                match self.agent.get(&format!("{}/ready", self.url())).call() {
                    Ok(_) => {
                        self.health.answered(self.server);
                        down_since = None;
                        pause = Duration::from_millis(250);
                    }
                    Err(ureq::Error::Status(..)) => {
                        // Alive but not ready (loading, draining): keep waiting.
                        self.health.answered(self.server);
                    }
                    Err(e) => self.health.failed(self.server, e.to_string()),
                }
                continue;
            }
            let Some(mut group) = self.dispatch.take(1, |_, _| false) else {
                return;
            };
            let Some(task) = group.pop() else { continue };
            match self.attempt(&task) {
                Attempt::Done(g) => {
                    self.health.answered(self.server);
                    server_errors = 0;
                    let sent = self.tx.send(Outcome::Done(g));
                    self.dispatch.finish(1);
                    if sent.is_err() {
                        return;
                    }
                }
                Attempt::Busy(d) => {
                    self.health.answered(self.server);
                    self.dispatch.retried_busy.fetch_add(1, Ordering::SeqCst);
                    self.dispatch.retry(task);
                    std::thread::sleep(d);
                }
                Attempt::Unreachable(why) => {
                    tracing::warn!(server = %self.url(), error = %why, "server unreachable; the request goes elsewhere");
                    self.health.failed(self.server, why);
                    self.dispatch.failed_over.fetch_add(1, Ordering::SeqCst);
                    self.dispatch.retry(task);
                    down_since = Some(Instant::now());
                }
                Attempt::BadSource(reason) => {
                    self.health.answered(self.server);
                    self.dispatch.bad_source(task.source);
                    let _ = self.tx.send(Outcome::BadSource {
                        source: task.source,
                        reason,
                    });
                    self.dispatch.finish(1);
                }
                Attempt::Failed(reason) => {
                    server_errors += 1;
                    if server_errors < 3 {
                        // A server error may be transient: once more, anywhere.
                        self.dispatch.retry(task);
                    } else {
                        let _ = self.tx.send(Outcome::Failed { task, reason });
                        self.dispatch.finish(1);
                    }
                }
                Attempt::Fatal(e) => {
                    let _ = self.tx.send(Outcome::Fatal(e));
                    self.dispatch.finish(1);
                    self.dispatch.halt();
                    return;
                }
            }
        }
    }

    fn attempt(&self, task: &Task) -> Attempt {
        let path = &self.guides[task.source];
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => return Attempt::BadSource(format!("cannot read: {e}")),
        };
        let request = SynthesisRequest {
            prompt: Some(task.prompt.clone()),
            components: Some(task.components),
            seed: Some(task.seed),
            num_images: Some(1),
            score: Some(true),
            ..(*self.template).clone()
        };
        let mut body = match serde_json::to_value(&request) {
            Ok(Value::Object(m)) => m,
            _ => return Attempt::Fatal(Error::Internal("cannot serialize the request".into())),
        };
        body.retain(|_, v| !v.is_null());
        body.insert(
            "image".into(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(&bytes)),
        );
        let mut req = self
            .agent
            .post(&format!("{}/synthesize", self.url()))
            .set("accept", "application/json");
        if let Some(k) = &self.opts.api_key {
            req = req.set("authorization", &format!("Bearer {k}"));
        }
        let t = Instant::now();
        let res = req.send_json(Value::Object(body));
        let request_ms = t.elapsed().as_secs_f64() * 1e3;
        let res = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => return self.refused(code, r),
            Err(ureq::Error::Transport(e)) => return Attempt::Unreachable(e.to_string()),
        };
        let v: Value = match res.into_json() {
            Ok(v) => v,
            // The answer was cut: the server went away mid-response.
            Err(e) => return Attempt::Unreachable(format!("reading the answer: {e}")),
        };
        match self.generated(task, v, request_ms) {
            Ok(g) => Attempt::Done(Box::new(g)),
            Err(e) => Attempt::Failed(e),
        }
    }

    /// An error status: what it means for the task.
    fn refused(&self, code: u16, r: ureq::Response) -> Attempt {
        let retry_after = r
            .header("retry-after")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(Duration::from_secs(1), |s| Duration::from_secs(s.min(30)));
        let message = r
            .into_json::<Value>()
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("HTTP {code}"));
        match code {
            429 | 503 => Attempt::Busy(retry_after),
            413 | 422 => Attempt::BadSource(format!("{} refused it: {message}", self.url())),
            400 | 401 | 403 | 404 => Attempt::Fatal(Error::param(
                "server",
                format!("{} answered {code}: {message}", self.url()),
            )),
            _ => Attempt::Failed(format!("{} answered {code}: {message}", self.url())),
        }
    }

    fn generated(
        &self,
        task: &Task,
        v: Value,
        request_ms: f64,
    ) -> std::result::Result<Generated, String> {
        let image = &v["images"][0];
        let data = image["data"].as_str().ok_or("the answer has no image")?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| format!("the image is not base64: {e}"))?;
        let img = image::load_from_memory(&bytes)
            .map_err(|e| format!("the image does not decode: {e}"))?;
        let parameters: SynthesisParameters = serde_json::from_value(v["parameters"].clone())
            .map_err(|e| format!("the answer's parameters: {e}"))?;
        if parameters.seed != task.seed || parameters.components != task.components {
            return Err(format!(
                "the server answered seed {} K {} for seed {} K {}",
                parameters.seed, parameters.components, task.seed, task.components
            ));
        }
        let mut timings =
            BTreeMap::from([("request_ms".to_string(), (request_ms * 1e3).round() / 1e3)]);
        if let Some(t) = v["timings"].as_object() {
            for (k, x) in t {
                if let Some(x) = x.as_f64() {
                    timings.insert(format!("server_{k}"), x);
                }
            }
        }
        Ok(Generated {
            task: task.clone(),
            width: img.width(),
            height: img.height(),
            bytes,
            score: image["score"].as_f64().map(|s| s as f32),
            parameters,
            server: Some(self.url().to_string()),
            timings,
        })
    }
}
