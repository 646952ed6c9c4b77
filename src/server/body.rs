//! Request bodies: JSON or multipart/form-data read into one map of fields,
//! then typed into the request model. Multipart text parts are typed by the
//! request type's own schema (the one the OpenAPI document shows), so the two
//! forms of a request cannot drift apart.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, StatusCode};
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::Error;
use crate::server::error::{ApiError, ApiResult};
use crate::server::state::AppState;

/// Bodies over the limit but at most this large are read and discarded
/// before the 413, so the client sees the answer.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

/// The JSON type of a request field, from its schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldType {
    Integer,
    Number,
    Boolean,
    String,
}

/// The field types of a request type, read from its utoipa schema.
pub fn field_types<T: utoipa::PartialSchema>() -> HashMap<String, FieldType> {
    let schema = serde_json::to_value(T::schema()).unwrap_or(Value::Null);
    let mut out = HashMap::new();
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, p) in props {
            let types: Vec<&str> = match p.get("type") {
                Some(Value::String(t)) => vec![t.as_str()],
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            let t = if types.contains(&"integer") {
                FieldType::Integer
            } else if types.contains(&"number") {
                FieldType::Number
            } else if types.contains(&"boolean") {
                FieldType::Boolean
            } else {
                FieldType::String
            };
            out.insert(name.clone(), t);
        }
    }
    out
}

/// The field types of a request type, computed once per type.
pub fn cached_field_types<T: utoipa::PartialSchema + 'static>(
    cell: &'static OnceLock<HashMap<String, FieldType>>,
) -> &'static HashMap<String, FieldType> {
    cell.get_or_init(field_types::<T>)
}

/// A request body read as JSON or multipart, before typing.
#[derive(Debug)]
pub struct Fields {
    map: Map<String, Value>,
    /// Multipart: the `image` part's bytes.
    file_image: Option<Bytes>,
    multipart: bool,
    types: &'static HashMap<String, FieldType>,
}

impl Fields {
    /// Read the body as JSON or multipart/form-data. Multipart text parts are
    /// typed by `types` (fields it does not know stay strings, to be refused
    /// by name when typed); a part `image` holds the guide file.
    pub async fn read(
        state: &Arc<AppState>,
        req: Request,
        types: &'static HashMap<String, FieldType>,
    ) -> ApiResult<Self> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if let Some(len) = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
        {
            if len > state.body_limit {
                // Read (and discard) a moderately larger body so the client, still
                // sending, gets this answer instead of a reset connection.
                if len <= DRAIN_LIMIT {
                    let body = req.into_body();
                    let _ = tokio::time::timeout(
                        state.body_timeout.min(std::time::Duration::from_secs(10)),
                        axum::body::to_bytes(body, DRAIN_LIMIT),
                    )
                    .await;
                }
                return Err(ApiError::PayloadTooLarge {
                    limit: state.body_limit,
                });
            }
        }
        // A client that trickles its body is cut off at the deadline; it
        // holds no queue slot meanwhile (jobs are queued once parsed).
        let read = async {
            match mime.as_str() {
                "application/json" => Self::json(state, req, types).await,
                "multipart/form-data" => Self::multipart(state, req, types).await,
                "" => Err(ApiError::UnsupportedMediaType("(none)".into())),
                _ => Err(ApiError::UnsupportedMediaType(content_type)),
            }
        };
        tokio::time::timeout(state.body_timeout, read)
            .await
            .unwrap_or(Err(ApiError::BodyTimeout(state.body_timeout.as_secs())))
    }

    async fn json(
        state: &Arc<AppState>,
        req: Request,
        types: &'static HashMap<String, FieldType>,
    ) -> ApiResult<Self> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: state.body_limit,
                }
            } else {
                Error::request("body", r.body_text()).into()
            }
        })?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::request("body", format!("invalid JSON: {e}")))?;
        match value {
            Value::Object(map) => Ok(Self {
                map,
                file_image: None,
                multipart: false,
                types,
            }),
            _ => Err(Error::request("body", "must be a JSON object").into()),
        }
    }

    async fn multipart(
        state: &Arc<AppState>,
        req: Request,
        types: &'static HashMap<String, FieldType>,
    ) -> ApiResult<Self> {
        let mut mp = Multipart::from_request(req, state)
            .await
            .map_err(|r| Error::request("body", r.body_text()))?;
        let mut map = Map::new();
        let mut file_image = None;
        let limit = state.body_limit;
        let part_error = |e: axum::extract::multipart::MultipartError| -> ApiError {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit }
            } else {
                Error::request("body", format!("invalid multipart body: {}", e.body_text())).into()
            }
        };
        while let Some(field) = mp.next_field().await.map_err(part_error)? {
            let name = field.name().unwrap_or("").to_string();
            if name.is_empty() {
                return Err(Error::request("body", "a multipart part has no name").into());
            }
            if map.contains_key(&name) || (name == "image" && file_image.is_some()) {
                return Err(Error::request(name, "given more than once").into());
            }
            let bytes = field.bytes().await.map_err(part_error)?;
            if name == "image" {
                file_image = Some(bytes);
                continue;
            }
            let text = String::from_utf8(bytes.to_vec())
                .map_err(|_| Error::request(&name, "is not UTF-8 text"))?;
            let value = typed_part(&name, text, types.get(&name).copied())?;
            map.insert(name, value);
        }
        Ok(Self {
            map,
            file_image,
            multipart: true,
            types,
        })
    }

    /// Take a string field out (JSON: a string or null; multipart: a text part).
    pub fn take_str(&mut self, name: &str) -> ApiResult<Option<String>> {
        match self.map.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(Error::request(name, format!("must be a string, got {v}")).into()),
        }
    }

    /// Whether the body was multipart/form-data.
    pub fn is_multipart(&self) -> bool {
        self.multipart
    }

    /// Take the guide image out: the multipart file part, else the base64
    /// JSON field `image` (standard alphabet, padding optional, a `data:` URL
    /// prefix allowed). `None` when the request has no image.
    pub fn take_image(&mut self) -> ApiResult<Option<Bytes>> {
        let b64 = self.take_str("image")?;
        match (self.file_image.take(), b64) {
            (Some(bytes), _) => Ok(Some(bytes)),
            (None, Some(s)) if !s.is_empty() => decode_b64(&s).map(|b| Some(Bytes::from(b))),
            (None, _) => Ok(None),
        }
    }

    /// The remaining fields as `T`; errors name the field at fault. An
    /// integer field takes an integral number written as a float (`15.0`),
    /// as JSON Schema's `integer` does.
    pub fn parse<T: DeserializeOwned>(self) -> ApiResult<T> {
        let mut map = self.map;
        for (name, v) in map.iter_mut() {
            if self.types.get(name) == Some(&FieldType::Integer) {
                *v = integral(std::mem::take(v));
            }
        }
        let value = Value::Object(map);
        serde_path_to_error::deserialize(&value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let field = if path == "." {
                // serde names the field itself for unknown / missing fields.
                inner
                    .split('`')
                    .nth(1)
                    .map(str::to_string)
                    .unwrap_or_else(|| "body".into())
            } else {
                path
            };
            Error::request(field, inner).into()
        })
    }
}

/// A multipart text part as the JSON value its field's type asks for.
fn typed_part(name: &str, text: String, kind: Option<FieldType>) -> Result<Value, Error> {
    match kind {
        Some(FieldType::Integer) | Some(FieldType::Number) => {
            let v = serde_json::from_str::<Value>(text.trim())
                .ok()
                .filter(Value::is_number);
            let v = match (kind, v.map(integral)) {
                (Some(FieldType::Integer), Some(v)) if !(v.is_u64() || v.is_i64()) => None,
                (_, v) => v,
            };
            v.ok_or_else(|| {
                let what = if kind == Some(FieldType::Integer) {
                    "an integer"
                } else {
                    "a number"
                };
                Error::request(name, format!("`{text}` is not {what}"))
            })
        }
        // Clients spell a form boolean differently (`True` from Python's
        // `str`, `1` from HTML forms and curl scripts): any case, or 1/0.
        Some(FieldType::Boolean) => match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(Value::Bool(true)),
            "false" | "0" => Ok(Value::Bool(false)),
            _ => Err(Error::request(
                name,
                format!("`{text}` is not a boolean (true or false, in any case, or 1 or 0)"),
            )),
        },
        _ => Ok(Value::String(text)),
    }
}

/// An integral float (`15.0`) as the integer it is; anything else unchanged.
fn integral(v: Value) -> Value {
    const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;
    match v.as_f64() {
        Some(f) if !(v.is_u64() || v.is_i64()) && f.fract() == 0.0 => {
            if (0.0..TWO_POW_64).contains(&f) {
                Value::from(f as u64)
            } else if (-9.2e18..0.0).contains(&f) {
                Value::from(f as i64)
            } else {
                v
            }
        }
        _ => v,
    }
}

fn decode_b64(s: &str) -> ApiResult<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    // Accept a data URL as well as bare base64.
    let s = match s.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => s,
    };
    let cleaned: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    LENIENT
        .decode(cleaned.as_bytes())
        .map_err(|e| Error::param("image", format!("invalid base64: {e}")).into())
}

/// Standard base64 of `bytes`.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::request::SynthesisRequest;

    #[test]
    fn base64_lenient() {
        assert_eq!(decode_b64("aGVsbG8").unwrap(), b"hello");
        assert_eq!(decode_b64("aGVs\nbG8=").unwrap(), b"hello");
        assert_eq!(
            decode_b64("data:image/png;base64,aGVsbG8=").unwrap(),
            b"hello"
        );
        assert!(decode_b64("!!!").is_err());
    }

    #[test]
    fn multipart_parts_are_typed_by_the_schema() {
        let types = field_types::<SynthesisRequest>();
        assert_eq!(types["steps"], FieldType::Integer);
        assert_eq!(types["guidance_scale"], FieldType::Number);
        assert_eq!(types["prompt"], FieldType::String);
        assert_eq!(types["score"], FieldType::Boolean);
        let t = |name: &str, text: &str| typed_part(name, text.into(), types.get(name).copied());
        assert_eq!(t("steps", " 12 ").unwrap(), serde_json::json!(12));
        assert_eq!(t("guidance_scale", "2.5").unwrap(), serde_json::json!(2.5));
        assert_eq!(t("prompt", "12").unwrap(), serde_json::json!("12"));
        assert_eq!(t("steps", "15.0").unwrap(), serde_json::json!(15));
        assert_eq!(t("score", "true").unwrap(), serde_json::json!(true));
        assert_eq!(t("score", " false").unwrap(), serde_json::json!(false));
        for (text, want) in [("True", true), ("FALSE", false), ("1", true), ("0", false)] {
            assert_eq!(t("score", text).unwrap(), serde_json::json!(want), "{text}");
        }
        for bad in ["yes", "2", "", "truee"] {
            assert!(t("score", bad).is_err(), "{bad}");
        }
        for (name, text) in [
            ("score", "yes"),
            ("steps", "null"),
            ("steps", "1.5"),
            ("steps", ""),
            ("control_scale", "x"),
        ] {
            let e = t(name, text).unwrap_err();
            assert!(
                matches!(e, Error::InvalidRequest { ref field, .. } if field == name),
                "{e}"
            );
        }
    }
}
