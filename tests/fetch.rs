//! `lumen fetch` against a stand-in Hugging Face Hub on loopback: an axum
//! server that answers the Hub's HTTP paths (`/api/models/{repo}/revision/{rev}`
//! and `/{repo}/resolve/{rev}/{file}` with Range, ETag and X-Repo-Commit) for
//! repositories cut from `models/tiny`. `HF_ENDPOINT` points the binary at it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use common::{root, s};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Default)]
struct Hub {
    /// repo id → (path in repo → bytes)
    repos: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    token: Option<String>,
    /// Every file request as "repo/file".
    log: Mutex<Vec<String>>,
}

type Shared = Arc<Hub>;

fn authorized(hub: &Hub, headers: &HeaderMap) -> bool {
    match &hub.token {
        None => true,
        Some(t) => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {t}")),
    }
}

async fn info(
    State(hub): State<Shared>,
    headers: HeaderMap,
    UrlPath(rest): UrlPath<String>,
) -> Response {
    if !authorized(&hub, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some((repo, _rev)) = rest.split_once("/revision/") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match hub.repos.get(repo) {
        Some(files) => Json(serde_json::json!({
            "sha": COMMIT,
            "siblings": files.keys().map(|f| serde_json::json!({"rfilename": f})).collect::<Vec<_>>(),
        }))
        .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn resolve(
    State(hub): State<Shared>,
    headers: HeaderMap,
    UrlPath((org, name, _rev, file)): UrlPath<(String, String, String, String)>,
) -> Response {
    if !authorized(&hub, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let repo = format!("{org}/{name}");
    let Some(data) = hub.repos.get(&repo).and_then(|r| r.get(&file)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    hub.log.lock().unwrap().push(format!("{repo}/{file}"));
    let size = data.len();
    let etag = format!("\"{:08x}{size:08x}\"", crc32fast::hash(data));
    let (start, end) = match headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
    {
        Some((a, b)) => {
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b.parse().unwrap_or(size.saturating_sub(1));
            (a.min(size), (b + 1).min(size))
        }
        None => (0, size),
    };
    let mut res = (
        if start == 0 && end == size && headers.get(header::RANGE).is_none() {
            StatusCode::OK
        } else {
            StatusCode::PARTIAL_CONTENT
        },
        data[start..end].to_vec(),
    )
        .into_response();
    let h = res.headers_mut();
    h.insert(header::ETAG, etag.parse().unwrap());
    h.insert("x-repo-commit", COMMIT.parse().unwrap());
    h.insert(
        header::CONTENT_RANGE,
        format!("bytes {start}-{}/{size}", end.saturating_sub(1))
            .parse()
            .unwrap(),
    );
    res
}

/// Files of `models/tiny/<dir>` keyed by their path under `prefix`.
fn files_of(dir: &str, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let base = root().join("models/tiny").join(dir);
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&base).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            out.insert(format!("{prefix}{name}"), std::fs::read(&p).unwrap());
        }
    }
    out
}

/// Start the stand-in Hub; returns its endpoint.
fn start_hub(hub: Shared) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = Router::new()
                .route("/api/models/{*rest}", get(info))
                .route("/{org}/{name}/resolve/{rev}/{*file}", get(resolve))
                .with_state(hub);
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    format!("http://{addr}")
}

fn standard_hub(token: Option<&str>) -> Hub {
    let mut repos = BTreeMap::new();
    repos.insert("facebook/dinov2-large".to_string(), files_of("encoder", ""));
    let mut sd = BTreeMap::new();
    for dir in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        sd.extend(files_of(dir, &format!("{dir}/")));
    }
    sd.insert(
        "model_index.json".into(),
        std::fs::read(root().join("models/tiny/model_index.json")).unwrap(),
    );
    // Files lumen does not need must not be downloaded.
    sd.insert("v1-5-pruned.ckpt".into(), vec![0u8; 4096]);
    sd.insert("unet/diffusion_pytorch_model.bin".into(), vec![0u8; 4096]);
    repos.insert(
        "stable-diffusion-v1-5/stable-diffusion-v1-5".to_string(),
        sd,
    );
    let mut cn = files_of("controlnet", "");
    cn.insert(
        "pca.safetensors".into(),
        std::fs::read(root().join("models/tiny/pca.safetensors")).unwrap(),
    );
    cn.insert(
        "lumen.json".into(),
        std::fs::read(root().join("models/tiny/lumen.json")).unwrap(),
    );
    repos.insert("lumen/controlnet-tiny".to_string(), cn);
    Hub {
        repos,
        token: token.map(str::to_string),
        log: Mutex::new(Vec::new()),
    }
}

fn fetch_cmd(endpoint: &str, home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lumen"));
    c.arg("fetch")
        .args(args)
        .arg("--quiet")
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", home)
        .env_remove("HF_TOKEN")
        .env_remove("RUST_LOG");
    c
}

/// Run [`fetch_cmd`] to its end.
fn fetch(endpoint: &str, home: &Path, args: &[&str]) -> Output {
    fetch_cmd(endpoint, home, args)
        .output()
        .expect("lumen runs")
}

/// Every file of models/tiny, relative.
fn tiny_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, base, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_path_buf());
            }
        }
    }
    let base = root().join("models/tiny");
    let mut v = Vec::new();
    walk(&base, &base, &mut v);
    v.sort();
    v
}

#[test]
fn fetch_assembles_a_working_model_folder_from_the_hub() {
    let hub = Arc::new(standard_hub(Some("hf_secret")));
    let endpoint = start_hub(hub.clone());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let home = tmp.path().join("hf-home");

    // Without the token the (gated) stand-in refuses, and the error says so.
    let o = fetch(
        &endpoint,
        &home,
        &["--out", s(&out), "--controlnet", "lumen/controlnet-tiny"],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("facebook/dinov2-large") && err.contains("401"),
        "{err}"
    );

    let o = fetch_cmd(
        &endpoint,
        &home,
        &["--out", s(&out), "--controlnet", "lumen/controlnet-tiny"],
    )
    .env("HF_TOKEN", "hf_secret")
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(!stdout.contains("fit-pca"), "a basis was fetched: {stdout}");

    // The folder holds exactly the files of models/tiny, byte for byte.
    for rel in tiny_files() {
        let a = std::fs::read(root().join("models/tiny").join(&rel)).unwrap();
        let b = std::fs::read(out.join(&rel))
            .unwrap_or_else(|_| panic!("{} not fetched", rel.display()));
        assert_eq!(a, b, "{} differs", rel.display());
    }
    let log = hub.log.lock().unwrap().clone();
    assert!(
        !log.iter()
            .any(|f| f.ends_with(".ckpt") || f.ends_with(".bin")),
        "fetched unneeded files: {log:?}"
    );

    // And it works as a model folder.
    let png = tmp.path().join("layout.png");
    common::ok(&[
        "layout",
        "--models",
        s(&out),
        "--image",
        s(&root().join("tests/fixtures/images/tiny-street.png")),
        "--out",
        s(&png),
    ]);

    // A second run is served from the cache (no file downloaded again).
    let before = log.len();
    let o = fetch_cmd(
        &endpoint,
        &home,
        &["--out", s(&out), "--controlnet", "lumen/controlnet-tiny"],
    )
    .env("HF_TOKEN", "hf_secret")
    .output()
    .unwrap();
    assert!(o.status.success());
    assert_eq!(
        hub.log.lock().unwrap().len(),
        before,
        "cached files were downloaded again"
    );
}

#[test]
fn fetch_with_a_local_controlnet_and_no_basis_asks_for_fit_pca() {
    let hub = Arc::new(standard_hub(None));
    let endpoint = start_hub(hub);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let local_cn = root().join("models/tiny/controlnet");
    let o = fetch(
        &endpoint,
        &tmp.path().join("home"),
        &["--out", s(&out), "--controlnet", s(&local_cn)],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("lumen fit-pca") && stdout.contains("pca.safetensors"),
        "{stdout}"
    );
    assert!(out
        .join("controlnet/diffusion_pytorch_model.safetensors")
        .is_file());
    assert!(!out.join("pca.safetensors").exists());

    // Unknown repositories and repositories without safetensors are named.
    let o = fetch(
        &endpoint,
        &tmp.path().join("home"),
        &["--out", s(&out), "--controlnet", "nobody/nothing"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nobody/nothing"));
    let o = fetch(
        &endpoint,
        &tmp.path().join("home"),
        &[
            "--out",
            s(&out),
            "--controlnet",
            s(&local_cn),
            "--encoder",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("model.safetensors") && err.contains("safetensors only"),
        "{err}"
    );
}

#[test]
fn fetch_without_a_controlnet_makes_a_training_base() {
    let hub = Arc::new(standard_hub(None));
    let endpoint = start_hub(hub);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("base");
    let o = fetch(
        &endpoint,
        &tmp.path().join("home"),
        &[
            "--out",
            s(&out),
            "--pca",
            s(&root().join("models/tiny/pca.safetensors")),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("no ControlNet") && stdout.contains("Train your own"),
        "{stdout}"
    );
    for part in [
        "encoder",
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
    ] {
        assert!(out.join(part).is_dir(), "{part}");
    }
    assert!(!out.join("controlnet").exists());
    // Layouts work on it; synthesis names the missing part.
    let png = tmp.path().join("layout.png");
    let guide = root().join("tests/fixtures/images/tiny-street.png");
    common::ok(&[
        "layout",
        "--models",
        s(&out),
        "--image",
        s(&guide),
        "--out",
        s(&png),
    ]);
    common::fails_with(
        &[
            "synthesize",
            "--models",
            s(&out),
            "--image",
            s(&guide),
            "--out",
            s(&png),
        ],
        &["controlnet"],
    );
}
