//! Layout ids: `<key>-<K>`, where the key is a content hash of the guide
//! image, the model and the layout size. The server caches layouts by key;
//! the CLI writes the same id into its images' records.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The content hash of a guide (32 hex digits) for `model` at `layout_size`.
pub fn guide_key(model: &str, layout_size: u32, image: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(model.as_bytes());
    h.update([0]);
    h.update(layout_size.to_le_bytes());
    h.update(image);
    let d = h.finalize();
    d[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The id of a guide's layout at K components.
pub fn layout_id(key: &str, k: usize) -> String {
    format!("{key}-{k}")
}

/// The pattern every layout id matches (JSON Schema / ECMA 262 syntax).
pub const PATTERN: &str = "^[0-9a-fA-F]{32}-[0-9]{1,19}$";

/// `<32 hex>-<K>` → (key, K).
pub fn parse(id: &str) -> Result<(&str, usize)> {
    let bad = || {
        Error::param(
            "layout_id",
            format!("`{id}` is not a layout id (as returned by POST /layout)"),
        )
    };
    let (key, k) = id.rsplit_once('-').ok_or_else(bad)?;
    if key.len() != 32 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    if k.is_empty() || k.len() > 19 || !k.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let k = k.parse::<usize>().map_err(|_| bad())?;
    Ok((key, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_ids_round_trip() {
        let key = guide_key("m", 518, b"abc");
        assert_eq!(key.len(), 32);
        let id = layout_id(&key, 7);
        assert_eq!(parse(&id).unwrap(), (key.as_str(), 7));
        for bad in [
            "",
            "abc",
            "xyz-3",
            &format!("{key}-x"),
            &format!("{key}3"),
            &format!("{key}-+3"),
            &format!("{key}-"),
            &format!("{key}-{}", "9".repeat(20)),
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_ne!(guide_key("m", 518, b"abc"), guide_key("m", 224, b"abc"));
    }
}
