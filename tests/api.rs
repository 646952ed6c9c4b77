//! The HTTP API in-process: the router of a started service (the random
//! `models/tiny`) called without TCP. Every bad input is its own test case; the
//! answers that carry numbers are checked against the CLI's.

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::app::{call, call_on, form, get, json, post, start, Answer, Part, KEY};
use common::{
    b64, f32s, guide_bytes, guide_path, max_pixel_diff, png_with_header, rgb, root, s, synth_body,
    unb64,
};
use serde_json::{json, Value};

/// Assert an error answer: status, `code`, and needles in the message.
fn refused(a: &Answer, status: StatusCode, code: &str, needles: &[&str]) {
    let v = a.json();
    assert_eq!(a.status, status, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    let msg = v["error"]["message"].as_str().expect("message");
    for n in needles {
        assert!(msg.contains(n), "message lacks `{n}`: {msg}");
    }
}

/// One test per bad request: `name: request => STATUS, "code", ["needle", …];`.
macro_rules! bad_requests {
    ($($name:ident: $req:expr => $status:ident, $code:literal, [$($needle:literal),*];)+) => {$(
        #[tokio::test]
        async fn $name() {
            let a = call($req).await;
            refused(&a, StatusCode::$status, $code, &[$($needle),*]);
        }
    )+};
}

fn image() -> String {
    b64(&guide_bytes())
}

fn layout_with(extra: Value) -> Request<Body> {
    let mut body = json!({"image": image()});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    json("/layout", &body)
}

fn synth_with(extra: Value) -> Request<Body> {
    let mut extra = extra;
    if extra.get("layout_id").is_none() && extra.get("image").is_none() {
        extra["image"] = json!(image());
    }
    json("/synthesize", &synth_body(extra))
}

/// The multipart twin of `synth_with`'s usual request (the CLI test's
/// parameters, seed 7) with one more text part.
fn synth_form(img: &[u8], extra: (&str, &str)) -> Request<Body> {
    form(
        "/synthesize",
        &[
            ("image", Part::File(img)),
            ("prompt", Part::Text("a quiet street")),
            ("steps", Part::Text("3")),
            ("width", Part::Text("64")),
            ("height", Part::Text("48")),
            ("scheduler", Part::Text("ddim")),
            ("seed", Part::Text("7")),
            (extra.0, Part::Text(extra.1)),
        ],
    )
}

fn with_header(mut req: Request<Body>, name: header::HeaderName, value: &str) -> Request<Body> {
    req.headers_mut().insert(name, value.parse().unwrap());
    req
}

fn jpeg_guide() -> Vec<u8> {
    let mut out = Vec::new();
    rgb(&guide_bytes())
        .write_to(
            &mut std::io::Cursor::new(&mut out),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    out
}

bad_requests! {
    // 401
    no_api_key: Request::post("/layout")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"image": image()}).to_string()))
        .unwrap() => UNAUTHORIZED, "unauthorized", ["API key"];
    wrong_api_key: Request::post("/layout")
        .header(header::AUTHORIZATION, "Bearer open")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"image": image()}).to_string()))
        .unwrap() => UNAUTHORIZED, "unauthorized", [];

    // 400 invalid_parameter: a value that is not allowed
    layout_components_zero: layout_with(json!({"components": 0}))
        => BAD_REQUEST, "invalid_parameter", ["`components`"];
    layout_components_over_kmax: layout_with(json!({"components": 99}))
        => BAD_REQUEST, "invalid_parameter", ["`components`", "1 to 16"];
    layout_size_below_a_patch: layout_with(json!({"layout_size": 3}))
        => BAD_REQUEST, "invalid_parameter", ["`layout_size`"];
    layout_size_over_the_limit: layout_with(json!({"layout_size": 4096}))
        => BAD_REQUEST, "invalid_parameter", ["`layout_size`", "2048"];
    layout_bad_base64: json("/layout", &json!({"image": "@@not base64@@"}))
        => BAD_REQUEST, "invalid_parameter", ["`image`", "base64"];
    layout_without_image: json("/layout", &json!({}))
        => BAD_REQUEST, "invalid_parameter", ["`image`", "missing"];
    layout_with_empty_image: json("/layout", &json!({"image": ""}))
        => BAD_REQUEST, "invalid_parameter", ["`image`"];
    synth_zero_steps: synth_with(json!({"steps": 0}))
        => BAD_REQUEST, "invalid_parameter", ["`steps`"];
    synth_too_many_steps: synth_with(json!({"steps": 5000}))
        => BAD_REQUEST, "invalid_parameter", ["`steps`"];
    synth_width_off_the_multiple: synth_with(json!({"width": 65}))
        => BAD_REQUEST, "invalid_parameter", ["`width`", "multiple of 16"];
    synth_height_over_the_limit: synth_with(json!({"height": 4096}))
        => BAD_REQUEST, "invalid_parameter", ["`height`", "2048"];
    synth_too_many_images: synth_with(json!({"num_images": 9}))
        => BAD_REQUEST, "invalid_parameter", ["`num_images`"];
    synth_unknown_scheduler: synth_with(json!({"scheduler": "pndm"}))
        => BAD_REQUEST, "invalid_parameter", ["`scheduler`", "ddim"];
    synth_unknown_format: synth_with(json!({"format": "gif"}))
        => BAD_REQUEST, "invalid_parameter", ["`format`"];
    synth_format_names_are_exact: synth_with(json!({"format": "PNG"}))
        => BAD_REQUEST, "invalid_parameter", ["`format`"];
    synth_guidance_out_of_range: synth_with(json!({"guidance_scale": 1e9}))
        => BAD_REQUEST, "invalid_parameter", ["`guidance_scale`", "1000"];
    synth_control_scale_out_of_range: synth_with(json!({"control_scale": -2000}))
        => BAD_REQUEST, "invalid_parameter", ["`control_scale`"];
    synth_components_over_kmax: synth_with(json!({"components": 17}))
        => BAD_REQUEST, "invalid_parameter", ["`components`"];
    synth_image_and_layout_id: synth_with(json!({"image": image(), "layout_id": format!("{}-3", "a".repeat(32))}))
        => BAD_REQUEST, "invalid_parameter", ["`layout_id`", "not both"];
    synth_malformed_layout_id: synth_with(json!({"layout_id": "not-an-id"}))
        => BAD_REQUEST, "invalid_parameter", ["`layout_id`"];
    synth_without_a_guide: json("/synthesize", &synth_body(json!({})))
        => BAD_REQUEST, "invalid_parameter", ["`image`", "layout_id"];

    // 400 invalid_request: the body does not read as the request
    layout_components_not_a_number: layout_with(json!({"components": "five"}))
        => BAD_REQUEST, "invalid_request", ["`components`"];
    layout_unknown_field: layout_with(json!({"colour": 1}))
        => BAD_REQUEST, "invalid_request", ["`colour`"];
    layout_image_not_a_string: json("/layout", &json!({"image": 5}))
        => BAD_REQUEST, "invalid_request", ["`image`"];
    layout_body_not_an_object: json("/layout", &json!([1, 2]))
        => BAD_REQUEST, "invalid_request", ["`body`"];
    layout_invalid_json: post("/layout")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"image\": "))
        .unwrap() => BAD_REQUEST, "invalid_request", ["invalid JSON"];
    synth_negative_seed: synth_with(json!({"seed": -1}))
        => BAD_REQUEST, "invalid_request", ["`seed`"];
    synth_fractional_steps: synth_with(json!({"steps": 2.5}))
        => BAD_REQUEST, "invalid_request", ["`steps`"];
    multipart_steps_not_a_number: form("/synthesize", &[("image", Part::File(b"x")), ("steps", Part::Text("many"))])
        => BAD_REQUEST, "invalid_request", ["`steps`", "not an integer"];
    multipart_null_is_not_a_number: form("/layout", &[("image", Part::File(b"x")), ("layout_size", Part::Text("null"))])
        => BAD_REQUEST, "invalid_request", ["`layout_size`"];
    multipart_unknown_part: form("/layout", &[("bogus", Part::Text("1"))])
        => BAD_REQUEST, "invalid_request", ["`bogus`"];
    multipart_layout_id_is_json_only: form("/synthesize", &[("layout_id", Part::Text("00000000000000000000000000000000-3"))])
        => BAD_REQUEST, "invalid_request", ["`layout_id`", "JSON"];
    multipart_repeated_part: form("/layout", &[("components", Part::Text("1")), ("components", Part::Text("2"))])
        => BAD_REQUEST, "invalid_request", ["`components`", "more than once"];

    seed_over_javascripts_exact_integers: synth_with(json!({"seed": 9007199254740992u64}))
        => BAD_REQUEST, "invalid_parameter", ["`seed`", "9007199254740991"];
    multipart_boolean_not_a_boolean: form("/synthesize", &[("image", Part::File(&guide_bytes())), ("score", Part::Text("yes"))])
        => BAD_REQUEST, "invalid_request", ["`score`", "1 or 0"];

    // 404, 405
    unknown_layout_id: synth_with(json!({"layout_id": format!("{}-3", "0".repeat(32))}))
        => NOT_FOUND, "unknown_layout", ["00000000000000000000000000000000-3"];
    unknown_route: get("/nowhere") => NOT_FOUND, "not_found", ["/nowhere"];
    wrong_method: get("/layout") => METHOD_NOT_ALLOWED, "method_not_allowed", [];

    // 406, 413, 415
    layout_not_acceptable: with_header(layout_with(json!({})), header::ACCEPT, "text/html")
        => NOT_ACCEPTABLE, "not_acceptable", ["text/html"];
    raw_answer_with_two_images: with_header(synth_with(json!({"num_images": 2})), header::ACCEPT, "image/png")
        => NOT_ACCEPTABLE, "not_acceptable", ["one image"];
    raw_answer_in_another_format: with_header(synth_with(json!({"format": "jpeg"})), header::ACCEPT, "image/png")
        => NOT_ACCEPTABLE, "not_acceptable", ["jpeg"];
    json_body_over_the_limit: json("/layout", &json!({"image": b64(&vec![7u8; 1_200_000])}))
        => PAYLOAD_TOO_LARGE, "payload_too_large", ["1048576"];
    multipart_body_over_the_limit: form("/layout", &[("image", Part::File(&vec![1u8; 1_500_000]))])
        => PAYLOAD_TOO_LARGE, "payload_too_large", [];
    text_body: post("/layout")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("hello"))
        .unwrap() => UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", ["text/plain"];
    no_content_type: post("/layout").body(Body::from("hello")).unwrap()
        => UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", [];

    // 422: images that cannot be decoded or are over the pixel limit
    layout_garbage_image: json("/layout", &json!({"image": b64(b"definitely not an image")}))
        => UNPROCESSABLE_ENTITY, "invalid_image", [];
    layout_truncated_png: json("/layout", &json!({"image": b64(&guide_bytes()[..guide_bytes().len() / 2])}))
        => UNPROCESSABLE_ENTITY, "invalid_image", [];
    layout_truncated_jpeg: json("/layout", &json!({"image": b64(&jpeg_guide()[..jpeg_guide().len() * 2 / 3])}))
        => UNPROCESSABLE_ENTITY, "invalid_image", ["truncated"];
    layout_zero_sized_image: json("/layout", &json!({"image": b64(&png_with_header(0, 16, None))}))
        => UNPROCESSABLE_ENTITY, "invalid_image", ["dimensions"];
    layout_huge_header: json("/layout", &json!({"image": b64(&png_with_header(100_000, 100_000, Some(b"x")))}))
        => UNPROCESSABLE_ENTITY, "image_too_large", ["10000000000 pixels"];
    layout_bad_pixel_data: json("/layout", &json!({"image": b64(&png_with_header(16, 16, Some(b"garbage")))}))
        => UNPROCESSABLE_ENTITY, "invalid_image", [];
    synth_garbage_image: synth_with(json!({"image": b64(b"definitely not an image")}))
        => UNPROCESSABLE_ENTITY, "invalid_image", [];
    synth_truncated_png: synth_with(json!({"image": b64(&guide_bytes()[..guide_bytes().len() / 2])}))
        => UNPROCESSABLE_ENTITY, "invalid_image", [];
    synth_huge_header: synth_with(json!({"image": b64(&png_with_header(100_000, 100_000, Some(b"x")))}))
        => UNPROCESSABLE_ENTITY, "image_too_large", [];
    multipart_garbage_image: form("/layout", &[("image", Part::File(b"definitely not an image"))])
        => UNPROCESSABLE_ENTITY, "invalid_image", [];
    multipart_truncated_jpeg: form("/layout", &[("image", Part::File(&jpeg_guide()[..200]))])
        => UNPROCESSABLE_ENTITY, "invalid_image", [];
}

#[tokio::test]
async fn the_key_may_come_as_x_api_key() {
    let req = Request::post("/layout")
        .header("x-api-key", KEY)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"image": image()}).to_string()))
        .unwrap();
    assert_eq!(call(req).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_layout_id_has_its_layout_size() {
    let a = call(layout_with(json!({"layout_size": 224}))).await;
    assert_eq!(a.status, StatusCode::OK);
    let id = a.json()["layout_id"].as_str().unwrap().to_string();
    let a = call(synth_with(json!({"layout_id": id, "layout_size": 224}))).await;
    refused(
        &a,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
        &["`layout_size`", "layout_id"],
    );
    let a = call(synth_with(json!({"layout_id": id, "layout_size": null}))).await;
    assert_eq!(a.status, StatusCode::OK, "null is the default");
    assert_eq!(a.json()["parameters"]["layout_size"], 224);
}

#[tokio::test]
async fn layout_answers_json_png_and_safetensors_like_the_cli() {
    let a = call(layout_with(json!({"components": 5}))).await;
    assert_eq!(a.status, StatusCode::OK);
    let v = a.json();
    assert_eq!(v["components"], 5);
    let grid = [
        v["grid"][0].as_u64().unwrap() as usize,
        v["grid"][1].as_u64().unwrap() as usize,
    ];
    let data = f32s(&unb64(&v["data"]));
    assert_eq!(data.len(), 5 * grid[0] * grid[1]);

    // The same numbers as `lumen layout` on the same image.
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
        "server vs CLI: {diff} (scale {scale})"
    );

    // The preview has the guide's size; Accept: image/png answers it raw.
    let preview = rgb(&unb64(&v["preview_png"]));
    assert_eq!(preview.dimensions(), rgb(&guide_bytes()).dimensions());
    let a = call(with_header(
        layout_with(json!({"components": 5})),
        header::ACCEPT,
        "image/png",
    ))
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers[header::CONTENT_TYPE], "image/png");
    assert_eq!(rgb(&a.body), preview);

    // Accept: application/octet-stream gives safetensors with tensor `layout`.
    let a = call(with_header(
        layout_with(json!({"components": 5})),
        header::ACCEPT,
        "application/octet-stream",
    ))
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let st = safetensors::SafeTensors::deserialize(&a.body).unwrap();
    let t = st.tensor("layout").unwrap();
    assert_eq!(t.shape(), &[5, grid[0], grid[1]]);
    assert_eq!(f32s(t.data()), data);

    // Multipart gives the same layout and id; another K is a prefix of it.
    let img = guide_bytes();
    let a = call(form(
        "/layout",
        &[("image", Part::File(&img)), ("components", Part::Text("5"))],
    ))
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let m = a.json();
    assert_eq!(m["layout_id"], v["layout_id"]);
    assert_eq!(f32s(&unb64(&m["data"])), data);
    let k2 = call(layout_with(json!({"components": 2}))).await.json();
    assert_eq!(
        &f32s(&unb64(&k2["data"]))[..],
        &data[..2 * grid[0] * grid[1]]
    );
    assert_ne!(k2["layout_id"], v["layout_id"]);
}

#[tokio::test]
async fn a_repeated_guide_comes_from_the_cache() {
    // A guide no other test sends (the metric is process-wide).
    let mut img = rgb(&guide_bytes());
    img.put_pixel(0, 0, image::Rgb([1, 2, 3]));
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    let body = json!({"image": b64(&bytes), "components": 3});
    assert_eq!(call(json("/layout", &body)).await.status, StatusCode::OK);
    let a = call(json(
        "/synthesize",
        &synth_body(json!({"image": b64(&bytes)})),
    ))
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.json()["timings"]["layout_ms"],
        0.0,
        "the encoder ran again"
    );
}

#[tokio::test]
async fn synthesize_matches_the_cli_in_every_format_and_input_form() {
    let a = call(synth_with(json!({"num_images": 2, "components": 6}))).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json());
    let v = a.json();
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(
        (images[0]["seed"].clone(), images[1]["seed"].clone()),
        (json!(7), json!(8))
    );
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
    let meta: Value =
        serde_json::from_str(&lumen::png_text::read(&png0, "parameters").unwrap()).unwrap();
    assert_eq!(
        (meta["seed"].clone(), meta["num_images"].clone()),
        (json!(7), json!(1))
    );
    let img1 = rgb(&unb64(&images[1]["data"]));
    assert!(
        max_pixel_diff(&img0, &img1) > 0,
        "different seeds, same image"
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
    let w = call(synth_with(json!({"layout_id": id}))).await;
    assert_eq!(w.status, StatusCode::OK);
    let w = w.json();
    assert_eq!(w["timings"]["layout_ms"], 0.0);
    assert_eq!(rgb(&unb64(&w["images"][0]["data"])), img0);

    // Accept: image/png with one image: the raw PNG, seed in a header.
    let a = call(with_header(
        synth_with(json!({"layout_id": id, "seed": 8})),
        header::ACCEPT,
        "image/png",
    ))
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers[header::CONTENT_TYPE], "image/png");
    assert_eq!(a.headers["x-lumen-seed"], "8");
    assert_eq!(rgb(&a.body), img1);

    // JPEG and (lossless) WebP, asked by `format` or by Accept.
    for (format, magic) in [("jpeg", &b"\xff\xd8"[..]), ("webp", &b"RIFF"[..])] {
        let f = call(synth_with(json!({"layout_id": id, "format": format})))
            .await
            .json();
        let bytes = unb64(&f["images"][0]["data"]);
        assert!(bytes.starts_with(magic), "{format}");
        assert_eq!(f["parameters"]["format"], format);
        let decoded = rgb(&bytes);
        if format == "webp" {
            assert_eq!(decoded, img0);
        } else {
            assert!(max_pixel_diff(&decoded, &img0) < 64);
        }
        let raw = call(with_header(
            synth_with(json!({"layout_id": id})),
            header::ACCEPT,
            &format!("image/{format}"),
        ))
        .await;
        assert_eq!(raw.status, StatusCode::OK);
        assert!(raw.body.starts_with(magic), "Accept image/{format}");
    }

    // Multipart with a file part gives the same image.
    let img = guide_bytes();
    let m = call(synth_form(&img, ("components", "6"))).await;
    assert_eq!(m.status, StatusCode::OK);
    assert_eq!(rgb(&unb64(&m.json()["images"][0]["data"])), img0);
}

#[tokio::test]
async fn scores_come_when_asked_and_match_the_cli() {
    let plain = call(synth_with(json!({"num_images": 2}))).await.json();
    assert!(plain["images"][0].get("score").is_none());
    assert_eq!(plain["timings"]["score_ms"], 0.0);
    let v = call(synth_with(json!({"num_images": 2, "score": true}))).await;
    assert_eq!(v.status, StatusCode::OK, "{}", v.json());
    let v = v.json();
    let scores: Vec<f64> = (0..2)
        .map(|i| v["images"][i]["score"].as_f64().unwrap())
        .collect();
    assert!(
        scores.iter().all(|s| (-1.0..=1.0).contains(s)),
        "{scores:?}"
    );
    assert_ne!(scores[0], scores[1]);
    // The same images get the same scores from a layout_id, raw, or multipart.
    let id = v["parameters"]["layout_id"].as_str().unwrap();
    let again = call(synth_with(
        json!({"layout_id": id, "score": true, "seed": 8}),
    ))
    .await
    .json();
    assert_eq!(again["images"][0]["score"].as_f64(), Some(scores[1]));
    let raw = call(with_header(
        synth_with(json!({"layout_id": id, "score": true})),
        header::ACCEPT,
        "image/png",
    ))
    .await;
    let header_score: f64 = raw.headers["x-lumen-score"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((header_score - scores[0]).abs() < 1e-6);
    let img = guide_bytes();
    let m = call(synth_form(&img, ("score", "true"))).await;
    assert_eq!(m.json()["images"][0]["score"].as_f64(), Some(scores[0]));
    let bad = call(form(
        "/synthesize",
        &[("image", Part::File(&img)), ("score", Part::Text("yes"))],
    ))
    .await;
    refused(&bad, StatusCode::BAD_REQUEST, "invalid_request", &["score"]);
    // `lumen synthesize --score` prints the same score.
    let tmp = tempfile::tempdir().unwrap();
    let out = common::ok(&[
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
        "--score",
        "--quiet",
        "--out",
        s(&tmp.path().join("x.png")),
    ]);
    let printed: f64 = out
        .split("score ")
        .nth(1)
        .and_then(|r| r.trim_end().trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("no score in {out}"));
    assert!(
        (printed - scores[0]).abs() < 1e-4,
        "{printed} vs {}",
        scores[0]
    );
}

#[tokio::test]
async fn cli_and_api_write_the_same_parameters_record() {
    // Defaults everywhere but the seed and a small size: both resolve them
    // through the same request model.
    let a = call(json(
        "/synthesize",
        &json!({"image": image(), "seed": 11, "width": 32}),
    ))
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let v = a.json();
    let api_png = unb64(&v["images"][0]["data"]);
    let api: Value =
        serde_json::from_str(&lumen::png_text::read(&api_png, "parameters").unwrap()).unwrap();
    assert_eq!(
        v["parameters"], api,
        "one image: the answer's record is the PNG's"
    );

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("d.png");
    common::ok(&[
        "synthesize",
        "--image",
        s(&guide_path()),
        "--seed",
        "11",
        "--width",
        "32",
        "--quiet",
        "--out",
        s(&out),
    ]);
    let cli_png = std::fs::read(&out).unwrap();
    let cli: Value =
        serde_json::from_str(&lumen::png_text::read(&cli_png, "parameters").unwrap()).unwrap();
    assert_eq!(cli, api);
    assert_eq!(api["steps"], 30);
    assert_eq!(api["guidance_scale"], 7.5);
    assert_eq!(api["control_scale"], 1.0);
    assert_eq!(api["components"], 8, "lumen.json's default_components");
    // The height follows the guide's aspect ratio (tiny-street.png is 96x64).
    assert_eq!(api["height"], 16);
    assert!(max_pixel_diff(&rgb(&cli_png), &rgb(&api_png)) <= 1);
}

#[tokio::test]
async fn openapi_documents_are_current_and_state_the_bounds() {
    let committed = std::fs::read_to_string(root().join("openapi/openapi.json")).unwrap();
    assert!(
        lumen::server::openapi::openapi_json() == committed,
        "openapi/openapi.json is stale: regenerate it with `cargo run -- openapi > openapi/openapi.json`"
    );
    let served: Value = call(get("/openapi.json")).await.json();
    let generic: Value = serde_json::from_str(&committed).unwrap();
    for path in ["/layout", "/synthesize", "/health", "/ready", "/metrics"] {
        assert!(served["paths"][path].is_object(), "{path} missing");
    }
    // The running server's document adds the model's bounds, nothing else.
    let schemas = &served["components"]["schemas"];
    assert!(schemas["SynthesizeForm"]["properties"]["layout_id"].is_null());
    assert_eq!(schemas["SynthesizeForm"]["required"], json!(["image"]));
    for name in ["SynthesizeJson", "SynthesizeForm"] {
        let props = &schemas[name]["properties"];
        assert_eq!(props["components"]["maximum"], 16, "{name}: Kmax");
        assert_eq!(props["width"]["multipleOf"], 16, "{name}: size multiple");
        assert_eq!(props["layout_size"]["minimum"], 14, "{name}: one patch");
        assert_eq!(
            props["steps"]["maximum"], 999,
            "{name}: DDIM cannot take 1000"
        );
        assert_eq!(props["scheduler"]["default"], "dpmpp-2m");
    }
    assert_eq!(
        schemas["SynthesizeForm"]["properties"]["steps"]["type"], "integer",
        "a multipart part has no null"
    );
    assert_eq!(
        schemas["SynthesizeJson"]["properties"]["steps"]["type"],
        json!(["integer", "null"])
    );
    // Model-dependent values are stated only with a model, and never as a
    // literal `default` where some requests must not send it.
    let synth = &schemas["SynthesizeJson"]["properties"];
    assert_eq!(
        synth["steps"]["default"], 30,
        "the tiny model's default_steps"
    );
    assert_eq!(synth["components"]["x-lumen-default"], 8);
    assert!(synth["components"]["default"].is_null());
    assert!(synth["layout_size"]["default"].is_null());
    let committed_synth = &generic["components"]["schemas"]["SynthesizeJson"]["properties"];
    for field in [
        "steps",
        "guidance_scale",
        "scheduler",
        "layout_size",
        "components",
    ] {
        assert!(committed_synth[field]["default"].is_null(), "{field}");
    }
    // Seeds fit JavaScript's exact integers; request bodies are one object
    // type each (no top-level oneOf/not); the keyed server's operations
    // need the key, the committed (keyless) document's state none.
    assert_eq!(synth["seed"]["maximum"], 9007199254740991u64);
    for name in [
        "SynthesizeJson",
        "LayoutJson",
        "SynthesizeForm",
        "LayoutForm",
    ] {
        assert!(
            schemas[name]["oneOf"].is_null() && schemas[name]["not"].is_null(),
            "{name}"
        );
    }
    assert_eq!(
        served["paths"]["/synthesize"]["post"]["security"],
        json!([{"bearer": []}, {"api_key": []}])
    );
    assert!(generic["paths"]["/synthesize"]["post"]["security"].is_null());
    let strip = |mut d: Value| {
        d["info"].as_object_mut().unwrap().remove("x-lumen-model");
        for item in d["paths"].as_object_mut().unwrap().values_mut() {
            for op in item.as_object_mut().unwrap().values_mut() {
                op.as_object_mut().unwrap().remove("security");
            }
        }
        for name in [
            "LayoutJson",
            "LayoutForm",
            "SynthesizeJson",
            "SynthesizeForm",
        ] {
            let props = d["components"]["schemas"][name]["properties"]
                .as_object_mut()
                .unwrap();
            // Served: limited to --webhook-allow hosts (absent with none).
            props.remove("callback_url");
            for p in props.values_mut() {
                for k in [
                    "maximum",
                    "minimum",
                    "multipleOf",
                    "default",
                    "x-lumen-default",
                ] {
                    p.as_object_mut().unwrap().remove(k);
                }
            }
        }
        d
    };
    assert_eq!(strip(served), strip(generic));
}

/// Every example in the served document is a request the server accepts
/// (Swagger UI sends them as they are from "Try it out").
#[tokio::test]
async fn every_example_in_the_document_is_accepted() {
    let served: Value = call(get("/openapi.json")).await.json();
    let mut sent = 0;
    for (path, item) in served["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Some(content) = op["requestBody"]["content"].as_object() else {
                continue;
            };
            for (mime, media) in content {
                let mut examples: Vec<Value> = media["examples"]
                    .as_object()
                    .map(|m| m.values().map(|e| e["value"].clone()).collect())
                    .unwrap_or_default();
                examples.extend(media.get("example").cloned());
                for example in examples {
                    assert_eq!(mime, "application/json", "{path}: only JSON examples");
                    assert_eq!(method, "post");
                    let a = call(json(path, &example)).await;
                    assert!(
                        a.status.is_success(),
                        "{method} {path}: example refused with {}: {}",
                        a.status,
                        String::from_utf8_lossy(&a.body)
                    );
                    sent += 1;
                }
            }
        }
    }
    assert_eq!(sent, 3, "/layout, /synthesize and /jobs have examples");
}

#[tokio::test]
async fn health_ready_metrics_docs_cors_and_request_ids() {
    let router = tokio::task::spawn_blocking(|| start(&["--cors-origin", "https://app.example"]))
        .await
        .unwrap();
    let req = |origin: &str| {
        Request::get("/health")
            .header(header::ORIGIN, origin)
            .header("x-request-id", "abc-123")
            .body(Body::empty())
            .unwrap()
    };
    let a = call_on(router.clone(), req("https://app.example")).await;
    assert_eq!(
        a.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://app.example"
    );
    assert_eq!(a.headers["x-request-id"], "abc-123");
    let a = call_on(router.clone(), get("/health")).await;
    assert!(!a.headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
    assert!(
        !a.headers["x-request-id"].is_empty(),
        "a request id is made"
    );
    let a = call_on(router.clone(), req("https://evil.example")).await;
    assert!(!a.headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
    for path in ["/health", "/ready"] {
        let a = call_on(router.clone(), get(path)).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.json()["status"], "ok");
        assert_eq!(a.json()["device"], "cpu");
        assert_eq!(a.json()["dtype"], "f32");
    }
    let docs = call_on(router.clone(), get("/docs/")).await;
    assert_eq!(docs.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&docs.body)
        .to_lowercase()
        .contains("swagger"));
    let m = call_on(router, get("/metrics")).await;
    let m = String::from_utf8(m.body.to_vec()).unwrap();
    for name in [
        "lumen_queue_depth",
        "lumen_queue_in_flight",
        "lumen_http_requests_total",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
}

/// `Accept` q-values choose among the answers a request can have; a raw
/// image that cannot be had falls back to JSON when JSON is acceptable.
#[tokio::test]
async fn accept_q_values_fall_back_to_json() {
    let both = "image/png, application/json;q=0.5";
    let a = call(with_header(
        synth_with(json!({"num_images": 2, "steps": 2})),
        header::ACCEPT,
        both,
    ))
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(a.json()["images"].as_array().unwrap().len(), 2);
    let a = call(with_header(
        synth_with(json!({"steps": 2})),
        header::ACCEPT,
        both,
    ))
    .await;
    assert_eq!(a.headers[header::CONTENT_TYPE], "image/png");
    let a = call(with_header(
        synth_with(json!({"steps": 2})),
        header::ACCEPT,
        "image/*;q=0.9, image/png;q=0, application/json;q=0.1",
    ))
    .await;
    assert_eq!(
        a.headers[header::CONTENT_TYPE],
        "image/jpeg",
        "png excluded, jpeg via image/*"
    );
}

/// The playground's files are served from the binary, with a policy that
/// keeps the page to this server.
#[tokio::test]
async fn the_playground_is_served_from_the_binary() {
    for (path, mime) in [
        ("/", "text/html; charset=utf-8"),
        ("/playground/app.js", "text/javascript; charset=utf-8"),
        ("/playground/style.css", "text/css; charset=utf-8"),
        ("/playground/examples/shapes-guide-3.png", "image/png"),
    ] {
        let a = call(get(path)).await;
        assert_eq!(a.status, StatusCode::OK, "{path}");
        assert_eq!(a.headers[header::CONTENT_TYPE], mime, "{path}");
        let csp = a.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("default-src 'self'") && csp.contains("script-src 'self'"));
    }
    let page = String::from_utf8(call(get("/")).await.body.to_vec()).unwrap();
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no outside URL"
    );
    let a = call(get("/playground/examples/nothing.png")).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}
