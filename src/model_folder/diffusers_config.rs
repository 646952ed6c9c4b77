//! The one reader of diffusers configs (`config.json` of a UNet, ControlNet
//! or VAE, and `scheduler_config.json`), read field by field the way
//! `Class.from_config(config)` reads them.
//!
//! The rule for a field, everywhere:
//! - **absent**: the class's default (`from_config` passes nothing);
//! - **`null`**: Python's `None`, passed to the class as is. Options whose
//!   diffusers default is `None` read it as unset (the `opt_*` accessors and
//!   [`DiffusersConfig::require`] with `Value::Null` among its neutral
//!   values); booleans read it as false (the classes only test them with
//!   `if`); every other accessor refuses it, naming the file and the field;
//! - **a value of the wrong type**: an error naming the file and the field.
//!   Integral floats (`1000.0`) are accepted where integers are expected.
//!
//! Fields nobody asks for are ignored, as `from_config` ignores them.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A diffusers config: a JSON object and the file it came from.
#[derive(Clone, Debug)]
pub struct DiffusersConfig {
    map: Map<String, Value>,
    file: String,
}

impl DiffusersConfig {
    /// `value` must be a JSON object; `file` names it in every error.
    pub fn new(value: Value, file: impl Into<String>) -> Result<Self> {
        let file = file.into();
        match value {
            Value::Object(map) => Ok(Self { map, file }),
            _ => Err(Error::model_file(file, "bad config: must be a JSON object")),
        }
    }

    /// The file name used in errors.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// `Error::model_file` for a malformed config.
    pub fn err(&self, message: impl std::fmt::Display) -> Error {
        Error::model_file(&self.file, format!("bad config: {message}"))
    }

    /// `Error::model_file` for a valid option lumen does not implement.
    pub fn unsupported(&self, field: &str, detail: impl std::fmt::Display) -> Error {
        Error::model_file(
            &self.file,
            format!("unsupported config: `{field}` {detail}"),
        )
    }

    fn bad_type(&self, field: &str, expected: &str, got: &Value) -> Error {
        self.err(format!("`{field}` must be {expected}, got {got}"))
    }

    /// The raw value of `field` when the config has it (`null` included).
    pub fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field)
    }

    /// Whether `field` is present with a value other than `null`.
    pub fn is_set(&self, field: &str) -> bool {
        !matches!(self.map.get(field), None | Some(Value::Null))
    }

    fn as_u64(v: &Value) -> Option<u64> {
        v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 9e15)
                .map(|f| f as u64)
        })
    }

    fn as_i64(v: &Value) -> Option<i64> {
        v.as_i64().or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                .map(|f| f as i64)
        })
    }

    /// A non-negative integer.
    pub fn usize_or(&self, field: &str, default: usize) -> Result<usize> {
        match self.map.get(field) {
            None => Ok(default),
            Some(v) => Self::as_u64(v)
                .map(|x| x as usize)
                .ok_or_else(|| self.bad_type(field, "a non-negative integer", v)),
        }
    }

    /// A non-negative integer whose diffusers default is `None`.
    pub fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => Self::as_u64(v)
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.bad_type(field, "a non-negative integer or null", v)),
        }
    }

    /// An integer.
    pub fn i64_or(&self, field: &str, default: i64) -> Result<i64> {
        match self.map.get(field) {
            None => Ok(default),
            Some(v) => Self::as_i64(v).ok_or_else(|| self.bad_type(field, "an integer", v)),
        }
    }

    /// A number.
    pub fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        match self.map.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.bad_type(field, "a number", v)),
        }
    }

    /// A number whose diffusers default is `None`.
    pub fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad_type(field, "a number or null", v)),
        }
    }

    /// A boolean, with Python truthiness for `null` and numbers.
    pub fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.map.get(field) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::Null) => Ok(false),
            Some(Value::Number(n)) => Ok(n.as_f64() != Some(0.0)),
            Some(v) => Err(self.bad_type(field, "a boolean", v)),
        }
    }

    /// A string.
    pub fn str_or<'s>(&'s self, field: &str, default: &'s str) -> Result<&'s str> {
        match self.map.get(field) {
            None => Ok(default),
            Some(Value::String(s)) => Ok(s.as_str()),
            Some(v) => Err(self.bad_type(field, "a string", v)),
        }
    }

    /// A list of strings that has no default.
    pub fn strings(&self, field: &str) -> Result<Vec<String>> {
        let v = self
            .map
            .get(field)
            .ok_or_else(|| self.err(format!("`{field}` is missing")))?;
        v.as_array()
            .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_string)).collect())
            .ok_or_else(|| self.bad_type(field, "a list of strings", v))
    }

    /// A list of non-negative integers that has no default.
    pub fn usizes(&self, field: &str) -> Result<Vec<usize>> {
        let v = self
            .map
            .get(field)
            .ok_or_else(|| self.err(format!("`{field}` is missing")))?;
        self.usize_list(field, v)
    }

    /// A list of non-negative integers.
    pub fn usizes_or(&self, field: &str, default: &[usize]) -> Result<Vec<usize>> {
        match self.map.get(field) {
            None => Ok(default.to_vec()),
            Some(v) => self.usize_list(field, v),
        }
    }

    fn usize_list(&self, field: &str, v: &Value) -> Result<Vec<usize>> {
        v.as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| Self::as_u64(x).map(|u| u as usize))
                    .collect()
            })
            .ok_or_else(|| self.bad_type(field, "a list of integers", v))
    }

    /// An integer for every one of `n` blocks, or a per-block list. Absent:
    /// `default` for every block; `null`: `None`.
    pub fn per_block(
        &self,
        field: &str,
        n: usize,
        default: Option<usize>,
    ) -> Result<Option<Vec<usize>>> {
        match self.map.get(field) {
            None => Ok(default.map(|d| vec![d; n])),
            Some(Value::Null) => Ok(None),
            Some(Value::Array(_)) => {
                let v = self.usizes(field)?;
                if v.len() != n {
                    return Err(
                        self.err(format!("`{field}` has {} entries for {n} blocks", v.len()))
                    );
                }
                Ok(Some(v))
            }
            Some(v) => Self::as_u64(v)
                .map(|x| Some(vec![x as usize; n]))
                .ok_or_else(|| self.bad_type(field, "an integer or a list of integers", v)),
        }
    }

    /// Refuse an option lumen does not implement: absent, or one of the
    /// `neutral` values (`Value::Null` among them for options whose diffusers
    /// default is `None`), is fine.
    pub fn require(&self, field: &str, neutral: &[Value]) -> Result<()> {
        match self.map.get(field) {
            None => Ok(()),
            Some(v) if neutral.contains(v) => Ok(()),
            Some(v) => Err(self.unsupported(field, format!("= {v}"))),
        }
    }

    /// Refuse a boolean option lumen does not implement when it is on.
    pub fn reject_true(&self, field: &str) -> Result<()> {
        if self.bool_or(field, false)? {
            Err(self.unsupported(field, "= true (only false is implemented)"))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: Value) -> DiffusersConfig {
        DiffusersConfig::new(v, "x/config.json").unwrap()
    }

    #[test]
    fn one_null_rule() {
        let c = cfg(json!({
            "a": null, "n": 3, "f": 1000.0, "s": "silu", "b": true, "list": [1, 2]
        }));
        // Absent: the default.
        assert_eq!(c.usize_or("missing", 7).unwrap(), 7);
        assert_eq!(c.opt_usize("missing").unwrap(), None);
        // null: None where the default is None, false for booleans, an error otherwise.
        assert_eq!(c.opt_usize("a").unwrap(), None);
        assert_eq!(c.opt_f64("a").unwrap(), None);
        assert!(!c.bool_or("a", true).unwrap());
        assert_eq!(c.per_block("a", 2, Some(8)).unwrap(), None);
        for e in [
            c.usize_or("a", 1).unwrap_err(),
            c.f64_or("a", 1.0).unwrap_err(),
            c.str_or("a", "x").map(str::to_string).unwrap_err(),
            c.usizes_or("a", &[1]).unwrap_err(),
        ] {
            assert!(e.to_string().contains("x/config.json"), "{e}");
            assert!(e.to_string().contains("`a`"), "{e}");
        }
        assert!(c.require("a", &[Value::Null]).is_ok());
        assert!(c.require("a", &[json!("silu")]).is_err());
        // Values.
        assert_eq!(c.usize_or("f", 0).unwrap(), 1000);
        assert_eq!(c.per_block("n", 2, None).unwrap(), Some(vec![3, 3]));
        assert_eq!(c.per_block("list", 2, None).unwrap(), Some(vec![1, 2]));
        assert!(c.per_block("list", 3, None).is_err());
        assert!(c.usize_or("s", 0).is_err());
        assert!(c.reject_true("b").is_err());
        let e = c.require("s", &[json!("gelu")]).unwrap_err().to_string();
        assert!(e.contains("unsupported") && e.contains("`s`"), "{e}");
        assert!(DiffusersConfig::new(json!([1]), "y").is_err());
    }
}
