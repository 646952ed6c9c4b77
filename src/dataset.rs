//! Image folders as users keep them: images found recursively (PNG, JPEG,
//! WebP), with optional captions in either of the two common conventions:
//! - a Hugging Face `imagefolder` `metadata.jsonl` (one JSON object per line,
//!   `file_name` relative to the metadata file's folder, caption in `text`),
//!   in the root or any subfolder;
//! - a sidecar `NAME.txt` beside `NAME.png`.
//!
//! A `metadata.jsonl` caption wins over a sidecar. Paths are kept relative to
//! the folder, with `/` separators, sorted, so a listing is stable across
//! runs and machines.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// File extensions read as images.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// One image of a folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageEntry {
    /// Path relative to the folder, `/`-separated.
    pub rel: String,
    pub path: PathBuf,
    pub caption: Option<String>,
}

/// The images of a folder, sorted by relative path.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub images: Vec<ImageEntry>,
}

#[derive(Deserialize)]
struct MetadataLine {
    file_name: String,
    #[serde(default)]
    text: Option<String>,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// `path` relative to `root`, `/`-separated.
fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

impl ImageFolder {
    /// List the images under `root` (hidden entries and `skip`, e.g. an
    /// output folder inside it, are left out) and attach their captions.
    pub fn scan(root: &Path, skip: Option<&Path>) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::param(
                "images",
                format!("{} is not a folder", root.display()),
            ));
        }
        let skip = skip.and_then(|s| s.canonicalize().ok());
        let mut images = Vec::new();
        let mut metadata = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| Error::io(&dir, e))?;
                let path = entry.path();
                if entry.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
                if kind.is_dir() || (kind.is_symlink() && path.is_dir()) {
                    if skip.is_some() && path.canonicalize().ok() == skip {
                        continue;
                    }
                    stack.push(path);
                } else if entry.file_name() == "metadata.jsonl" {
                    metadata.push(path);
                } else if is_image(&path) {
                    images.push(path);
                }
            }
        }
        let mut captions: BTreeMap<String, String> = BTreeMap::new();
        metadata.sort();
        for file in &metadata {
            read_metadata(root, file, &mut captions)?;
        }
        let mut images: Vec<ImageEntry> = images
            .into_iter()
            .map(|path| {
                let rel = relative(root, &path);
                let caption = match captions.get(&rel) {
                    Some(c) => Some(c.clone()),
                    None => sidecar_caption(&path)?,
                };
                Ok(ImageEntry { rel, path, caption })
            })
            .collect::<Result<_>>()?;
        images.sort_by(|a, b| a.rel.cmp(&b.rel));
        Ok(Self {
            root: root.to_path_buf(),
            images,
        })
    }
}

/// Captions of one `metadata.jsonl`, keyed by image path relative to `root`.
fn read_metadata(root: &Path, file: &Path, out: &mut BTreeMap<String, String>) -> Result<()> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let dir = file.parent().unwrap_or(root);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let m: MetadataLine = serde_json::from_str(line).map_err(|e| {
            Error::param("images", format!("{} line {}: {e}", file.display(), i + 1))
        })?;
        if let Some(caption) = m.text {
            out.insert(relative(root, &dir.join(&m.file_name)), caption);
        }
    }
    Ok(())
}

/// `NAME.txt` beside `NAME.ext`, trimmed.
fn sidecar_caption(image: &Path) -> Result<Option<String>> {
    let txt = image.with_extension("txt");
    if !txt.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&txt).map_err(|e| Error::io(&txt, e))?;
    Ok(Some(text.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_and_captions_in_both_conventions() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        std::fs::create_dir_all(r.join("sub/deeper")).unwrap();
        std::fs::create_dir_all(r.join(".hidden")).unwrap();
        std::fs::create_dir_all(r.join("out")).unwrap();
        for f in [
            "b.png",
            "a.JPG",
            "sub/c.webp",
            "sub/deeper/d.jpeg",
            ".hidden/e.png",
            "out/f.png",
            "notes.md",
        ] {
            std::fs::write(r.join(f), b"x").unwrap();
        }
        std::fs::write(r.join("b.txt"), " a sidecar caption \n").unwrap();
        std::fs::write(r.join("a.txt"), "loses to metadata").unwrap();
        std::fs::write(
            r.join("metadata.jsonl"),
            "{\"file_name\": \"a.JPG\", \"text\": \"from metadata\"}\n\n",
        )
        .unwrap();
        std::fs::write(
            r.join("sub/metadata.jsonl"),
            "{\"file_name\": \"deeper/d.jpeg\", \"text\": \"nested\", \"other\": 1}\n",
        )
        .unwrap();
        let f = ImageFolder::scan(r, Some(&r.join("out"))).unwrap();
        let got: Vec<(&str, Option<&str>)> = f
            .images
            .iter()
            .map(|e| (e.rel.as_str(), e.caption.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a.JPG", Some("from metadata")),
                ("b.png", Some("a sidecar caption")),
                ("sub/c.webp", None),
                ("sub/deeper/d.jpeg", Some("nested")),
            ]
        );
        std::fs::write(r.join("metadata.jsonl"), "{\"text\": \"no file\"}\n").unwrap();
        let e = ImageFolder::scan(r, None).unwrap_err().to_string();
        assert!(
            e.contains("metadata.jsonl line 1") && e.contains("file_name"),
            "{e}"
        );
        assert!(ImageFolder::scan(&r.join("nope"), None).is_err());
    }
}
