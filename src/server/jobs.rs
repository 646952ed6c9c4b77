//! Asynchronous jobs: `POST /jobs` (or `/synthesize` with
//! `Prefer: respond-async`) answers 202 at once; the job's record follows it
//! through the queue and the engine ([`JobWatch`]), keeps its events for
//! `GET /jobs/{id}/events` (Server-Sent Events, resumable with
//! `Last-Event-ID`), its final status for `GET /jobs/{id}`, and is
//! cancelled by `DELETE /jobs/{id}`.
//!
//! Finished jobs are kept for `--job-ttl-s`, at most `--max-jobs` of them
//! and `--job-store-mb` of results (the oldest finished go first), then
//! answer 404. Ids are 128 random bits from the thread's CSPRNG.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Notify;
use utoipa::ToSchema;

use crate::error::{Error, Result};
use crate::server::api::ErrorDetail;
use crate::server::metrics;
use crate::server::queue::JobWatch;

/// A job's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// Links of a job.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct JobLinks {
    /// `/jobs/{id}`: its status (and result).
    #[serde(rename = "self")]
    pub this: String,
    /// `/jobs/{id}/events`: its Server-Sent Events.
    pub events: String,
}

/// `202` to `POST /jobs`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct JobAccepted {
    pub id: String,
    pub status: JobState,
    /// Jobs ahead of it in the queue (0: next).
    pub queue_position: Option<usize>,
    pub links: JobLinks,
}

/// `GET /jobs/{id}` (and `DELETE`).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct JobStatus {
    pub id: String,
    pub status: JobState,
    /// Jobs ahead of it while queued, else null.
    pub queue_position: Option<usize>,
    /// Denoising steps done, and in all.
    pub step: usize,
    pub steps: usize,
    /// Estimated seconds left (while queued: its own run time, from the
    /// warm-up's measurements).
    pub eta_s: Option<f64>,
    /// RFC 3339 times.
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Why it failed or was cancelled.
    pub error: Option<ErrorDetail>,
    /// The `/synthesize` JSON answer, once succeeded.
    #[schema(value_type = Option<crate::server::api::SynthesizeResponse>)]
    pub result: Option<Arc<Value>>,
    pub links: JobLinks,
}

/// One stored event.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub id: u64,
    pub name: &'static str,
    pub data: Arc<String>,
    /// The step a preview shows (previews only).
    pub preview_step: Option<usize>,
}

struct Inner {
    status: JobState,
    queue_position: Option<usize>,
    step: usize,
    steps: usize,
    eta_s: Option<f64>,
    started_at: Option<SystemTime>,
    finished_at: Option<SystemTime>,
    finished: Option<Instant>,
    error: Option<ErrorDetail>,
    result: Option<Arc<Value>>,
    events: Vec<StoredEvent>,
    /// Result bytes held.
    bytes: usize,
    /// `?preview=N` of the streams open now.
    preview_every: Vec<usize>,
}

/// One job's record, shared by its handler, its runner task, its event
/// streams and (as a [`JobWatch`]) the engine.
pub struct JobRecord {
    pub id: String,
    created_at: SystemTime,
    inner: Mutex<Inner>,
    next_event: AtomicU64,
    changed: Notify,
    cancelled: OnceLock<Instant>,
    /// Where the final status is POSTed, if anywhere (checked on submission).
    pub callback_url: Option<url::Url>,
}

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

impl JobRecord {
    pub fn new(callback_url: Option<url::Url>) -> Arc<Self> {
        Arc::new(Self {
            id: format!("job_{:032x}", rand::random::<u128>()),
            created_at: SystemTime::now(),
            inner: Mutex::new(Inner {
                status: JobState::Queued,
                queue_position: None,
                step: 0,
                steps: 0,
                eta_s: None,
                started_at: None,
                finished_at: None,
                finished: None,
                error: None,
                result: None,
                events: Vec::new(),
                bytes: 0,
                preview_every: Vec::new(),
            }),
            next_event: AtomicU64::new(1),
            changed: Notify::new(),
            cancelled: OnceLock::new(),
            callback_url,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn links(&self) -> JobLinks {
        JobLinks {
            this: format!("/jobs/{}", self.id),
            events: format!("/jobs/{}/events", self.id),
        }
    }

    fn push(&self, inner: &mut Inner, name: &'static str, data: Value, preview: Option<usize>) {
        let id = self.next_event.fetch_add(1, Ordering::SeqCst);
        if preview.is_some() {
            // Only the latest preview is kept for streams that resume.
            inner.events.retain(|e| e.preview_step.is_none());
        }
        inner.events.push(StoredEvent {
            id,
            name,
            data: Arc::new(data.to_string()),
            preview_step: preview,
        });
        self.changed.notify_waiters();
    }

    pub fn status(&self) -> JobStatus {
        let i = self.lock();
        JobStatus {
            id: self.id.clone(),
            status: i.status,
            queue_position: i.queue_position,
            step: i.step,
            steps: i.steps,
            eta_s: i.eta_s.map(|e| (e * 1e3).round() / 1e3),
            created_at: rfc3339(self.created_at),
            started_at: i.started_at.map(rfc3339),
            finished_at: i.finished_at.map(rfc3339),
            error: i.error.clone(),
            result: i.result.clone(),
            links: self.links(),
        }
    }

    pub fn state(&self) -> JobState {
        self.lock().status
    }

    /// Before it is queued: its steps and estimated run time.
    pub fn planned(&self, steps: usize, eta_s: f64) {
        let mut i = self.lock();
        i.steps = steps;
        i.eta_s = Some(eta_s);
    }

    /// Ask the engine to drop it at its next step. False if already final.
    pub fn cancel(&self) -> bool {
        if self.state().is_final() {
            return false;
        }
        let _ = self.cancelled.set(Instant::now());
        true
    }

    /// Its end: the result (the `/synthesize` JSON answer) or the error.
    pub fn finish(&self, outcome: std::result::Result<Value, ErrorDetail>) {
        let mut i = self.lock();
        if i.status.is_final() {
            return;
        }
        let from = match i.status {
            JobState::Queued => "queued",
            _ => "running",
        };
        let (state, name, data) = match outcome {
            Ok(v) => {
                let v = Arc::new(v);
                i.bytes = v.to_string().len();
                i.result = Some(v.clone());
                i.step = i.steps;
                i.eta_s = Some(0.0);
                (JobState::Succeeded, "succeeded", (*v).clone())
            }
            Err(e) => {
                let state = if e.code == "cancelled" {
                    JobState::Cancelled
                } else {
                    JobState::Failed
                };
                let data = json!({"error": {"code": e.code, "message": e.message}});
                i.error = Some(e);
                i.eta_s = None;
                (state, state.name(), data)
            }
        };
        i.status = state;
        i.queue_position = None;
        i.finished_at = Some(SystemTime::now());
        i.finished = Some(Instant::now());
        metrics::job_moved(Some(from), None);
        metrics::job_finished(state.name());
        let data = match data {
            Value::Object(mut m) => {
                m.insert("id".into(), json!(self.id));
                m.insert("status".into(), json!(state.name()));
                Value::Object(m)
            }
            other => other,
        };
        self.push(&mut i, name, data, None);
    }

    /// Events after `last` (with previews every `preview` steps, 0: none),
    /// and whether the job has ended.
    pub fn events_after(&self, last: u64, preview: usize) -> (Vec<StoredEvent>, bool) {
        let i = self.lock();
        let events = i
            .events
            .iter()
            .filter(|e| e.id > last)
            .filter(|e| match e.preview_step {
                None => true,
                Some(s) => preview > 0 && (s.is_multiple_of(preview) || s == i.steps),
            })
            .cloned()
            .collect();
        (events, i.status.is_final())
    }

    /// The id of the newest event (0: none yet).
    pub fn last_event_id(&self) -> u64 {
        self.lock().events.last().map_or(0, |e| e.id)
    }

    /// Wait for the next change (an event, the end).
    pub async fn changed(&self, last: u64) {
        let notified = self.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.last_event_id() <= last {
            notified.await;
        }
    }

    /// A stream asking for previews every `n` steps opened (`Some`) or closed.
    pub fn watch_previews(&self, n: usize, open: bool) {
        let mut i = self.lock();
        if open {
            i.preview_every.push(n);
        } else if let Some(p) = i.preview_every.iter().position(|&x| x == n) {
            i.preview_every.swap_remove(p);
        }
    }

    fn expired(&self, ttl: Duration, now: Instant) -> bool {
        self.lock()
            .finished
            .is_some_and(|f| now.duration_since(f) >= ttl)
    }
}

impl JobWatch for JobRecord {
    fn queued(&self, position: usize) {
        let mut i = self.lock();
        if i.status == JobState::Queued && i.queue_position != Some(position) {
            if i.queue_position.is_none() {
                metrics::job_moved(None, Some("queued"));
            }
            i.queue_position = Some(position);
            self.push(&mut i, "queued", json!({ "position": position }), None);
        }
    }

    fn started(&self) {
        let mut i = self.lock();
        if i.status == JobState::Queued {
            i.status = JobState::Running;
            i.queue_position = None;
            i.started_at = Some(SystemTime::now());
            metrics::job_moved(Some("queued"), Some("running"));
            let (steps, eta) = (i.steps, i.eta_s);
            self.push(
                &mut i,
                "progress",
                json!({"step": 0, "steps": steps, "eta_s": eta}),
                None,
            );
        }
    }

    fn progress(&self, step: usize, steps: usize, eta_s: f64) {
        let mut i = self.lock();
        i.step = step;
        i.steps = steps;
        i.eta_s = Some(eta_s);
        let eta = (eta_s * 1e3).round() / 1e3;
        self.push(
            &mut i,
            "progress",
            json!({"step": step, "steps": steps, "eta_s": eta}),
            None,
        );
    }

    fn wants_preview(&self, step: usize, steps: usize) -> bool {
        self.lock()
            .preview_every
            .iter()
            .any(|&n| n > 0 && (step.is_multiple_of(n) || step == steps))
    }

    fn preview(&self, step: usize, png: Vec<u8>) {
        use base64::Engine as _;
        let mut i = self.lock();
        let data = json!({
            "step": step,
            "steps": i.steps,
            "image": base64::engine::general_purpose::STANDARD.encode(&png),
        });
        self.push(&mut i, "preview", data, Some(step));
    }

    fn cancelled_at(&self) -> Option<Instant> {
        self.cancelled.get().copied()
    }
}

/// The bounds of the store.
#[derive(Clone, Debug)]
pub struct StoreLimits {
    pub ttl: Duration,
    pub max_jobs: usize,
    pub max_bytes: usize,
}

/// Every job that can still be asked about.
pub struct JobStore {
    jobs: Mutex<HashMap<String, Arc<JobRecord>>>,
    limits: StoreLimits,
}

impl JobStore {
    pub fn new(limits: StoreLimits) -> Self {
        Self {
            jobs: Mutex::new(HashMap::new()),
            limits,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<JobRecord>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forget expired jobs, then the oldest finished ones while over the
    /// count or byte bound.
    fn sweep(&self, jobs: &mut HashMap<String, Arc<JobRecord>>) {
        self.sweep_to(jobs, self.limits.max_jobs);
    }

    /// [`Self::sweep`] down to at most `max` jobs.
    fn sweep_to(&self, jobs: &mut HashMap<String, Arc<JobRecord>>, max: usize) {
        let now = Instant::now();
        jobs.retain(|_, r| !r.expired(self.limits.ttl, now));
        let mut bytes: usize = jobs.values().map(|r| r.lock().bytes).sum();
        while jobs.len() > max || bytes > self.limits.max_bytes {
            let oldest = jobs
                .iter()
                .filter_map(|(id, r)| r.lock().finished.map(|f| (f, id.clone())))
                .min();
            let Some(r) = oldest.and_then(|(_, id)| jobs.remove(&id)) else {
                break;
            };
            bytes -= r.lock().bytes;
        }
    }

    /// Keep a new job; refused when the store is full of unfinished jobs.
    pub fn insert(&self, rec: Arc<JobRecord>) -> Result<()> {
        let mut jobs = self.lock();
        // Room for one more.
        self.sweep_to(&mut jobs, self.limits.max_jobs.saturating_sub(1));
        if jobs.len() >= self.limits.max_jobs {
            return Err(Error::Overloaded {
                capacity: self.limits.max_jobs,
            });
        }
        jobs.insert(rec.id.clone(), rec);
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<Arc<JobRecord>> {
        let mut jobs = self.lock();
        self.sweep(&mut jobs);
        jobs.get(id).cloned()
    }
}

/// `--webhook-allow`: the hosts (`host` or `host:port`) callbacks may go to.
#[derive(Clone, Debug, Default)]
pub struct WebhookAllow(Vec<(String, Option<u16>)>);

impl WebhookAllow {
    pub fn parse(list: &[String]) -> Result<Self> {
        let mut out = Vec::new();
        for item in list.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let (host, port) = match item.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') || h.ends_with(']') => {
                    let p = p.parse::<u16>().map_err(|_| {
                        Error::param("webhook_allow", format!("`{item}`: bad port"))
                    })?;
                    (h, Some(p))
                }
                _ => (item, None),
            };
            if host.is_empty() || host.contains('/') {
                return Err(Error::param(
                    "webhook_allow",
                    format!("`{item}` is not a host or host:port"),
                ));
            }
            out.push((host.to_ascii_lowercase(), port));
        }
        Ok(Self(out))
    }

    /// A regular expression for the URLs [`Self::check`] accepts (for the
    /// served document), `None` when no host is allowed.
    pub fn pattern(&self) -> Option<String> {
        if self.0.is_empty() {
            return None;
        }
        let hosts: Vec<String> = self
            .0
            .iter()
            .map(|(h, p)| {
                let h: String = h
                    .chars()
                    .flat_map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' {
                            vec![c]
                        } else {
                            vec!['\\', c]
                        }
                    })
                    .collect();
                match p {
                    Some(p) => format!("{h}:{p}"),
                    None => h,
                }
            })
            .collect();
        Some(format!("^https?://({})([/?#].*)?$", hosts.join("|")))
    }

    /// A `callback_url` the server may POST to, or why not.
    pub fn check(&self, raw: &str) -> Result<url::Url> {
        let field = "callback_url";
        let url = url::Url::parse(raw)
            .map_err(|e| Error::param(field, format!("`{raw}` is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::param(field, "must be an http or https URL"));
        }
        let host = url.host_str().unwrap_or("").to_ascii_lowercase();
        let port = url.port_or_known_default();
        let allowed = self
            .0
            .iter()
            .any(|(h, p)| *h == host && (p.is_none() || *p == port));
        if !allowed {
            let hint = if self.0.is_empty() {
                "this server allows no callbacks (start it with --webhook-allow HOST[:PORT])"
                    .to_string()
            } else {
                format!("`{host}` is not in --webhook-allow")
            };
            return Err(Error::param(field, hint));
        }
        Ok(url)
    }
}

/// POST the job's final status to its callback URL (no redirects, 10 s),
/// on the blocking pool; failures are logged.
pub fn send_callback(rec: &Arc<JobRecord>) {
    let Some(url) = rec.callback_url.clone() else {
        return;
    };
    let body = match serde_json::to_value(rec.status()) {
        Ok(v) => v,
        Err(_) => return,
    };
    let id = rec.id.clone();
    tokio::task::spawn_blocking(move || {
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout(Duration::from_secs(10))
            .build();
        match agent.post(url.as_str()).send_json(body) {
            Ok(r) => tracing::info!(job = %id, status = r.status(), "callback delivered"),
            Err(e) => tracing::warn!(job = %id, error = %e, "callback failed"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callbacks_go_only_to_allowed_hosts() {
        let none = WebhookAllow::parse(&[]).unwrap();
        assert!(none.check("http://127.0.0.1:9/x").is_err());
        let allow =
            WebhookAllow::parse(&["hooks.example.com".into(), "127.0.0.1:8099".into()]).unwrap();
        assert!(allow.check("https://hooks.example.com/lumen").is_ok());
        assert_eq!(none.pattern(), None);
        assert_eq!(
            allow.pattern().unwrap(),
            r"^https?://(hooks\.example\.com|127\.0\.0\.1:8099)([/?#].*)?$"
        );
        assert!(allow.check("http://127.0.0.1:8099/done").is_ok());
        for bad in [
            "http://127.0.0.1:8100/done",
            "http://169.254.169.254/latest/meta-data",
            "file:///etc/passwd",
            "http://hooks.example.com.evil.net/",
            "not a url",
        ] {
            let e = allow.check(bad).unwrap_err();
            assert_eq!(e.field(), Some("callback_url"), "{bad}: {e}");
        }
    }

    #[test]
    fn times_are_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_626_400_123);
        assert_eq!(rfc3339(t), "2025-12-01T22:00:00.123Z");
    }

    #[test]
    fn finished_jobs_expire_and_the_oldest_go_first() {
        let store = JobStore::new(StoreLimits {
            ttl: Duration::from_millis(50),
            max_jobs: 2,
            max_bytes: 1 << 20,
        });
        let a = JobRecord::new(None);
        let b = JobRecord::new(None);
        store.insert(a.clone()).unwrap();
        store.insert(b.clone()).unwrap();
        // Full of unfinished jobs: refused.
        assert!(store.insert(JobRecord::new(None)).is_err());
        a.finish(Ok(json!({"images": []})));
        let c = JobRecord::new(None);
        store.insert(c.clone()).unwrap();
        assert!(store.get(&a.id).is_none(), "the finished job made room");
        assert!(store.get(&b.id).is_some());
        b.finish(Err(ErrorDetail {
            code: "cancelled".into(),
            message: "x".into(),
        }));
        assert_eq!(b.state(), JobState::Cancelled);
        std::thread::sleep(Duration::from_millis(60));
        assert!(store.get(&b.id).is_none(), "expired after the TTL");
        assert!(store.get(&c.id).is_some());
    }
}
