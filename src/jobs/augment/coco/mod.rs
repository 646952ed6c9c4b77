//! COCO detection / instance annotations
//! (<https://cocodataset.org/#format-data>), carried over to synthesized
//! images of another size.
//!
//! [`Coco::read`] loads a COCO JSON file. Only a file that is not a COCO
//! object at all is an error; a bad image entry or annotation is recorded in
//! [`Coco::problems`] and left out, so one broken label never stops a job.
//! [`Coco::match_files`] pairs COCO images with dataset files,
//! [`rescale_annotation`] moves one annotation to a new image size and
//! [`Coco::output`] writes the COCO object for a set of new images.
//!
//! Geometry follows the image: with `sx = to_w / from_w` and
//! `sy = to_h / from_h`, boxes, polygons and keypoints are scaled as
//! continuous coordinates, and RLE masks are resized by the nearest
//! pixel-centre rule of [`super::mask::nearest_indices`] (the rule the
//! PNG masks use), then re-encoded in the form they came in.
//!
//! This file holds the COCO model (reading, matching, writing);
//! `geometry.rs` checks and rescales one annotation's geometry, `rle.rs`
//! holds COCO's RLE codec and the resize of an RLE mask.

mod geometry;
mod rle;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

pub use geometry::rescale_annotation;
pub use rle::{rle_from_string, rle_to_string};

/// What is at fault (a `file_name`, `annotation 17`, `images[3]`) and why.
pub type Problem = (String, String);

/// One usable COCO image entry with its usable annotations, in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct CocoImage {
    pub id: i64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
    /// The annotation objects as read (their geometry checked against
    /// `width × height`).
    pub annotations: Vec<Value>,
}

/// A COCO file: the parts `lumen augment` carries over.
#[derive(Clone, Debug, PartialEq)]
pub struct Coco {
    /// `info`, `licenses` and `categories`, verbatim (absent when absent).
    pub info: Option<Value>,
    pub licenses: Option<Value>,
    pub categories: Option<Value>,
    pub images: Vec<CocoImage>,
    /// Entries left out, and why.
    pub problems: Vec<Problem>,
}

/// One image of the output COCO file, made from `source`, an index into
/// [`Coco::images`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutImage {
    pub id: u64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
    pub source: usize,
}

impl Coco {
    /// Reads a COCO JSON file. An unreadable file is [`Error::Io`]; a file
    /// that is not JSON, or whose top level is not an object with `images`
    /// and `annotations` arrays, is a `coco` parameter error naming it.
    pub fn read(path: &Path) -> Result<Coco> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_slice(&bytes, path)
    }

    /// [`Coco::read`] on bytes already in memory; `name` is only used in
    /// error messages.
    pub fn from_slice(bytes: &[u8], name: &Path) -> Result<Coco> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            Error::param("coco", format!("{}: not valid JSON: {e}", name.display()))
        })?;
        Self::from_value(value, name)
    }

    /// [`Coco::read`] on a parsed JSON value.
    pub fn from_value(value: Value, name: &Path) -> Result<Coco> {
        let fatal = |why: String| Error::param("coco", format!("{}: {why}", name.display()));
        let Value::Object(mut top) = value else {
            return Err(fatal(format!(
                "the top level must be a JSON object with `images` and `annotations` arrays, \
                 not {}",
                kind(&value)
            )));
        };
        let mut array = |key: &str| match top.remove(key) {
            Some(Value::Array(a)) => Ok(a),
            Some(other) => Err(fatal(format!(
                "`{key}` must be an array, not {}",
                kind(&other)
            ))),
            None => Err(fatal(format!("no `{key}` array at the top level"))),
        };
        let image_entries = array("images")?;
        let annotation_entries = array("annotations")?;

        let mut problems = Vec::new();
        let mut images: Vec<CocoImage> = Vec::new();
        let mut by_id: HashMap<i64, usize> = HashMap::new();
        for (i, entry) in image_entries.into_iter().enumerate() {
            let label = entry
                .get("file_name")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map_or_else(|| format!("images[{i}]"), str::to_owned);
            match parse_image(&entry) {
                Ok(image) => {
                    if let Some(&first) = by_id.get(&image.id) {
                        problems.push((
                            label,
                            format!(
                                "image id {} is already used by `{}`",
                                image.id, images[first].file_name
                            ),
                        ));
                    } else {
                        by_id.insert(image.id, images.len());
                        images.push(image);
                    }
                }
                Err(why) => problems.push((label, why)),
            }
        }

        for (i, ann) in annotation_entries.into_iter().enumerate() {
            let label = annotation_label(&ann, i);
            let Some(obj) = ann.as_object() else {
                problems.push((label, format!("not an object but {}", kind(&ann))));
                continue;
            };
            let Some(image_id) = obj.get("image_id").and_then(Value::as_i64) else {
                problems.push((label, "no integer `image_id`".into()));
                continue;
            };
            let Some(&at) = by_id.get(&image_id) else {
                problems.push((
                    label,
                    format!("`image_id` {image_id} is not an image (or its entry was left out)"),
                ));
                continue;
            };
            let image = &mut images[at];
            match geometry::check(obj, (image.width, image.height)) {
                Ok(_) => image.annotations.push(ann),
                Err(why) => problems.push((label, why)),
            }
        }

        Ok(Coco {
            info: top.remove("info"),
            licenses: top.remove("licenses"),
            categories: top.remove("categories"),
            images,
            problems,
        })
    }

    /// Pairs COCO images with dataset files (`rels`: paths relative to the
    /// dataset root, `/`-separated). A `file_name` equal to a dataset path
    /// matches it; otherwise the one dataset file with the same base name
    /// does. Returns dataset path → index into [`Coco::images`], and the COCO
    /// images that match no file, several files, or a file another image
    /// already matched. Exact matches win over base-name matches.
    pub fn match_files(&self, rels: &[String]) -> (BTreeMap<String, usize>, Vec<Problem>) {
        let mut by_base: HashMap<&str, Vec<&str>> = HashMap::new();
        for rel in rels {
            by_base.entry(base_name(rel)).or_default().push(rel);
        }
        let exact: std::collections::HashSet<&str> = rels.iter().map(String::as_str).collect();
        let mut matched: BTreeMap<String, usize> = BTreeMap::new();
        let mut problems = Vec::new();
        let mut claim = |rel: &str, i: usize, problems: &mut Vec<Problem>| {
            if let Some(&other) = matched.get(rel) {
                problems.push((
                    self.images[i].file_name.clone(),
                    format!(
                        "matches `{rel}`, which image {} (`{}`) already matches",
                        self.images[other].id, self.images[other].file_name
                    ),
                ));
            } else {
                matched.insert(rel.to_owned(), i);
            }
        };
        let mut by_name = Vec::new();
        for (i, image) in self.images.iter().enumerate() {
            if exact.contains(image.file_name.as_str()) {
                claim(&image.file_name, i, &mut problems);
            } else {
                by_name.push(i);
            }
        }
        for i in by_name {
            let file_name = &self.images[i].file_name;
            let base = base_name(file_name);
            match by_base.get(base).map(Vec::as_slice) {
                None | Some([]) => problems.push((
                    file_name.clone(),
                    "references a missing image (no dataset file has this path or name)".into(),
                )),
                Some([rel]) => claim(rel, i, &mut problems),
                Some(several) => {
                    let shown: Vec<&str> = several.iter().take(3).copied().collect();
                    let more = if several.len() > 3 { ", …" } else { "" };
                    problems.push((
                        file_name.clone(),
                        format!(
                            "ambiguous: {} dataset files are named `{base}` ({}{more})",
                            several.len(),
                            shown.join(", ")
                        ),
                    ));
                }
            }
        }
        (matched, problems)
    }

    /// The COCO object for `images`: this file's `info`, `licenses` and
    /// `categories`, one `images` entry per output (its id, file name and
    /// size), and every annotation of each output's source image rescaled to
    /// the output's size, with `image_id` the output's id and `id`s numbered
    /// from 1 in output order. Annotations that cannot be rescaled, and
    /// outputs whose `source` is not an image, are left out and returned as
    /// problems.
    pub fn output(&self, images: &[OutImage]) -> (Value, Vec<Problem>) {
        let mut out_images = Vec::with_capacity(images.len());
        let mut annotations = Vec::new();
        let mut problems = Vec::new();
        let mut next_id: u64 = 1;
        for out in images {
            let Some(src) = self.images.get(out.source) else {
                problems.push((
                    out.file_name.clone(),
                    format!("source {} is not an image of the COCO file", out.source),
                ));
                continue;
            };
            let mut entry = Map::new();
            entry.insert("id".into(), out.id.into());
            entry.insert("file_name".into(), out.file_name.clone().into());
            entry.insert("width".into(), out.width.into());
            entry.insert("height".into(), out.height.into());
            out_images.push(Value::Object(entry));
            for (i, ann) in src.annotations.iter().enumerate() {
                let rescaled =
                    rescale_annotation(ann, (src.width, src.height), (out.width, out.height));
                match rescaled {
                    Ok(Value::Object(mut obj)) => {
                        obj.insert("id".into(), next_id.into());
                        obj.insert("image_id".into(), out.id.into());
                        next_id += 1;
                        annotations.push(Value::Object(obj));
                    }
                    Ok(other) => problems.push((
                        annotation_label(ann, i),
                        format!("rescaled to {}", kind(&other)),
                    )),
                    Err(why) => problems.push((
                        annotation_label(ann, i),
                        format!("for `{}`: {why}", out.file_name),
                    )),
                }
            }
        }
        let mut top = Map::new();
        if let Some(info) = &self.info {
            top.insert("info".into(), info.clone());
        }
        if let Some(licenses) = &self.licenses {
            top.insert("licenses".into(), licenses.clone());
        }
        top.insert("images".into(), Value::Array(out_images));
        top.insert("annotations".into(), Value::Array(annotations));
        if let Some(categories) = &self.categories {
            top.insert("categories".into(), categories.clone());
        }
        (Value::Object(top), problems)
    }
}

fn base_name(path: &str) -> &str {
    path.rsplit(['/', '\\']).next().unwrap_or(path)
}

pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(super) fn annotation_label(ann: &Value, index: usize) -> String {
    match ann.get("id").and_then(Value::as_i64) {
        Some(id) => format!("annotation {id}"),
        None => format!("annotations[{index}]"),
    }
}

fn parse_image(entry: &Value) -> std::result::Result<CocoImage, String> {
    let obj = entry
        .as_object()
        .ok_or_else(|| format!("not an object but {}", kind(entry)))?;
    let id = obj
        .get("id")
        .and_then(Value::as_i64)
        .ok_or("no integer `id`")?;
    let file_name = obj
        .get("file_name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("no `file_name` string")?
        .to_owned();
    let side = |key: &str| {
        obj.get(key)
            .and_then(Value::as_u64)
            .filter(|&v| v > 0)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| format!("`{key}` is not a positive integer"))
    };
    Ok(CocoImage {
        id,
        file_name,
        width: side("width")?,
        height: side("height")?,
        annotations: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "info": {"description": "test"},
            "licenses": [{"id": 1, "name": "CC"}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "images": [
                {"id": 1, "file_name": "a.jpg", "width": 100, "height": 50},
                {"id": 2, "file_name": "train/b.jpg", "width": 40, "height": 40},
                {"id": 3, "file_name": "c.jpg", "width": 0, "height": 40},
                {"id": "4", "file_name": "d.jpg", "width": 10, "height": 10},
                {"id": 5, "width": 10, "height": 10},
                {"id": 1, "file_name": "dup.jpg", "width": 10, "height": 10},
                {"id": 6, "file_name": "sub/e.jpg", "width": 10, "height": 10},
                {"id": 7, "file_name": "gone.jpg", "width": 10, "height": 10},
                "oops"
            ],
            "annotations": [
                {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                 "segmentation": [[10, 10, 30, 10, 30, 30]], "iscrowd": 0},
                {"id": 11, "image_id": 1, "category_id": 2, "iscrowd": 1, "bbox": [0, 0, 5, 4],
                 "segmentation": {"size": [50, 100], "counts": [0, 5000]}},
                {"id": 12, "image_id": 2, "category_id": 1, "bbox": [1, 2, 3, 4]},
                {"id": 13, "image_id": 3, "category_id": 1, "bbox": [1, 2, 3, 4]},
                {"id": 14, "image_id": 99, "category_id": 1},
                {"id": 15, "image_id": 2, "bbox": [1, 2]},
                {"id": 16, "image_id": 2, "segmentation": {"size": [50, 100], "counts": "0"}},
                {"id": 17, "category_id": 1},
                [1, 2]
            ]
        })
    }

    fn problem_for<'a>(problems: &'a [Problem], what: &str) -> &'a str {
        problems
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, why)| why.as_str())
            .unwrap_or_else(|| panic!("no problem for {what} in {problems:?}"))
    }

    #[test]
    fn malformed_entries_are_reported_not_fatal() {
        let coco = Coco::from_value(sample(), Path::new("labels.json")).unwrap();
        let names: Vec<&str> = coco.images.iter().map(|i| i.file_name.as_str()).collect();
        assert_eq!(names, ["a.jpg", "train/b.jpg", "sub/e.jpg", "gone.jpg"]);
        assert_eq!(coco.images[0].annotations.len(), 2);
        assert_eq!(coco.images[1].annotations.len(), 1);
        let p = &coco.problems;
        assert!(problem_for(p, "c.jpg").contains("width"));
        assert!(problem_for(p, "d.jpg").contains("id"));
        assert!(problem_for(p, "images[4]").contains("file_name"));
        assert!(problem_for(p, "dup.jpg").contains("already used by `a.jpg`"));
        assert!(problem_for(p, "images[8]").contains("not an object"));
        assert!(problem_for(p, "annotation 13").contains("not an image"));
        assert!(problem_for(p, "annotation 14").contains("99"));
        assert!(problem_for(p, "annotation 15").contains("bbox"));
        assert!(problem_for(p, "annotation 16").contains("size"));
        assert!(problem_for(p, "annotation 17").contains("image_id"));
        assert!(problem_for(p, "annotations[8]").contains("not an object"));
        assert_eq!(p.len(), 11, "{p:?}");
        assert_eq!(coco.categories, sample().get("categories").cloned());
    }

    #[test]
    fn a_file_that_is_not_coco_is_a_clear_error() {
        let name = Path::new("ann/bad.json");
        let cases = [
            (json!([1, 2]), "top level"),
            (json!({"annotations": []}), "no `images`"),
            (
                json!({"images": {}, "annotations": []}),
                "`images` must be an array",
            ),
            (json!({"images": []}), "no `annotations`"),
        ];
        for (value, needle) in cases {
            let err = Coco::from_value(value, name).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, Error::InvalidParameter { ref name, .. } if name == "coco"));
            assert!(
                text.contains("ann/bad.json") && text.contains(needle),
                "{text}"
            );
        }
        let err = Coco::from_slice(b"{not json", name).unwrap_err();
        assert!(err.to_string().contains("ann/bad.json"));
        let empty = Coco::from_value(json!({"images": [], "annotations": []}), name).unwrap();
        assert!(empty.images.is_empty() && empty.problems.is_empty());
        assert_eq!(empty.info, None);
    }

    #[test]
    fn read_reports_io_errors_and_reads_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        assert!(matches!(Coco::read(&missing), Err(Error::Io { .. })));
        let path = dir.path().join("coco.json");
        std::fs::write(&path, sample().to_string()).unwrap();
        assert_eq!(Coco::read(&path).unwrap().images.len(), 4);
    }

    #[test]
    fn files_match_by_path_then_unique_base_name() {
        let coco = Coco::from_value(
            json!({
                "images": [
                    {"id": 1, "file_name": "a.jpg", "width": 4, "height": 4},
                    {"id": 2, "file_name": "train/b.jpg", "width": 4, "height": 4},
                    {"id": 3, "file_name": "x/c.jpg", "width": 4, "height": 4},
                    {"id": 4, "file_name": "gone.jpg", "width": 4, "height": 4},
                    {"id": 5, "file_name": "dir\\e.jpg", "width": 4, "height": 4},
                    {"id": 6, "file_name": "other/a.jpg", "width": 4, "height": 4},
                    {"id": 7, "file_name": "sub/f.jpg", "width": 4, "height": 4},
                    {"id": 8, "file_name": "f.jpg", "width": 4, "height": 4}
                ],
                "annotations": []
            }),
            Path::new("c.json"),
        )
        .unwrap();
        let rels: Vec<String> = [
            "a.jpg",
            "train/b.jpg",
            "one/c.jpg",
            "two/c.jpg",
            "e.jpg",
            "sub/f.jpg",
            "z.jpg",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (matched, problems) = coco.match_files(&rels);
        let want: BTreeMap<String, usize> = [
            ("a.jpg", 0),
            ("train/b.jpg", 1),
            ("e.jpg", 4),
            ("sub/f.jpg", 6),
        ]
        .iter()
        .map(|&(r, i)| (r.to_string(), i))
        .collect();
        assert_eq!(matched, want);
        assert!(problem_for(&problems, "gone.jpg").contains("missing image"));
        let ambiguous = problem_for(&problems, "x/c.jpg");
        assert!(ambiguous.contains("ambiguous") && ambiguous.contains("one/c.jpg"));
        assert!(problem_for(&problems, "other/a.jpg").contains("already matches"));
        // The exact match wins over a base-name match that comes first.
        assert!(problem_for(&problems, "f.jpg").contains("`sub/f.jpg`"));
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    #[test]
    fn output_rescales_renumbers_and_reports() {
        let coco = Coco::from_value(sample(), Path::new("labels.json")).unwrap();
        let outs = [
            OutImage {
                id: 100,
                file_name: "a_0.png".into(),
                width: 200,
                height: 100,
                source: 0,
            },
            OutImage {
                id: 101,
                file_name: "b_0.png".into(),
                width: 20,
                height: 20,
                source: 1,
            },
            OutImage {
                id: 102,
                file_name: "nothing.png".into(),
                width: 20,
                height: 20,
                source: 42,
            },
            OutImage {
                id: 103,
                file_name: "a_1.png".into(),
                width: 0,
                height: 100,
                source: 0,
            },
        ];
        let (out, problems) = coco.output(&outs);
        assert_eq!(out["info"], json!({"description": "test"}));
        assert_eq!(out["licenses"], sample()["licenses"]);
        assert_eq!(out["categories"], sample()["categories"]);
        assert_eq!(
            out["images"],
            json!([
                {"id": 100, "file_name": "a_0.png", "width": 200, "height": 100},
                {"id": 101, "file_name": "b_0.png", "width": 20, "height": 20},
                {"id": 103, "file_name": "a_1.png", "width": 0, "height": 100}
            ])
        );
        let anns = out["annotations"].as_array().unwrap();
        assert_eq!(anns.len(), 3);
        let ids: Vec<(u64, u64)> = anns
            .iter()
            .map(|a| (a["id"].as_u64().unwrap(), a["image_id"].as_u64().unwrap()))
            .collect();
        assert_eq!(ids, [(1, 100), (2, 100), (3, 101)]);
        assert_eq!(anns[0]["bbox"], json!([20.0, 20.0, 40.0, 40.0]));
        assert_eq!(anns[0]["area"], json!(1600.0));
        assert_eq!(
            anns[0]["segmentation"],
            json!([[20.0, 20.0, 60.0, 20.0, 60.0, 60.0]])
        );
        assert_eq!(
            anns[1]["segmentation"],
            json!({"size": [100, 200], "counts": [0, 20000]})
        );
        assert_eq!(anns[1]["area"], json!(20000));
        assert_eq!(anns[1]["category_id"], json!(2));
        assert_eq!(anns[2]["bbox"], json!([0.5, 1.0, 1.5, 2.0]));
        assert!(problem_for(&problems, "nothing.png").contains("42"));
        assert!(problem_for(&problems, "annotation 10").contains("a_1.png"));
        assert_eq!(problems.len(), 3, "{problems:?}");
    }
}
