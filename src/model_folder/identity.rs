//! A model's identity from its content, so that the same model gives the
//! same layout ids and the same `model` in its records wherever its files
//! are: embedded in the binary, in a folder, or mounted at `/models` in a
//! container.
//!
//! The digest (sha256, the first 16 hex digits shown) covers every file of
//! the folder ([`ModelSource::files`]: hidden files and `*.md` left out) by
//! relative path and content, except that a file over [`SAMPLED_OVER`]
//! bytes (a real checkpoint) is covered by its size, its first
//! [`HEAD_BYTES`] (a safetensors file's header: every tensor's name, dtype,
//! shape and offsets) and [`SAMPLES`] evenly spaced blocks of
//! [`SAMPLE_BYTES`], so that a 4 GB model is identified in milliseconds,
//! not seconds. Two checkpoints of the same architecture differ in those
//! samples unless they are the same weights.

use sha2::{Digest, Sha256};

use super::ModelSource;
use crate::error::{Error, Result};

/// Files larger than this are sampled, not read whole.
pub const SAMPLED_OVER: u64 = 64 << 20;
/// The start of a sampled file that is always covered.
pub const HEAD_BYTES: u64 = 1 << 20;
/// Blocks covered of a sampled file, evenly spaced after the head.
pub const SAMPLES: u64 = 16;
/// Bytes per sampled block.
pub const SAMPLE_BYTES: u64 = 256 << 10;

/// `sha256:<16 hex>` of the folder's content.
pub fn of(src: &ModelSource) -> Result<String> {
    let mut h = Sha256::new();
    for rel in src.files()? {
        if rel.to_ascii_lowercase().ends_with(".md") {
            continue;
        }
        h.update((rel.len() as u64).to_le_bytes());
        h.update(rel.as_bytes());
        match src {
            ModelSource::Embedded => {
                let bytes = src.read(&rel)?;
                digest_bytes(&mut h, &bytes);
            }
            ModelSource::Dir(d) => {
                let path = d.join(&rel);
                digest_file(&mut h, &path).map_err(|e| Error::model_file(src.path(&rel), e))?;
            }
        }
    }
    let d = h.finalize();
    Ok(format!(
        "sha256:{}",
        d[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}

/// The blocks of a file of `len` bytes that the digest covers: (offset, length).
fn blocks(len: u64) -> Vec<(u64, u64)> {
    if len <= SAMPLED_OVER {
        return vec![(0, len)];
    }
    let mut v = vec![(0, HEAD_BYTES)];
    let span = len - HEAD_BYTES - SAMPLE_BYTES;
    for i in 0..SAMPLES {
        v.push((HEAD_BYTES + span * (i + 1) / SAMPLES, SAMPLE_BYTES));
    }
    v
}

fn digest_bytes(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    for (at, n) in blocks(bytes.len() as u64) {
        h.update(&bytes[at as usize..(at + n) as usize]);
    }
}

fn digest_file(h: &mut Sha256, path: &std::path::Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    for (at, n) in blocks(len) {
        f.seek(SeekFrom::Start(at))?;
        let mut left = n;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            f.read_exact(&mut buf[..want])?;
            h.update(&buf[..want]);
            left -= want as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_files_are_the_same_model_wherever_they_are() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let embedded = of(&ModelSource::Embedded).unwrap();
        let on_disk = of(&ModelSource::Dir(root.join("models/shapes"))).unwrap();
        assert_eq!(embedded, on_disk);
        assert!(
            embedded.starts_with("sha256:") && embedded.len() == 23,
            "{embedded}"
        );
        // A copy elsewhere, with a README beside it, is the same model.
        let tmp = tempfile::tempdir().unwrap();
        let copy = tmp.path().join("elsewhere");
        for rel in ModelSource::Embedded.files().unwrap() {
            let to = copy.join(&rel);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::write(&to, ModelSource::Embedded.read(&rel).unwrap()).unwrap();
        }
        std::fs::write(copy.join("README.md"), "notes").unwrap();
        std::fs::write(copy.join(".DS_Store"), "x").unwrap();
        assert_eq!(of(&ModelSource::Dir(copy.clone())).unwrap(), embedded);
        // One changed byte in a config, or another model, is another identity.
        let lumen = copy.join("lumen.json");
        let mut text = std::fs::read(&lumen).unwrap();
        text.push(b'\n');
        std::fs::write(&lumen, text).unwrap();
        assert_ne!(of(&ModelSource::Dir(copy)).unwrap(), embedded);
        assert_ne!(
            of(&ModelSource::Dir(root.join("models/tiny"))).unwrap(),
            embedded
        );
    }

    #[test]
    fn big_files_are_sampled_where_it_matters() {
        let b = blocks(SAMPLED_OVER + 1);
        assert_eq!(b.len() as u64, 1 + SAMPLES);
        assert_eq!(b[0], (0, HEAD_BYTES));
        let last = b[b.len() - 1];
        assert_eq!(
            last.0 + last.1,
            SAMPLED_OVER + 1,
            "the last block ends the file"
        );
        assert_eq!(blocks(10), [(0, 10)]);
        // A change inside a sampled block changes the digest; the file is
        // written sparse so the test stays small on disk.
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("big.safetensors");
        let digest = |p: &std::path::Path| {
            let mut h = Sha256::new();
            digest_file(&mut h, p).unwrap();
            h.finalize()
        };
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(SAMPLED_OVER + 1).unwrap();
        drop(f);
        let before = digest(&path);
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.seek(SeekFrom::Start(b[5].0 + 7)).unwrap();
            f.write_all(&[1]).unwrap();
        }
        assert_ne!(digest(&path), before);
    }
}
