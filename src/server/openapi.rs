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
use crate::pipeline::request::{rules, Bounds, FieldRule, Limits, MAX_SEED};

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
        crate::server::handlers::jobs::image,
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

/// What a running deployment adds to the document.
#[derive(Clone, Copy, Default)]
pub struct Deployment<'a> {
    /// Its `--webhook-allow`: `callback_url` is then limited to those hosts
    /// (a pattern), or absent when none is allowed, so that a schema-valid
    /// body is one the server accepts. `None`: the generic document.
    pub callbacks: Option<&'a crate::server::jobs::WebhookAllow>,
    /// Whether an API key guards the API routes: their operations then
    /// require `bearer` or `api_key`; without one they state no security
    /// (generated clients then take a plain client).
    pub keyed: bool,
    /// `--protect-all`: the key also guards `/metrics` (and the document).
    pub protect_all: bool,
}

/// The guide the document's examples send: a bundled shapes example.
pub const EXAMPLE_GUIDE_PNG: &[u8] = include_bytes!("../../models/examples/shapes-guide.png");
/// Its caption, the examples' prompt.
pub const EXAMPLE_PROMPT: &str = "a red triangle and a green circle";

/// The document for `limits` and, when a model is loaded, its bounds.
pub fn document(limits: &Limits, bounds: Option<&Bounds>) -> Value {
    document_with(limits, bounds, Deployment::default())
}

/// [`document`] as a deployment serves it.
pub fn document_with(limits: &Limits, bounds: Option<&Bounds>, deployment: Deployment) -> Value {
    let callbacks = deployment.callbacks;
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
                            media["schema"] = binary(mime);
                        }
                    }
                }
            }
        }
    }
    let guide = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        EXAMPLE_GUIDE_PNG,
    );
    for (path, example) in [
        ("/layout", json!({"image": guide})),
        (
            "/synthesize",
            json!({"image": guide, "prompt": EXAMPLE_PROMPT, "seed": 1}),
        ),
        (
            "/jobs",
            json!({"image": guide, "prompt": EXAMPLE_PROMPT, "seed": 1}),
        ),
    ] {
        doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"] =
            example;
    }
    // Event ids stay exact in JavaScript; the server refuses larger ones.
    if let Some(params) = doc["paths"]["/jobs/{id}/events"]["get"]["parameters"].as_array_mut() {
        for p in params.iter_mut().filter(|p| p["name"] == "last-event-id") {
            p["schema"] = json!({"type": "integer", "minimum": 0, "maximum": MAX_SEED});
        }
    }
    // The stream as a whole is any value (`{}`: generated clients read it
    // as text). Each event's shape is OpenAPI 3.2's `itemSchema`, which a
    // 3.1 document can only carry as an extension.
    doc["paths"]["/jobs/{id}/events"]["get"]["responses"]["200"]["content"]["text/event-stream"] = json!({
        "schema": {},
        "x-itemSchema": {
            "type": "object",
            "required": ["event", "data", "id"],
            "properties": {
                "event": {"type": "string", "enum": ["queued", "progress", "preview", "succeeded", "failed", "cancelled"]},
                "data": {"type": "string", "description": "The event's fields, JSON"},
                "id": {"type": "string", "pattern": "^[0-9]+$"},
            },
        },
    });
    if let Some(image) = doc["paths"]["/jobs/{id}/images/{index}"]["get"]["responses"]["200"]
        ["content"]
        .as_object_mut()
    {
        for (mime, media) in image.iter_mut() {
            media["schema"] = binary(mime);
        }
    }
    for item in doc["paths"]
        .as_object_mut()
        .into_iter()
        .flat_map(|m| m.values_mut())
    {
        for op in item
            .as_object_mut()
            .into_iter()
            .flat_map(|m| m.values_mut())
        {
            operation_extras(op, deployment.keyed);
        }
    }
    if deployment.keyed && deployment.protect_all {
        doc["paths"]["/metrics"]["get"]["security"] = key_required();
    }
    doc
}

/// An operation's security when the key is needed: either scheme.
fn key_required() -> Value {
    json!([{"bearer": []}, {"api_key": []}])
}

/// A binary answer's schema.
fn binary(mime: &str) -> Value {
    json!({"type": "string", "format": "binary", "contentMediaType": mime})
}

/// An operation states its security as the deployment has it, and one
/// optional header: its own (`prefer`, `last-event-id`), else the
/// `x-request-id` every request may carry (kept, echoed and logged). One
/// optional parameter in each body operation keeps openapi-python-client's
/// modules importing `Unset` (its bug #1451); only one optional header,
/// because schemathesis' coverage phase counts an unknown header sent
/// beside two as a schema violation the server should refuse.
fn operation_extras(op: &mut Value, keyed: bool) {
    let Some(o) = op.as_object_mut() else {
        return;
    };
    if o.contains_key("security") {
        if keyed {
            o.insert("security".into(), key_required());
        } else {
            o.remove("security");
        }
    }
    let params = o.entry("parameters").or_insert_with(|| json!([]));
    if let Some(list) = params.as_array_mut() {
        // A header or query value is text: it is absent, never `null`.
        for schema in list.iter_mut().filter_map(|p| p.get_mut("schema")) {
            strip_null(schema);
        }
        if list.iter().any(|p| p["in"] == "header") {
            return;
        }
        list.push(json!({
            "name": "x-request-id",
            "in": "header",
            "required": false,
            "description": "Your id for this request: kept, echoed in the answer's `x-request-id` and written in the server's log line (a new UUID when absent).",
            "schema": {"type": "string"},
        }));
    }
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
        "description": base["description"].as_str().unwrap_or_default(),
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
        // layout_size only with an image. Said with if/then/else, which
        // validators apply and client generators pass over: the body stays
        // one object type with every property (a top-level oneOf becomes a
        // union of partial types in generated clients).
        schema["description"] = json!(format!(
            "{} Exactly one of `image` and `layout_id`; `layout_size` only with `image`.",
            base["description"].as_str().unwrap_or_default()
        ));
        schema["if"] =
            json!({"required": ["layout_id"], "properties": {"layout_id": {"type": "string"}}});
        schema["then"] =
            json!({"properties": {"image": {"type": "null"}, "layout_size": {"type": "null"}}});
        schema["else"] =
            json!({"required": ["image"], "properties": {"image": {"type": "string"}}});
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
        if x.fract() == 0.0 && x.abs() <= MAX_SEED as f64 {
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
        let choice = json!({"type": "string", "enum": choices});
        if json {
            // A choice or null: one enum type in generated clients (a
            // nullable `enum` with null in it becomes several).
            if let Some(o) = p.as_object_mut() {
                o.remove("type");
            }
            p["anyOf"] = json!([choice, {"type": "null"}]);
        } else {
            p["enum"] = choice["enum"].clone();
        }
    }
    if let Some(d) = &rule.default {
        p["default"] = d.clone();
    }
    if let Some(d) = &rule.model_default {
        p["x-lumen-default"] = d.clone();
    }
}
