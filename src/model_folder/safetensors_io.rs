//! Reading safetensors checkpoints one tensor at a time.
//!
//! candle's memory-mapped loader keeps every page it has touched resident
//! until the map is dropped, so loading a model briefly costs the checkpoint
//! twice (mapped pages plus the converted copies). This backend parses the
//! header once and reads each tensor with a positioned read when the model
//! asks for it: peak memory is the loaded model plus one tensor.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use serde::Deserialize;

/// Where one tensor lives in one file.
#[derive(Debug)]
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

/// One or more safetensors files (shards) read on demand.
pub struct SafetensorsFiles {
    files: Vec<(PathBuf, File)>,
    entries: HashMap<String, Entry>,
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

fn dtype_of(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

fn err(path: &Path, msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {msg}", path.display()))
}

impl SafetensorsFiles {
    /// Parse the headers of `paths`; tensor data is read later, on demand.
    pub fn open(paths: &[PathBuf]) -> candle_core::Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| err(path, e))?;
            let size = file.metadata().map_err(|e| err(path, e))?.len();
            let mut len = [0u8; 8];
            file.read_exact_at(&mut len, 0)
                .map_err(|_| err(path, "not a safetensors file (shorter than its header)"))?;
            let header_len = u64::from_le_bytes(len);
            if header_len > 100 << 20 || 8 + header_len > size {
                return Err(err(path, "not a safetensors file (bad header length)"));
            }
            let mut header = vec![0u8; header_len as usize];
            file.read_exact_at(&mut header, 8)
                .map_err(|e| err(path, e))?;
            let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
                .map_err(|e| err(path, format!("bad safetensors header: {e}")))?;
            let data_start = 8 + header_len;
            for (name, value) in header {
                if name == "__metadata__" {
                    continue;
                }
                let h: HeaderEntry = serde_json::from_value(value)
                    .map_err(|e| err(path, format!("bad header entry for `{name}`: {e}")))?;
                let dtype = dtype_of(&h.dtype).ok_or_else(|| {
                    err(
                        path,
                        format!("tensor `{name}` has unsupported dtype {}", h.dtype),
                    )
                })?;
                let [s, e] = h.data_offsets;
                let want = h.shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
                if e < s || e - s != want {
                    return Err(err(
                        path,
                        format!("tensor `{name}`: data size does not match its shape"),
                    ));
                }
                if data_start + e > size {
                    return Err(err(
                        path,
                        format!("tensor `{name}` extends past the end of the file (truncated?)"),
                    ));
                }
                entries.insert(
                    name,
                    Entry {
                        file: i,
                        dtype,
                        shape: h.shape,
                        start: data_start + s,
                        end: data_start + e,
                    },
                );
            }
            files.push((path.clone(), file));
        }
        Ok(Self { files, entries })
    }

    /// Names of every tensor, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Read one tensor as stored (dtype and shape of the file), on the host.
    pub fn load(&self, name: &str) -> candle_core::Result<Tensor> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("cannot find tensor {name}")))?;
        let (path, file) = &self.files[entry.file];
        let mut bytes = vec![0u8; (entry.end - entry.start) as usize];
        file.read_exact_at(&mut bytes, entry.start)
            .map_err(|e| err(path, e))?;
        Tensor::from_raw_buffer(&bytes, entry.dtype, &entry.shape, &Device::Cpu)
    }
}

impl candle_nn::var_builder::SimpleBackend for SafetensorsFiles {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor `{name}`")))?;
        if entry.shape.as_slice() != s.dims() {
            return Err(candle_core::Error::Msg(format!(
                "shape mismatch for `{name}`: the config implies {:?}, the checkpoint has {:?}",
                s.dims(),
                entry.shape
            )));
        }
        self.load(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}
