//! Content negotiation (RFC 9110 §12.5.1): of the representations a request
//! can have, the one its `Accept` header weighs highest. A representation's
//! weight is the q-value of the most specific media range that matches it
//! (`image/png` over `image/*` over `*/*`); q = 0 means "not acceptable".
//! Among equal weights the range listed first wins, then the server's own
//! order, which puts JSON first: no header, or `*/*`, gets JSON.

use axum::http::{header, HeaderMap};

use crate::pipeline::output::OutputFormat;
use crate::server::error::ApiError;

/// One media range of an `Accept` header.
#[derive(Clone, Debug, PartialEq)]
struct Range {
    kind: String,
    subtype: String,
    q: f32,
}

impl Range {
    /// How specifically this range names `mime` (3: exactly, 2: `type/*`,
    /// 1: `*/*`), or `None` when it does not match.
    fn matches(&self, mime: &str) -> Option<u8> {
        let (kind, subtype) = mime.split_once('/')?;
        match (self.kind.as_str(), self.subtype.as_str()) {
            ("*", "*") => Some(1),
            (k, "*") if k == kind => Some(2),
            (k, s) if k == kind && s == subtype => Some(3),
            _ => None,
        }
    }
}

/// A parsed `Accept` header (absent: everything, `*/*`).
#[derive(Clone, Debug, PartialEq)]
pub struct Accept(Vec<Range>);

impl Accept {
    pub fn parse(headers: &HeaderMap) -> Self {
        let values: Vec<&str> = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if values.is_empty() {
            return Self::anything();
        }
        let ranges: Vec<Range> = values
            .iter()
            .flat_map(|v| v.split(','))
            .filter_map(parse_range)
            .collect();
        if ranges.is_empty() {
            // An empty or unreadable header asks for nothing in particular.
            return Self::anything();
        }
        Self(ranges)
    }

    fn anything() -> Self {
        Self(vec![Range {
            kind: "*".into(),
            subtype: "*".into(),
            q: 1.0,
        }])
    }

    /// The weight of `mime`: the q of the most specific matching range (the
    /// first such range), and that range's position; `None` when no range
    /// matches or its q is 0.
    fn weight(&self, mime: &str) -> Option<(f32, usize)> {
        let mut best: Option<(u8, f32, usize)> = None;
        for (i, r) in self.0.iter().enumerate() {
            if let Some(spec) = r.matches(mime) {
                if best.is_none_or(|(s, _, _)| spec > s) {
                    best = Some((spec, r.q, i));
                }
            }
        }
        best.filter(|(_, q, _)| *q > 0.0).map(|(_, q, i)| (q, i))
    }

    /// The acceptable offer weighed highest (ties: the range listed first,
    /// then the order of `offers`), or `None` when none is acceptable.
    pub fn choose<'a>(&self, offers: &[&'a str]) -> Option<&'a str> {
        offers
            .iter()
            .enumerate()
            .filter_map(|(n, m)| self.weight(m).map(|(q, i)| (q, i, n, *m)))
            .min_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)))
            .map(|(_, _, _, m)| m)
    }

    /// The header as parsed, for error messages.
    pub fn describe(&self) -> String {
        self.0
            .iter()
            .map(|r| format!("{}/{};q={}", r.kind, r.subtype, r.q))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `type/subtype;param…;q=…` as a range (lower case), or `None` when it is
/// not a media range or its q is not an RFC 9110 qvalue (0 to 1, at most
/// three decimals): a malformed range is ignored rather than guessed at.
/// Other parameters do not take part in matching.
fn parse_range(part: &str) -> Option<Range> {
    let mut it = part.split(';');
    let mime = it.next()?.trim().to_ascii_lowercase();
    let (kind, subtype) = mime.split_once('/')?;
    if kind.is_empty() || subtype.is_empty() || (kind == "*" && subtype != "*") {
        return None;
    }
    let q = match it
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim().eq_ignore_ascii_case("q").then(|| v.trim())
        })
        .next()
    {
        None => 1.0,
        Some(v) => qvalue(v)?,
    };
    Some(Range {
        kind: kind.trim().into(),
        subtype: subtype.trim().into(),
        q,
    })
}

/// An RFC 9110 qvalue: `0`, `0.` and up to three digits, `1`, `1.` and up to
/// three zeros.
fn qvalue(v: &str) -> Option<f32> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    let ok = frac.len() <= 3
        && frac.bytes().all(|b| b.is_ascii_digit())
        && match int {
            "0" => true,
            "1" => frac.bytes().all(|b| b == b'0'),
            _ => false,
        };
    ok.then(|| v.parse::<f32>().ok()).flatten()
}

const JSON: &str = "application/json";

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
        let accept = Accept::parse(headers);
        match accept.choose(&[JSON, "image/png", "application/octet-stream"]) {
            Some("image/png") => Ok(Self::Png),
            Some("application/octet-stream") => Ok(Self::Safetensors),
            Some(_) => Ok(Self::Json),
            None => Err(ApiError::NotAcceptable {
                accept: accept.describe(),
                message: "/layout answers application/json, image/png or application/octet-stream"
                    .into(),
            }),
        }
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
    /// The answer for a request of `num_images` in `format` (`None`: not
    /// named, so the raw format follows `Accept`). A raw answer holds one
    /// image of the format asked for; when it cannot be had, JSON is the
    /// fallback if `Accept` takes it (`image/png, application/json;q=0.5`
    /// with two images gets JSON).
    pub fn negotiate(
        accept: &Accept,
        num_images: usize,
        format: Option<OutputFormat>,
    ) -> Result<Self, ApiError> {
        let raw: Vec<OutputFormat> = match (num_images, format) {
            (1, Some(f)) => vec![f],
            (1, None) => vec![OutputFormat::Png, OutputFormat::Jpeg, OutputFormat::Webp],
            _ => vec![],
        };
        let mut offers = vec![JSON];
        offers.extend(raw.iter().map(|f| f.mime()));
        if let Some(m) = accept.choose(&offers) {
            return Ok(raw
                .into_iter()
                .find(|f| f.mime() == m)
                .map_or(Self::Json, Self::Raw));
        }
        let message = if num_images != 1
            && accept
                .choose(&["image/png", "image/jpeg", "image/webp"])
                .is_some()
        {
            "a raw image response holds one image; ask for application/json to get several".into()
        } else if let Some(f) = format.filter(|_| num_images == 1) {
            format!(
                "the request asks for format `{}` ({}); accept it or application/json",
                f.name(),
                f.mime()
            )
        } else {
            "/synthesize answers application/json, image/png, image/jpeg or image/webp".into()
        };
        Err(ApiError::NotAcceptable {
            accept: accept.describe(),
            message,
        })
    }

    /// The image format when the request names none.
    pub fn default_format(&self) -> OutputFormat {
        match self {
            Self::Json => OutputFormat::Png,
            Self::Raw(f) => *f,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> Accept {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, v.parse().unwrap());
        Accept::parse(&h)
    }

    fn image(v: &str, n: usize, f: Option<OutputFormat>) -> Result<ImageAccept, ApiError> {
        ImageAccept::negotiate(&accept(v), n, f)
    }

    #[test]
    fn q_values_and_specificity() {
        let offers = [JSON, "image/png", "image/jpeg"];
        assert_eq!(
            accept("image/png;q=0.5, application/json").choose(&offers),
            Some(JSON)
        );
        assert_eq!(
            accept("image/png, application/json").choose(&offers),
            Some("image/png")
        );
        assert_eq!(accept("*/*").choose(&offers), Some(JSON));
        assert_eq!(Accept::parse(&HeaderMap::new()).choose(&offers), Some(JSON));
        assert_eq!(accept("image/*").choose(&offers), Some("image/png"));
        // The most specific range sets a type's q: png is excluded though
        // image/* is wanted.
        assert_eq!(
            accept("image/*, image/png;q=0").choose(&offers),
            Some("image/jpeg")
        );
        assert_eq!(
            accept("text/html;q=0, image/png").choose(&offers),
            Some("image/png")
        );
        assert_eq!(accept("text/html").choose(&offers), None);
        assert_eq!(accept("*/*;q=0").choose(&offers), None);
        // Parameters, case, spaces and a stray q.
        assert_eq!(
            accept("Application/JSON; charset=utf-8 ; Q=0.2, image/png;q=0.1").choose(&offers),
            Some(JSON)
        );
        assert_eq!(
            accept("image/png;q=abc, application/json;q=0.9").choose(&offers),
            Some(JSON),
            "a malformed q drops its range: the typo does not become the favourite"
        );
        // Nothing readable left: as if there were no header.
        assert_eq!(
            accept("image/png;q=0.5x, image/png;q=2").choose(&offers),
            Some(JSON)
        );
        assert_eq!(qvalue("0.125"), Some(0.125));
        assert_eq!(qvalue("1.000"), Some(1.0));
        for bad in ["1.5", "0.1234", "-0", "NaN", "", "1e-1"] {
            assert_eq!(qvalue(bad), None, "{bad}");
        }
        assert_eq!(accept(", ,").choose(&offers), Some(JSON));
    }

    #[test]
    fn synthesis_answers_fall_back_to_json() {
        use OutputFormat::*;
        let both = "image/png, application/json;q=0.5";
        assert_eq!(image(both, 1, None).unwrap(), ImageAccept::Raw(Png));
        assert_eq!(image(both, 2, None).unwrap(), ImageAccept::Json);
        assert_eq!(image(both, 1, Some(Jpeg)).unwrap(), ImageAccept::Json);
        assert_eq!(
            image("image/webp", 1, None).unwrap(),
            ImageAccept::Raw(Webp)
        );
        assert_eq!(
            image("image/*", 1, Some(Jpeg)).unwrap(),
            ImageAccept::Raw(Jpeg)
        );
        assert_eq!(image("*/*", 1, None).unwrap(), ImageAccept::Json);
        // JSON not acceptable and no raw answer possible: 406, saying why.
        for (v, n, f, why) in [
            ("image/png", 2, None, "holds one image"),
            ("image/png", 1, Some(Jpeg), "format `jpeg`"),
            ("text/html", 1, None, "answers application/json"),
        ] {
            match image(v, n, f) {
                Err(ApiError::NotAcceptable { message, .. }) => {
                    assert!(message.contains(why), "{message}")
                }
                other => panic!("{v}: {other:?}"),
            }
        }
    }

    #[test]
    fn layout_answers() {
        let l = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, v.parse().unwrap());
            LayoutAccept::parse(&h)
        };
        assert_eq!(l("image/png").unwrap(), LayoutAccept::Png);
        assert_eq!(
            l("application/octet-stream, */*;q=0.1").unwrap(),
            LayoutAccept::Safetensors
        );
        assert_eq!(
            l("image/*;q=0.4, application/*").unwrap(),
            LayoutAccept::Json
        );
        assert!(l("text/html").is_err());
    }
}
