//! `lumen serve` in-process: the router of a started service (`models/tiny`), called with `tower::ServiceExt::oneshot`, no TCP. One service per
//! test binary runs on its own runtime, shared by every test.
#![allow(dead_code)]

use std::sync::OnceLock;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use clap::Parser;
use serde_json::Value;
use tower::ServiceExt;

/// The API key of the shared service.
pub const KEY: &str = "sesame";

/// Start a service with `lumen serve` flags on a runtime of its own and wait
/// until it is ready.
pub fn start(flags: &[&str]) -> Router {
    let tiny = super::tiny_models();
    let mut argv = vec!["lumen", "serve", "--models", &tiny];
    argv.extend_from_slice(flags);
    let cli = lumen::cli::Cli::try_parse_from(argv).expect("serve flags parse");
    let lumen::cli::Command::Serve(args) = cli.command else {
        unreachable!("a serve command")
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut service = lumen::server::Service::start(&args).expect("service starts");
            service.wait_ready().await.expect("models load");
            tx.send(service.router.clone()).expect("test waits");
            // Serve for as long as the test binary runs.
            std::future::pending::<()>().await;
        });
    });
    rx.recv().expect("service ready")
}

/// The shared service: `--api-key sesame --body-limit-mb 1`.
pub fn app() -> Router {
    static APP: OnceLock<Router> = OnceLock::new();
    APP.get_or_init(|| start(&["--api-key", KEY, "--body-limit-mb", "1"]))
        .clone()
}

/// An answer: status, headers, body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "not JSON ({}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Send a request to `router`.
pub async fn call_on(router: Router, req: Request<Body>) -> Answer {
    let res = router.oneshot(req).await.expect("the router answers");
    let status = res.status();
    let headers = res.headers().clone();
    let body = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .expect("a body");
    Answer {
        status,
        headers,
        body,
    }
}

/// Send a request to the shared service.
pub async fn call(req: Request<Body>) -> Answer {
    call_on(app(), req).await
}

/// A request builder for `POST path` carrying the shared key.
pub fn post(path: &str) -> axum::http::request::Builder {
    Request::post(path).header(header::AUTHORIZATION, format!("Bearer {KEY}"))
}

/// `POST path` with a JSON body (and the key).
pub fn json(path: &str, body: &Value) -> Request<Body> {
    post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// A multipart part.
pub enum Part<'a> {
    Text(&'a str),
    File(&'a [u8]),
}

/// A multipart/form-data body: (content type, bytes).
pub fn form_body(parts: &[(&str, Part)]) -> (String, Vec<u8>) {
    let boundary = "lumen-test-boundary-7c1e";
    let mut body = Vec::new();
    for (name, part) in parts {
        body.extend(format!("--{boundary}\r\n").as_bytes());
        match part {
            Part::Text(t) => {
                body.extend(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{t}\r\n")
                        .as_bytes(),
                );
            }
            Part::File(b) => {
                body.extend(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"g.png\"\r\n\
                         Content-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                );
                body.extend(*b);
                body.extend(b"\r\n");
            }
        }
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// `POST path` with a multipart body (and the key).
pub fn form(path: &str, parts: &[(&str, Part)]) -> Request<Body> {
    let (content_type, body) = form_body(parts);
    post(path)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body))
        .unwrap()
}

/// `GET path`.
pub fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}
