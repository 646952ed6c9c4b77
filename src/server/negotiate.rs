//! Content negotiation: which representation an `Accept` header asks for.

use axum::http::{header, HeaderMap};

use crate::pipeline::output::OutputFormat;
use crate::server::error::ApiError;

/// The media types of an Accept header, best first (q-values honoured).
pub fn accepted(headers: &HeaderMap) -> Vec<String> {
    let Some(v) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return vec!["*/*".into()];
    };
    let mut list: Vec<(f32, usize, String)> = v
        .split(',')
        .enumerate()
        .filter_map(|(i, part)| {
            let mut it = part.split(';');
            let mime = it.next()?.trim().to_ascii_lowercase();
            if mime.is_empty() {
                return None;
            }
            let q = it
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            (q > 0.0).then_some((q, i, mime))
        })
        .collect();
    list.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    list.into_iter().map(|(_, _, m)| m).collect()
}

/// What `POST /layout` answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutAccept {
    Json,
    /// The preview picture.
    Png,
    /// A safetensors file with tensor `layout`.
    Safetensors,
}

impl LayoutAccept {
    pub fn parse(headers: &HeaderMap) -> Result<Self, ApiError> {
        let list = accepted(headers);
        for m in &list {
            match m.as_str() {
                "application/json" | "*/*" | "application/*" => return Ok(Self::Json),
                "image/png" | "image/*" => return Ok(Self::Png),
                "application/octet-stream" => return Ok(Self::Safetensors),
                _ => {}
            }
        }
        Err(ApiError::NotAcceptable {
            accept: list.join(", "),
            message: "/layout answers application/json, image/png or application/octet-stream"
                .into(),
        })
    }
}

/// What `POST /synthesize` answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageAccept {
    Json,
    /// One image, raw, in this format.
    Raw(OutputFormat),
}

impl ImageAccept {
    pub fn parse(headers: &HeaderMap) -> Result<Self, ApiError> {
        let list = accepted(headers);
        for m in &list {
            match m.as_str() {
                "application/json" | "*/*" | "application/*" => return Ok(Self::Json),
                "image/png" | "image/*" => return Ok(Self::Raw(OutputFormat::Png)),
                "image/jpeg" => return Ok(Self::Raw(OutputFormat::Jpeg)),
                "image/webp" => return Ok(Self::Raw(OutputFormat::Webp)),
                _ => {}
            }
        }
        Err(ApiError::NotAcceptable {
            accept: list.join(", "),
            message: "/synthesize answers application/json, image/png, image/jpeg or image/webp"
                .into(),
        })
    }

    /// The image format when the request names none.
    pub fn default_format(&self) -> OutputFormat {
        match self {
            Self::Json => OutputFormat::Png,
            Self::Raw(f) => *f,
        }
    }

    /// A raw answer holds one image of the format asked for.
    pub fn check(&self, num_images: usize, format: OutputFormat) -> Result<(), ApiError> {
        let Self::Raw(want) = *self else {
            return Ok(());
        };
        if num_images != 1 {
            return Err(ApiError::NotAcceptable {
                accept: want.mime().into(),
                message:
                    "a raw image response holds one image; ask for application/json to get several"
                        .into(),
            });
        }
        if want != format {
            return Err(ApiError::NotAcceptable {
                accept: want.mime().into(),
                message: format!("the request asks for format `{}`", format.name()),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_header_order_and_q() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT,
            "image/png;q=0.5, application/json".parse().unwrap(),
        );
        assert_eq!(accepted(&h), vec!["application/json", "image/png"]);
        h.insert(header::ACCEPT, "text/html;q=0, image/png".parse().unwrap());
        assert_eq!(accepted(&h), vec!["image/png"]);
        assert_eq!(LayoutAccept::parse(&h).unwrap(), LayoutAccept::Png);
        assert_eq!(
            ImageAccept::parse(&h).unwrap(),
            ImageAccept::Raw(OutputFormat::Png)
        );
        h.insert(header::ACCEPT, "text/html".parse().unwrap());
        assert!(LayoutAccept::parse(&h).is_err());
        assert!(ImageAccept::Raw(OutputFormat::Png)
            .check(2, OutputFormat::Png)
            .is_err());
        assert!(ImageAccept::Raw(OutputFormat::Png)
            .check(1, OutputFormat::Jpeg)
            .is_err());
    }
}
