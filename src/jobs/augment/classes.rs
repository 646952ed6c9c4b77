//! Class names, read from the input so that `OUT/classes.json` can name
//! every mask value and class id the output carries. Nothing is invented:
//! a value or id with no name in the input is written as unnamed (`null`).
//!
//! Where the names come from:
//! - COCO category ids: the COCO file's `categories`;
//! - mask values: `--mask-names FILE`, else `MASKS/classes.json` if it is
//!   there;
//! - YOLO class ids: `--yolo-names FILE`, else `YOLO/data.yaml` if it is
//!   there.
//!
//! A names file is JSON or, for YOLO, an ultralytics `data.yaml`:
//! - a JSON list of names, position = value (`["background", "red"]`;
//!   `null` for an unnamed one);
//! - a JSON object from value to name (`{"0": "background", "3": "blue"}`),
//!   or one with such a list or object under `names`;
//! - a `classes.json` written by `lumen augment` (its `masks` or `yolo`
//!   part), so that an output can be augmented again;
//! - a `data.yaml` whose `names:` is a list or a mapping from id to name
//!   (read with a YAML parser, so every YAML form of them is accepted).
//!
//! A mask value is the pixel's samples: one number for palette and
//! greyscale masks, `[r, g, b]` (or with alpha) for colour masks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// A mask value: one number per channel (palette index, grey level, or
/// the colour's samples).
pub type MaskValue = Vec<u32>;

/// Names read from one file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Names<K: Ord> {
    /// The file they came from.
    pub from: Option<PathBuf>,
    /// Value or id → name (`None`: listed there without a name).
    pub names: BTreeMap<K, Option<String>>,
}

/// The names of the job's labels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClassNames {
    pub masks: Names<MaskValue>,
    pub yolo: Names<u64>,
}

impl ClassNames {
    /// Read the names for `--masks` and `--yolo` (explicit files first,
    /// else the files the folders hold). An explicit file that is missing
    /// or unreadable, and a found file that cannot be read as names, are
    /// errors naming the option.
    pub fn read(
        masks: Option<&Path>,
        mask_names: Option<&Path>,
        yolo: Option<&Path>,
        yolo_names: Option<&Path>,
    ) -> Result<ClassNames> {
        let pick = |explicit: Option<&Path>, folder: Option<&Path>, default: &str| {
            explicit
                .map(Path::to_path_buf)
                .or_else(|| folder.map(|d| d.join(default)).filter(|p| p.is_file()))
        };
        let mut out = ClassNames::default();
        if let Some(file) = pick(mask_names, masks, "classes.json") {
            let names = read_names(&file, "masks", "mask-names")?;
            out.masks = Names {
                from: Some(file),
                names: names.into_iter().collect(),
            };
        }
        if let Some(file) = pick(yolo_names, yolo, "data.yaml") {
            let names = read_names(&file, "yolo", "yolo-names")?;
            let mut parsed = BTreeMap::new();
            for (k, v) in names {
                match k[..] {
                    [id] => {
                        parsed.insert(u64::from(id), v);
                    }
                    _ => {
                        return Err(Error::param(
                            "yolo-names",
                            format!(
                                "{}: a YOLO class id is one number, not {k:?}",
                                file.display()
                            ),
                        ))
                    }
                }
            }
            out.yolo = Names {
                from: Some(file),
                names: parsed,
            };
        }
        Ok(out)
    }
}

/// The names of one file: YAML (`.yaml`, `.yml`) or JSON. `part` is the
/// key of a lumen `classes.json` to read (`masks` or `yolo`), `option` the
/// flag named in errors.
fn read_names(path: &Path, part: &str, option: &str) -> Result<Vec<(MaskValue, Option<String>)>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::param(option, format!("cannot read {}: {e}", path.display())))?;
    let yaml = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
    let parsed = if yaml {
        yaml_names(&text).map(|v| v.into_iter().map(|(k, n)| (vec![k], n)).collect())
    } else {
        serde_json::from_str::<Value>(&text)
            .map_err(|e| format!("not JSON: {e}"))
            .and_then(|v| json_names(&v, part))
    };
    parsed.map_err(|why| {
        Error::param(
            option,
            format!("{}: cannot read class names: {why}", path.display()),
        )
    })
}

/// Names from JSON: a list, a value → name object, either under `names`,
/// or lumen's `classes.json` (`part`: `masks` or `yolo`, each a `classes` list).
fn json_names(
    v: &Value,
    part: &str,
) -> std::result::Result<Vec<(MaskValue, Option<String>)>, String> {
    let name_of = |n: &Value| match n {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => Err(format!("a name must be a string or null, not {other}")),
    };
    match v {
        Value::Array(list) => list
            .iter()
            .enumerate()
            .map(|(i, n)| Ok((vec![i as u32], name_of(n)?)))
            .collect(),
        Value::Object(map) => {
            if let Some(inner) = map.get("names") {
                return json_names(inner, part);
            }
            if let Some(Value::Object(section)) = map.get(part) {
                let list = section
                    .get("classes")
                    .and_then(Value::as_array)
                    .ok_or_else(|| format!("`{part}` holds no `classes` list"))?;
                return list
                    .iter()
                    .map(|entry| {
                        let key = entry
                            .get("value")
                            .or_else(|| entry.get("id"))
                            .ok_or_else(|| format!("{entry} has no `value` or `id`"))?;
                        Ok((
                            mask_value(key)?,
                            name_of(entry.get("name").unwrap_or(&Value::Null))?,
                        ))
                    })
                    .collect();
            }
            map.iter()
                .map(|(k, n)| {
                    let key = k
                        .trim()
                        .parse::<u32>()
                        .map_err(|_| format!("key `{k}` is not a class number"))?;
                    Ok((vec![key], name_of(n)?))
                })
                .collect()
        }
        other => Err(format!(
            "expected a list or an object of names, not {other}"
        )),
    }
}

/// A value as written in `classes.json`: a number, or a list of numbers.
fn mask_value(v: &Value) -> std::result::Result<MaskValue, String> {
    let one = |n: &Value| {
        n.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| format!("{n} is not a class value"))
    };
    match v {
        Value::Array(list) if !list.is_empty() => list.iter().map(one).collect(),
        other => Ok(vec![one(other)?]),
    }
}

/// The `names:` of a YOLO `data.yaml`: a list, or a mapping from id to
/// name. Only this key is read.
fn yaml_names(text: &str) -> std::result::Result<Vec<(u32, Option<String>)>, String> {
    use serde_yaml_ng::Value as Yaml;
    let doc: Yaml = serde_yaml_ng::from_str(text).map_err(|e| format!("not YAML: {e}"))?;
    let names = doc.get("names").ok_or("no top-level `names:` key")?;
    let name_of = |n: &Yaml| match n {
        Yaml::Null => Ok(None),
        Yaml::String(s) => Ok(Some(s.clone())),
        Yaml::Number(x) => Ok(Some(x.to_string())),
        Yaml::Bool(b) => Ok(Some(b.to_string())),
        _ => Err(format!("a name must be a string, not {n:?}")),
    };
    let out: Vec<(u32, Option<String>)> = match names {
        Yaml::Sequence(list) => list
            .iter()
            .enumerate()
            .map(|(i, n)| Ok((i as u32, name_of(n)?)))
            .collect::<std::result::Result<_, String>>()?,
        Yaml::Mapping(map) => map
            .iter()
            .map(|(k, n)| {
                let id = match k {
                    Yaml::Number(x) => x.as_u64().and_then(|v| u32::try_from(v).ok()),
                    Yaml::String(s) => s.trim().parse::<u32>().ok(),
                    _ => None,
                }
                .ok_or_else(|| format!("`{k:?}` is not a class id"))?;
                Ok((id, name_of(n)?))
            })
            .collect::<std::result::Result<_, String>>()?,
        Yaml::Null => Vec::new(),
        other => {
            return Err(format!(
                "`names:` is neither a list nor a mapping: {other:?}"
            ))
        }
    };
    if out.is_empty() {
        return Err("`names:` is empty".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn named(pairs: &[(u32, Option<&str>)]) -> Vec<(u32, Option<String>)> {
        pairs
            .iter()
            .map(|&(k, v)| (k, v.map(str::to_string)))
            .collect()
    }

    #[test]
    fn yaml_names_in_every_form_ultralytics_writes() {
        let want = named(&[(0, Some("circle")), (1, Some("square")), (2, Some("a: b"))]);
        for text in [
            "path: ../x\nnames:\n  0: circle\n  1: square # comment\n  2: 'a: b'\nnc: 3\n",
            "names:\n- circle\n- \"square\"\n- 'a: b'\ntrain: images\n",
            "names: [circle, square, 'a: b']  # three\n",
            "names: {0: circle, 1: square, 2: \"a: b\"}\n",
        ] {
            assert_eq!(yaml_names(text).unwrap(), want, "{text}");
        }
        assert_eq!(
            yaml_names("names:\n  0: ~\n  3: it's\n").unwrap(),
            named(&[(0, None), (3, Some("it's"))])
        );
        for bad in [
            "nc: 3\n",
            "names:\n",
            "names: circle\n",
            "names:\n  x: circle\n",
        ] {
            assert!(yaml_names(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn json_names_in_every_accepted_form() {
        let list = json!(["background", "red", null]);
        let want = vec![
            (vec![0], Some("background".to_string())),
            (vec![1], Some("red".to_string())),
            (vec![2], None),
        ];
        assert_eq!(json_names(&list, "masks").unwrap(), want);
        assert_eq!(json_names(&json!({"names": list}), "masks").unwrap(), want);
        assert_eq!(
            json_names(&json!({"0": "background", "1": "red", "2": null}), "masks").unwrap(),
            want
        );
        let lumen = json!({"masks": {"classes": [
            {"value": 0, "name": "background"}, {"value": [1, 2, 3], "name": null}
        ]}, "yolo": {"classes": [{"id": 4, "name": "x"}]}});
        assert_eq!(
            json_names(&lumen, "masks").unwrap(),
            vec![(vec![0], Some("background".into())), (vec![1, 2, 3], None)]
        );
        assert_eq!(
            json_names(&lumen, "yolo").unwrap(),
            vec![(vec![4], Some("x".into()))]
        );
        for bad in [
            json!(3),
            json!({"x": "y"}),
            json!([1]),
            json!({"masks": {}}),
        ] {
            assert!(json_names(&bad, "masks").is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_looked_up_beside_the_labels_or_given() {
        let dir = tempfile::tempdir().unwrap();
        let (masks, yolo) = (dir.path().join("masks"), dir.path().join("yolo"));
        std::fs::create_dir_all(&masks).unwrap();
        std::fs::create_dir_all(&yolo).unwrap();
        // Nothing there: no names, no error.
        let none = ClassNames::read(Some(&masks), None, Some(&yolo), None).unwrap();
        assert_eq!(none, ClassNames::default());
        std::fs::write(masks.join("classes.json"), r#"["bg", "fg"]"#).unwrap();
        std::fs::write(yolo.join("data.yaml"), "names:\n  0: cat\n").unwrap();
        let found = ClassNames::read(Some(&masks), None, Some(&yolo), None).unwrap();
        assert_eq!(
            found.masks.from.as_deref(),
            Some(masks.join("classes.json").as_path())
        );
        assert_eq!(found.masks.names[&vec![1]], Some("fg".into()));
        assert_eq!(found.yolo.names[&0], Some("cat".into()));
        // An explicit file wins; a missing or bad one is an error naming the option.
        let other = dir.path().join("other.json");
        std::fs::write(&other, r#"{"5": "dog"}"#).unwrap();
        let given = ClassNames::read(Some(&masks), None, Some(&yolo), Some(&other)).unwrap();
        assert_eq!(given.yolo.names[&5], Some("dog".into()));
        let err = ClassNames::read(None, Some(&dir.path().join("gone.json")), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mask-names") && err.contains("gone.json"),
            "{err}"
        );
        std::fs::write(yolo.join("data.yaml"), "nc: 2\n").unwrap();
        let err = ClassNames::read(None, None, Some(&yolo), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("yolo-names") && err.contains("names:"),
            "{err}"
        );
    }
}
