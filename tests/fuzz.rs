//! Property tests of the request parsers, on the stable toolchain: arbitrary
//! bytes and mutated valid requests sent to the in-process router (JSON and
//! multipart bodies, base64, the image header checks), the guide decoder
//! itself, and the layout-id parser. None may panic; every refusal is a 4xx
//! with a JSON error whose message names a field, the body or the image.
//!
//! Cases per property: 96 by default (about a minute for the file), or
//! `PROPTEST_CASES`.

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::app::{call, form_body, post, Answer};
use common::{b64, guide_bytes};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Map, Value};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

/// Answers seen, by status (printed per property, for the record).
type Tally = std::sync::Mutex<std::collections::BTreeMap<u16, usize>>;

fn send(req: Request<Body>, tally: &Tally) -> Answer {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let a = RT
        .get_or_init(|| tokio::runtime::Runtime::new().expect("runtime"))
        .block_on(call(req));
    *tally.lock().unwrap().entry(a.status.as_u16()).or_default() += 1;
    a
}

fn report(what: &str, tally: &Tally) {
    let t = tally.lock().unwrap();
    eprintln!(
        "{what}: {} requests, by status {t:?}",
        t.values().sum::<usize>()
    );
}

/// 200, or a 4xx whose JSON error names what was wrong.
fn check(a: &Answer, what: &str) -> Result<(), TestCaseError> {
    if a.status == StatusCode::OK {
        return Ok(());
    }
    prop_assert!(
        a.status.is_client_error(),
        "{what}: status {} {}",
        a.status,
        String::from_utf8_lossy(&a.body)
    );
    let v: Value = serde_json::from_slice(&a.body)
        .map_err(|_| TestCaseError::fail(format!("{what}: {} without a JSON body", a.status)))?;
    let code = v["error"]["code"].as_str().unwrap_or("");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    prop_assert!(!code.is_empty() && !msg.is_empty(), "{what}: {v}");
    if a.status == StatusCode::BAD_REQUEST || a.status == StatusCode::UNPROCESSABLE_ENTITY {
        let named = msg.contains('`')
            || ["body", "image", "JSON", "multipart", "field"]
                .iter()
                .any(|w| msg.contains(w));
        prop_assert!(named, "{what}: the message names nothing: {msg}");
    }
    Ok(())
}

const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "multipart/form-data; boundary=lumen-test-boundary-7c1e",
    "multipart/form-data",
    "text/plain",
    "application/json; charset=utf-8",
    "",
];

#[test]
fn arbitrary_bodies_get_json_errors() {
    let strategy = (
        prop::sample::select(vec!["/layout", "/synthesize"]),
        prop::sample::select(CONTENT_TYPES.to_vec()),
        prop::collection::vec(any::<u8>(), 0..1500),
    );
    let tally = Tally::default();
    runner()
        .run(&strategy, |(path, ctype, body)| {
            let mut req = post(path);
            if !ctype.is_empty() {
                req = req.header(header::CONTENT_TYPE, ctype);
            }
            let a = send(req.body(Body::from(body)).unwrap(), &tally);
            prop_assert!(a.status != StatusCode::OK, "garbage was accepted");
            check(&a, &format!("{path} {ctype}"))
        })
        .unwrap();
    report("arbitrary bodies", &tally);
}

/// Values that probe every field's type and range checks; none asks for a
/// large image or many steps, so accepted requests stay quick.
fn odd_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![
            json!(null),
            json!(true),
            json!(-1),
            json!(0),
            json!(1),
            json!(2),
            json!(7),
            json!(65),
            json!(3.5),
            json!(-0.0),
            json!(1e30),
            json!(18446744073709551615u64),
            json!(""),
            json!("x"),
            json!("ddim"),
            json!("png"),
            json!([]),
            json!([1, 2]),
            json!({}),
            json!({"a": 1}),
        ]),
        "[ -~]{0,40}".prop_map(Value::String),
        any::<i64>().prop_map(|v| json!(v)),
    ]
}

const FIELDS: &[&str] = &[
    "image",
    "layout_id",
    "components",
    "layout_size",
    "format",
    "prompt",
    "negative_prompt",
    "steps",
    "guidance_scale",
    "control_scale",
    "scheduler",
    "seed",
    "num_images",
    "width",
    "height",
    "score",
    "unknown_field",
];

/// The guide, mutated: bytes flipped, cut, or replaced.
fn odd_image() -> impl Strategy<Value = Vec<u8>> {
    let guide = guide_bytes();
    let n = guide.len();
    prop_oneof![
        (0..n).prop_map({
            let g = guide.clone();
            move |cut| g[..cut].to_vec()
        }),
        prop::collection::vec((0..n, any::<u8>()), 1..8).prop_map({
            let g = guide.clone();
            move |flips| {
                let mut g = g.clone();
                for (i, v) in flips {
                    g[i] = v;
                }
                g
            }
        }),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

/// A valid request, then some fields set to odd values or removed, and the
/// image mutated or replaced by a string that may not be base64.
fn mutated(path: &'static str) -> impl Strategy<Value = (Value, Vec<u8>)> {
    (
        prop::collection::vec(
            (
                prop::sample::select(FIELDS.to_vec()),
                prop::option::weighted(0.85, odd_value()),
            ),
            0..3,
        ),
        prop::option::of(odd_image()),
        prop::option::weighted(0.2, "[ -~]{0,24}"),
    )
        .prop_map(move |(edits, img, raw_image)| {
            let mut m = Map::new();
            m.insert("image".into(), json!(b64(&guide_bytes())));
            if path == "/synthesize" {
                m.insert("steps".into(), json!(2));
                m.insert("width".into(), json!(64));
                m.insert("height".into(), json!(64));
            }
            for (field, value) in edits {
                match value {
                    Some(v) => m.insert(field.into(), v),
                    None => m.remove(field),
                };
            }
            if let Some(raw) = raw_image {
                m.insert("image".into(), json!(raw));
            } else if let (Some(img), true) = (&img, m.get("image").is_some_and(Value::is_string)) {
                m.insert("image".into(), json!(b64(img)));
            }
            (Value::Object(m), img.unwrap_or_else(guide_bytes))
        })
}

#[test]
fn mutated_json_requests_never_crash() {
    let tally = Tally::default();
    for path in ["/layout", "/synthesize"] {
        runner()
            .run(&mutated(path), |(body, _)| {
                let req = post(path)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(body.to_string()))
                    .unwrap();
                check(&send(req, &tally), &format!("{path} {body:.300}"))
            })
            .unwrap();
    }
    report("mutated JSON", &tally);
}

#[test]
fn mutated_multipart_requests_never_crash() {
    let tally = Tally::default();
    for path in ["/layout", "/synthesize"] {
        runner()
            .run(&mutated(path), |(body, img)| {
                let obj = body.as_object().expect("an object");
                let texts: Vec<(String, String)> = obj
                    .iter()
                    .filter(|(k, _)| k.as_str() != "image")
                    .map(|(k, v)| {
                        let t = match v {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        (k.clone(), t)
                    })
                    .collect();
                let mut parts: Vec<(&str, common::app::Part)> = texts
                    .iter()
                    .map(|(k, v)| (k.as_str(), common::app::Part::Text(v.as_str())))
                    .collect();
                if obj.contains_key("image") {
                    parts.push(("image", common::app::Part::File(&img)));
                }
                let (ctype, bytes) = form_body(&parts);
                let req = post(path)
                    .header(header::CONTENT_TYPE, ctype)
                    .body(Body::from(bytes))
                    .unwrap();
                check(&send(req, &tally), &format!("multipart {path} {body:.300}"))
            })
            .unwrap();
    }
    report("mutated multipart", &tally);
}

#[test]
fn the_guide_decoder_never_panics() {
    runner()
        .run(&odd_image(), |bytes| {
            match lumen::guide::decode(&bytes, 4_000_000) {
                Ok(img) => prop_assert!(img.width() > 0 && img.height() > 0),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn layout_ids_parse_back_and_nothing_else_panics() {
    use lumen::pipeline::layout_id::{layout_id, parse};
    runner()
        .run(&"[0-9a-fA-F]{32}", |key| {
            // K has at most 19 digits (the id pattern's bound; K ≤ Kmax anyway).
            for k in [0usize, 1, 64, 9_999_999_999_999_999_999] {
                let id = layout_id(&key, k);
                prop_assert_eq!(parse(&id).unwrap(), (key.as_str(), k));
            }
            Ok(())
        })
        .unwrap();
    let noise = prop_oneof![
        any::<String>(),
        "[0-9a-f]{30,34}-[0-9]{0,22}",
        "[0-9a-f-]{0,40}",
    ];
    runner()
        .run(&noise, |s| {
            if let Ok((key, k)) = parse(&s) {
                prop_assert_eq!(format!("{key}-{k}").len() <= s.len(), true);
                prop_assert!(key.len() == 32 && key.bytes().all(|b| b.is_ascii_hexdigit()));
            }
            Ok(())
        })
        .unwrap();
}
