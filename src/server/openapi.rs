//! The OpenAPI document, generated from the code: utoipa derives the paths
//! and the types, then [`document`] states exactly what the server accepts:
//! - the request bodies (JSON and multipart, with their guide `image` and
//!   `layout_id`, exactly one of them) built from the request model's types;
//! - every field's bounds, choices and defaults from the request model's
//!   rules (`pipeline::request::rules`), the same values validation enforces;
//! - the media types of images in and out.
//!
//! Without a model ([`openapi_json`], committed as `openapi/openapi.json`)
//! the bounds are those every model shares; `/openapi.json` of a running
//! server adds the loaded model's (Kmax, the size multiple, the patch size)
//! and the deployment's `--max-*` limits.

use serde_json::{json, Map, Value};
use utoipa::OpenApi;

use crate::pipeline::layout_id;
use crate::pipeline::request::{rules, Bounds, FieldRule, Limits};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "lumen",
        description = "Label-free neural semantic image synthesis: a guide image becomes a neural layout (DINOv2 patch features reduced by PCA to K components), and a layout-conditioned latent diffusion model makes new images with the same scene layout.",
        license(name = "Apache-2.0")
    ),
    paths(
        crate::server::handlers::layout::layout,
        crate::server::handlers::synthesize::synthesize,
        crate::server::handlers::jobs::create,
        crate::server::handlers::jobs::get,
        crate::server::handlers::jobs::cancel,
        crate::server::handlers::jobs::events,
        crate::server::handlers::status::health,
        crate::server::handlers::status::ready,
        crate::server::handlers::status::metrics,
    ),
    components(schemas(
        crate::pipeline::request::LayoutRequest,
        crate::pipeline::request::SynthesisRequest,
        crate::pipeline::request::SynthesisParameters,
        crate::server::api::LayoutResponse,
        crate::server::api::SynthesizeResponse,
        crate::server::api::ImageOut,
        crate::server::api::Timings,
        crate::server::api::ErrorBody,
        crate::server::api::ErrorDetail,
        crate::server::api::Status,
        crate::server::jobs::JobAccepted,
        crate::server::jobs::JobStatus,
        crate::server::jobs::JobLinks,
        crate::server::jobs::JobState
    )),
    modifiers(&SecurityAddon),
    tags(
        (name = "lumen", description = "Neural layouts and layout-conditioned synthesis"),
        (name = "jobs", description = "Asynchronous syntheses: progress, previews, cancel")
    )
)]
struct ApiDoc;

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// The image types a guide may be.
pub const GUIDE_MEDIA_TYPES: [&str; 3] = ["image/png", "image/jpeg", "image/webp"];

/// The document for `limits` and, when a model is loaded, its bounds.
pub fn document(limits: &Limits, bounds: Option<&Bounds>) -> Value {
    document_with(limits, bounds, None)
}

/// [`document`] for a deployment whose `--webhook-allow` gives `callbacks`:
/// `callback_url` is then limited to those hosts (a pattern), or absent when
/// none is allowed, so a schema-valid body is one the server accepts.
pub fn document_with(
    limits: &Limits,
    bounds: Option<&Bounds>,
    callbacks: Option<&crate::server::jobs::WebhookAllow>,
) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    doc["info"]["version"] = json!(env!("CARGO_PKG_VERSION"));
    if let Some(b) = bounds {
        doc["info"]["x-lumen-model"] = json!(b.model);
    }
    let rules = rules(limits, bounds);
    let schemas = &mut doc["components"]["schemas"];
    let layout = take_schema(schemas, "LayoutRequest");
    let synthesis = take_schema(schemas, "SynthesisRequest");
    for (name, base, json, synth) in [
        ("LayoutJson", &layout, true, false),
        ("LayoutForm", &layout, false, false),
        ("SynthesizeJson", &synthesis, true, true),
        ("SynthesizeForm", &synthesis, false, true),
    ] {
        schemas[name] = request_body(base, json, synth, &rules);
        if let (true, Some(allow)) = (synth, callbacks) {
            match allow.pattern() {
                Some(p) => schemas[name]["properties"]["callback_url"]["pattern"] = json!(p),
                None => {
                    if let Some(props) = schemas[name]["properties"].as_object_mut() {
                        props.remove("callback_url");
                    }
                }
            }
        }
    }
    for (path, json_name, form_name) in [
        ("/layout", "LayoutJson", "LayoutForm"),
        ("/synthesize", "SynthesizeJson", "SynthesizeForm"),
        ("/jobs", "SynthesizeJson", "SynthesizeForm"),
    ] {
        let op = &mut doc["paths"][path]["post"];
        let content = &mut op["requestBody"]["content"];
        content["application/json"] =
            json!({"schema": {"$ref": format!("#/components/schemas/{json_name}")}});
        content["multipart/form-data"] = json!({
            "schema": {"$ref": format!("#/components/schemas/{form_name}")},
            "encoding": {"image": {"contentType": GUIDE_MEDIA_TYPES.join(", ")}},
        });
        if let Some(responses) = op["responses"].as_object_mut() {
            for r in responses.values_mut() {
                if let Some(content) = r["content"].as_object_mut() {
                    for (mime, media) in content.iter_mut() {
                        if mime != "application/json" {
                            media["schema"] = json!({"type": "string", "contentMediaType": mime});
                        }
                    }
                }
            }
        }
    }
    doc
}

/// The committed document: [`document`] with the default limits and no model.
pub fn openapi_json() -> String {
    to_pretty(&document(&Limits::default(), None))
}

/// Pretty JSON with a final newline.
pub fn to_pretty(doc: &Value) -> String {
    let mut s =
        serde_json::to_string_pretty(doc).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

fn take_schema(schemas: &mut Value, name: &str) -> Value {
    schemas
        .as_object_mut()
        .and_then(|m| m.remove(name))
        .unwrap_or_else(|| json!({"type": "object", "properties": {}}))
}

/// A request body schema from a request type's schema: the rules applied,
/// the guide fields added, `null` allowed in JSON (it means "the default")
/// and not in multipart (a text part has no null).
fn request_body(base: &Value, json: bool, synthesis: bool, rules: &[FieldRule]) -> Value {
    let mut props: Map<String, Value> = base["properties"].as_object().cloned().unwrap_or_default();
    for (name, p) in props.iter_mut() {
        if !json {
            strip_null(p);
        }
        if let Some(rule) = rules.iter().find(|r| r.name == name) {
            apply(p, rule, json);
        }
        if name == "seed" {
            // Any u64 (OpenAPI's `int64` format would cap it at 2^63 - 1).
            if let Some(o) = p.as_object_mut() {
                o.remove("format");
            }
            p["maximum"] = json!(u64::MAX);
        }
    }
    let nullable = |t: &str| if json { json!([t, "null"]) } else { json!(t) };
    let image = if json {
        json!({
            "type": nullable("string"),
            "format": "byte",
            "minLength": 1,
            "description": format!(
                "The guide image ({}), base64 (standard alphabet, padding optional, a `data:` URL prefix allowed).",
                GUIDE_MEDIA_TYPES.join(", ")
            ),
        })
    } else {
        json!({
            "type": "string",
            "format": "binary",
            "description": format!("The guide image file ({}).", GUIDE_MEDIA_TYPES.join(", ")),
        })
    };
    props.insert("image".into(), image);
    if synthesis {
        props.insert(
            "callback_url".into(),
            json!({
                "type": if json { nullable("string") } else { json!("string") },
                "format": "uri",
                "description": "Asynchronous jobs only (POST /jobs, or /synthesize with `Prefer: respond-async`): the final status is POSTed here. Only hosts in the server's --webhook-allow are accepted (none by default).",
            }),
        );
    }
    let mut schema = json!({
        "type": "object",
        "description": base["description"],
        "additionalProperties": false,
    });
    if synthesis && json {
        props.insert(
            "layout_id".into(),
            json!({
                "type": nullable("string"),
                "pattern": layout_id::PATTERN,
                "description": "A `layout_id` returned by `POST /layout` (or in an earlier synthesis' parameters) instead of an image.",
            }),
        );
        // Exactly one of image and layout_id (given: present and not null);
        // layout_size only with an image.
        let given =
            |field: &str, t: &str| json!({"required": [field], "properties": {field: {"type": t}}});
        schema["oneOf"] = json!([given("image", "string"), given("layout_id", "string")]);
        schema["not"] = json!({
            "required": ["layout_id", "layout_size"],
            "properties": {"layout_id": {"type": "string"}, "layout_size": {"type": "integer"}},
        });
    } else {
        // A layout alone, or a multipart request, uploads its guide image.
        // (A multipart body has no layout_id: JSON carries it.)
        schema["required"] = json!(["image"]);
        if json {
            props["image"]["type"] = json!("string");
        }
    }
    schema["properties"] = Value::Object(props);
    schema
}

fn strip_null(p: &mut Value) {
    if let Some(types) = p["type"].as_array() {
        let kept: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
        p["type"] = if kept.len() == 1 {
            kept[0].clone()
        } else {
            Value::Array(kept)
        };
    }
}

fn apply(p: &mut Value, rule: &FieldRule, json: bool) {
    let num = |x: f64| {
        if x.fract() == 0.0 && x.abs() < 9e15 {
            json!(x as i64)
        } else {
            json!(x)
        }
    };
    if let Some(v) = rule.minimum {
        p["minimum"] = num(v);
    }
    if let Some(v) = rule.maximum {
        p["maximum"] = num(v);
    }
    if let Some(m) = rule.multiple_of {
        p["multipleOf"] = json!(m);
    }
    if let Some(choices) = &rule.choices {
        let mut e: Vec<Value> = choices.iter().map(|c| json!(c)).collect();
        if json {
            e.push(Value::Null);
        }
        p["enum"] = Value::Array(e);
    }
    if let Some(d) = &rule.default {
        p["default"] = d.clone();
    }
}
