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

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::{Map, Number, Value};

use super::mask::nearest_indices;
use crate::error::{Error, Result};

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
            match parse_geometry(obj, (image.width, image.height)) {
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

/// One COCO annotation moved from an image of `from = (width, height)` to one
/// of `to`: `bbox` `[x, y, w, h]`, polygon `segmentation` points and
/// `keypoints` `[x, y, v, …]` scaled by `sx = to_w / from_w`,
/// `sy = to_h / from_h`; an RLE `segmentation` (`{"size": [h, w], "counts":
/// …}`, column-major, compressed string or uncompressed list) resized by the
/// nearest pixel-centre rule and written back in the same form with the new
/// `size`; `area` multiplied by `sx · sy`, or, for RLE, the resized mask's
/// pixel count. Every other field is copied. The error says what is
/// malformed (including an RLE `size` other than `from`).
pub fn rescale_annotation(
    ann: &Value,
    from: (u32, u32),
    to: (u32, u32),
) -> std::result::Result<Value, String> {
    let obj = ann
        .as_object()
        .ok_or_else(|| format!("not an object but {}", kind(ann)))?;
    if to.0 == 0 || to.1 == 0 {
        return Err(format!("cannot rescale to {}x{}", to.0, to.1));
    }
    let geometry = parse_geometry(obj, from)?;
    let sx = f64::from(to.0) / f64::from(from.0);
    let sy = f64::from(to.1) / f64::from(from.1);
    let mut out = obj.clone();

    if let Some([x, y, w, h]) = geometry.bbox {
        let scaled = [x * sx, y * sy, w * sx, h * sy];
        out.insert("bbox".into(), numbers(&scaled, "bbox")?);
    }
    if let Some(points) = geometry.keypoints {
        // x and y scale; the visibility flags stay as written (usually integers).
        let original = obj.get("keypoints").and_then(Value::as_array);
        let mut values = Vec::with_capacity(points.len());
        for (i, &v) in points.iter().enumerate() {
            values.push(match (i % 3, original.and_then(|o| o.get(i))) {
                (0, _) => number(v * sx, "keypoints")?,
                (1, _) => number(v * sy, "keypoints")?,
                (_, Some(flag)) => flag.clone(),
                (_, None) => number(v, "keypoints")?,
            });
        }
        out.insert("keypoints".into(), Value::Array(values));
    }
    let mut rle_area = None;
    match geometry.segmentation {
        None => {}
        Some(Segmentation::Polygons(polygons)) => {
            let mut scaled = Vec::with_capacity(polygons.len());
            for polygon in polygons {
                let points: Vec<f64> = polygon
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| if i % 2 == 0 { v * sx } else { v * sy })
                    .collect();
                scaled.push(numbers(&points, "segmentation")?);
            }
            out.insert("segmentation".into(), Value::Array(scaled));
        }
        Some(Segmentation::Rle { counts, compressed }) => {
            let (resized, area) = resize_rle(&counts, from, to);
            let mut seg = obj
                .get("segmentation")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            seg.insert("size".into(), Value::Array(vec![to.1.into(), to.0.into()]));
            let counts = if compressed {
                Value::String(rle_to_string(&resized))
            } else {
                Value::Array(resized.into_iter().map(Value::from).collect())
            };
            seg.insert("counts".into(), counts);
            out.insert("segmentation".into(), Value::Object(seg));
            rle_area = Some(area);
        }
    }
    if let Some(area) = rle_area {
        out.insert("area".into(), area.into());
    } else if let Some(area) = geometry.area {
        out.insert("area".into(), number(area * sx * sy, "area")?);
    }
    Ok(Value::Object(out))
}

/// COCO's compressed RLE string (pycocotools `rleToString`): each count,
/// from the fourth on as the difference to the count two before, written as
/// a signed little-endian base-32 number, 5 bits a character (bit 5 set
/// while more follow, bit 4 of the last the sign), offset by 48 (`'0'`).
pub fn rle_to_string(counts: &[u64]) -> String {
    let mut s = String::new();
    for (i, &count) in counts.iter().enumerate() {
        // Counts are pixel counts of one image: far below 2^63.
        let mut x = count as i64;
        if i > 2 {
            x -= counts[i - 2] as i64;
        }
        loop {
            let mut c = (x & 0x1f) as u8;
            x >>= 5;
            let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
            if more {
                c |= 0x20;
            }
            s.push(char::from(c + 48));
            if !more {
                break;
            }
        }
    }
    s
}

/// Decodes a compressed RLE string ([`rle_to_string`]'s inverse,
/// pycocotools `rleFrString`). Fails on a character outside `'0'..='o'`, a
/// number cut off at the end, one over 60 bits, or a negative count.
pub fn rle_from_string(s: &str) -> std::result::Result<Vec<u64>, String> {
    /// 12 characters carry 60 bits, far beyond any image's pixel count.
    const MAX_CHARS: u32 = 12;
    let bytes = s.as_bytes();
    let mut counts: Vec<u64> = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        let mut x: i64 = 0;
        let mut k: u32 = 0;
        loop {
            let Some(&b) = bytes.get(p) else {
                return Err("RLE counts string ends in the middle of a number".into());
            };
            if !(48..48 + 64).contains(&b) {
                return Err(format!(
                    "RLE counts string has {:?} at byte {p}, outside '0'..='o'",
                    char::from(b)
                ));
            }
            if k == MAX_CHARS {
                return Err(format!("RLE count {} is too long", counts.len()));
            }
            let c = i64::from(b - 48);
            x |= (c & 0x1f) << (5 * k);
            p += 1;
            k += 1;
            if c & 0x20 == 0 {
                if c & 0x10 != 0 {
                    x |= -1i64 << (5 * k);
                }
                break;
            }
        }
        let n = counts.len();
        if n > 2 {
            x = x
                .checked_add(counts[n - 2] as i64)
                .ok_or_else(|| format!("RLE count {n} overflows"))?;
        }
        let count = u64::try_from(x).map_err(|_| format!("RLE count {n} is negative ({x})"))?;
        counts.push(count);
    }
    Ok(counts)
}

fn base_name(path: &str) -> &str {
    path.rsplit(['/', '\\']).next().unwrap_or(path)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn annotation_label(ann: &Value, index: usize) -> String {
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

enum Segmentation {
    Polygons(Vec<Vec<f64>>),
    /// Run lengths over the column-major mask, starting with 0s.
    Rle {
        counts: Vec<u64>,
        compressed: bool,
    },
}

/// The geometry of one annotation, checked.
struct Geometry {
    bbox: Option<[f64; 4]>,
    segmentation: Option<Segmentation>,
    keypoints: Option<Vec<f64>>,
    area: Option<f64>,
}

/// Reads and checks an annotation's geometry for an image of `size =
/// (width, height)`. Absent fields are fine; present ones must be well formed.
fn parse_geometry(
    obj: &Map<String, Value>,
    size: (u32, u32),
) -> std::result::Result<Geometry, String> {
    if size.0 == 0 || size.1 == 0 {
        return Err(format!("the source image is {}x{}", size.0, size.1));
    }
    let bbox = match obj.get("bbox") {
        None => None,
        Some(v) => {
            let values = finite_numbers(v, "bbox")?;
            let [x, y, w, h] = values[..] else {
                return Err(format!("`bbox` has {} numbers, not 4", values.len()));
            };
            if w < 0.0 || h < 0.0 {
                return Err(format!("`bbox` has a negative size {w}x{h}"));
            }
            Some([x, y, w, h])
        }
    };
    let keypoints = match obj.get("keypoints") {
        None => None,
        Some(v) => {
            let values = finite_numbers(v, "keypoints")?;
            if values.len() % 3 != 0 {
                return Err(format!(
                    "`keypoints` has {} numbers, not a multiple of 3",
                    values.len()
                ));
            }
            Some(values)
        }
    };
    let area = match obj.get("area") {
        None => None,
        Some(v) => Some(
            v.as_f64()
                .filter(|a| a.is_finite())
                .ok_or_else(|| format!("`area` is {}, not a number", kind(v)))?,
        ),
    };
    let segmentation = match obj.get("segmentation") {
        None => None,
        Some(Value::Array(polygons)) => {
            let mut out = Vec::with_capacity(polygons.len());
            for (i, polygon) in polygons.iter().enumerate() {
                let what = format!("segmentation[{i}]");
                if !polygon.is_array() {
                    return Err(format!(
                        "`{what}` is {}, not a polygon (a list of numbers)",
                        kind(polygon)
                    ));
                }
                let points = finite_numbers(polygon, &what)?;
                if points.len() % 2 != 0 {
                    return Err(format!(
                        "`{what}` has {} numbers, not x, y pairs",
                        points.len()
                    ));
                }
                out.push(points);
            }
            Some(Segmentation::Polygons(out))
        }
        Some(Value::Object(rle)) => Some(parse_rle(rle, size)?),
        Some(other) => {
            return Err(format!(
                "`segmentation` is {}, not polygons or RLE",
                kind(other)
            ))
        }
    };
    Ok(Geometry {
        bbox,
        segmentation,
        keypoints,
        area,
    })
}

fn parse_rle(
    rle: &Map<String, Value>,
    (width, height): (u32, u32),
) -> std::result::Result<Segmentation, String> {
    let size: Vec<u64> = rle
        .get("size")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(Value::as_u64).collect())
        .unwrap_or_default();
    let [h, w] = size[..] else {
        return Err("RLE `size` is not [height, width]".into());
    };
    if (h, w) != (u64::from(height), u64::from(width)) {
        return Err(format!(
            "RLE `size` [{h}, {w}] is not the image's [{height}, {width}]"
        ));
    }
    let (counts, compressed) = match rle.get("counts") {
        Some(Value::String(s)) => (rle_from_string(s)?, true),
        Some(Value::Array(list)) => {
            let counts = list
                .iter()
                .map(Value::as_u64)
                .collect::<Option<Vec<u64>>>()
                .ok_or("RLE `counts` list holds something other than non-negative integers")?;
            (counts, false)
        }
        Some(other) => {
            return Err(format!(
                "RLE `counts` is {}, not a string or a list",
                kind(other)
            ))
        }
        None => return Err("RLE has no `counts`".into()),
    };
    let total = counts
        .iter()
        .try_fold(0u64, |acc, &c| acc.checked_add(c))
        .ok_or("RLE counts overflow")?;
    if total != h * w {
        return Err(format!(
            "RLE counts cover {total} pixels, not {h}x{w} = {}",
            h * w
        ));
    }
    Ok(Segmentation::Rle { counts, compressed })
}

/// Resizes a column-major RLE mask of `from = (width, height)` to `to` by the
/// nearest pixel-centre rule, without decoding the source: returns the new
/// counts (starting with 0s) and the number of 1 pixels.
fn resize_rle(counts: &[u64], from: (u32, u32), to: (u32, u32)) -> (Vec<u64>, u64) {
    let xs = nearest_indices(from.0, to.0);
    let ys = nearest_indices(from.1, to.1);
    let mut ends = Vec::with_capacity(counts.len());
    let mut acc = 0u64;
    for &c in counts {
        acc += c;
        ends.push(acc);
    }
    let from_h = u64::from(from.1);
    let mut out = Vec::new();
    let mut value = 0u8;
    let mut run = 0u64;
    let mut area = 0u64;
    for &x in &xs {
        let column = x as u64 * from_h;
        // Run k covers [ends[k-1], ends[k]); runs alternate 0, 1, 0, …
        let mut k = ends.partition_point(|&e| e <= column);
        for &y in &ys {
            let p = column + y as u64;
            while k < ends.len() && ends[k] <= p {
                k += 1;
            }
            let v = (k % 2) as u8;
            if v == value {
                run += 1;
            } else {
                out.push(run);
                value = v;
                run = 1;
            }
            area += u64::from(v);
        }
    }
    out.push(run);
    (out, area)
}

fn finite_numbers(v: &Value, what: &str) -> std::result::Result<Vec<f64>, String> {
    let list = v
        .as_array()
        .ok_or_else(|| format!("`{what}` is {}, not a list of numbers", kind(v)))?;
    list.iter()
        .map(|n| n.as_f64().filter(|f| f.is_finite()))
        .collect::<Option<Vec<f64>>>()
        .ok_or_else(|| format!("`{what}` holds something other than numbers"))
}

fn number(v: f64, what: &str) -> std::result::Result<Value, String> {
    Number::from_f64(v)
        .map(Value::Number)
        .ok_or_else(|| format!("`{what}` overflows when rescaled"))
}

fn numbers(values: &[f64], what: &str) -> std::result::Result<Value, String> {
    values
        .iter()
        .map(|&v| number(v, what))
        .collect::<std::result::Result<Vec<Value>, String>>()
        .map(Value::Array)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Column-major RLE counts of a row-major 0/1 mask, as pycocotools encodes.
    fn encode(rows: &[&[u8]]) -> Vec<u64> {
        let (h, w) = (rows.len(), rows[0].len());
        let mut counts = Vec::new();
        let (mut value, mut run) = (0u8, 0u64);
        for x in 0..w {
            for row in rows.iter().take(h) {
                if row[x] == value {
                    run += 1;
                } else {
                    counts.push(run);
                    value = row[x];
                    run = 1;
                }
            }
        }
        counts.push(run);
        counts
    }

    /// Decodes column-major counts to row-major rows.
    fn decode(counts: &[u64], h: usize, w: usize) -> Vec<Vec<u8>> {
        let mut flat = Vec::new();
        for (k, &c) in counts.iter().enumerate() {
            flat.extend(std::iter::repeat_n((k % 2) as u8, c as usize));
        }
        assert_eq!(flat.len(), h * w);
        (0..h)
            .map(|y| (0..w).map(|x| flat[x * h + y]).collect())
            .collect()
    }

    const M1: [&[u8]; 4] = [
        &[0, 1, 1, 0, 0],
        &[0, 1, 1, 1, 0],
        &[1, 1, 0, 0, 0],
        &[0, 0, 0, 0, 1],
    ];

    fn m2() -> Vec<Vec<u8>> {
        // numpy: m[5:50, 3:40] = 1; m[10:12, 50:69] = 1; m[0:60, 45] = 1
        let mut m = vec![vec![0u8; 70]; 60];
        for (y, row) in m.iter_mut().enumerate() {
            for (x, v) in row.iter_mut().enumerate() {
                if ((5..50).contains(&y) && (3..40).contains(&x))
                    || ((10..12).contains(&y) && (50..69).contains(&x))
                    || x == 45
                {
                    *v = 1;
                }
            }
        }
        m
    }

    const M2_STRING: &str = "i5]1?00000000000000000000000000000000000000000000000000000000000000000000000W9?TNVNPJ00000000000000000000000000000000000b1";

    #[test]
    fn compressed_rle_matches_pycocotools() {
        // Strings from pycocotools 2.0 `mask.encode` / `frPyObjects`.
        assert_eq!(rle_to_string(&encode(&M1)), "21120O2O20");
        assert_eq!(rle_from_string("21120O2O20").unwrap(), encode(&M1));
        let list = [0, 5, 3, 100, 2, 2000, 7, 1, 40000];
        assert_eq!(rle_to_string(&list), "053o2O\\k15aQNiQW1");
        assert_eq!(rle_from_string("053o2O\\k15aQNiQW1").unwrap(), list);
        assert_eq!(rle_to_string(&[3, 1, 1, 2]), "3111");
        let rows = m2();
        let rows: Vec<&[u8]> = rows.iter().map(Vec::as_slice).collect();
        let counts = encode(&rows);
        assert_eq!(rle_to_string(&counts), M2_STRING);
        assert_eq!(rle_from_string(M2_STRING).unwrap(), counts);
        // A mask starting with a 1 begins with a zero count.
        assert_eq!(
            rle_to_string(&encode(&[&[1, 1, 1], &[1, 0, 1], &[1, 1, 1]])),
            "0410"
        );
        // Big and negative deltas survive a round trip.
        let wild = [1 << 40, 0, 7, 1 << 33, 1, 0, 123_456_789, 2, 1];
        assert_eq!(rle_from_string(&rle_to_string(&wild)).unwrap(), wild);
        assert_eq!(rle_from_string("").unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn malformed_rle_strings_are_errors() {
        assert!(rle_from_string("2 1").unwrap_err().contains("outside"));
        assert!(rle_from_string("2é").is_err());
        // '`' = 48 + 0x30: "more follows", then the string ends.
        assert!(rle_from_string("1`").unwrap_err().contains("middle"));
        assert!(rle_from_string("oooooooooooooooooooo1")
            .unwrap_err()
            .contains("too long"));
        // A negative first count ('O' = 48 + 0x1f: -1).
        assert!(rle_from_string("O").unwrap_err().contains("negative"));
    }

    fn rle_ann(counts: Value, h: u32, w: u32) -> Value {
        json!({"id": 7, "image_id": 1, "category_id": 3, "iscrowd": 1,
               "segmentation": {"size": [h, w], "counts": counts},
               "bbox": [0, 0, w, h], "area": 1.0})
    }

    #[test]
    fn rle_resize_by_two_is_pixel_exact_and_keeps_the_compressed_form() {
        let ann = rle_ann(json!("21120O2O20"), 4, 5);
        let out = rescale_annotation(&ann, (5, 4), (10, 8)).unwrap();
        // pycocotools encoding of the ×2 nearest-resized mask.
        assert_eq!(out["segmentation"]["counts"], json!("4260L4000N202N0040L0"));
        assert_eq!(out["segmentation"]["size"], json!([8, 10]));
        assert_eq!(out["area"], json!(32));
        let counts = rle_from_string(out["segmentation"]["counts"].as_str().unwrap()).unwrap();
        let big = decode(&counts, 8, 10);
        for (y, row) in big.iter().enumerate() {
            for (x, &v) in row.iter().enumerate() {
                assert_eq!(v, M1[y / 2][x / 2], "pixel ({x}, {y})");
            }
        }
        assert_eq!(out["bbox"], json!([0.0, 0.0, 10.0, 8.0]));
        for key in ["id", "image_id", "category_id", "iscrowd"] {
            assert_eq!(out[key], ann[key], "{key}");
        }
    }

    #[test]
    fn rle_resize_at_a_non_integer_ratio_matches_the_rule() {
        // 60x70 -> 45x100 (h x w): pycocotools string of the mask resized by
        // numpy indexing with floor((2d+1)·src / (2·dst)).
        let ann = rle_ann(json!(M2_STRING), 60, 70);
        let out = rescale_annotation(&ann, (70, 60), (100, 45)).unwrap();
        assert_eq!(
            out["segmentation"]["counts"],
            json!("h5Q1<0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000g9i1UMXMSJ00000000000000000000000000000000000000000000000000000V1")
        );
        assert_eq!(out["area"], json!(1895));
    }

    #[test]
    fn uncompressed_rle_stays_uncompressed() {
        let counts = encode(&M1);
        let ann = rle_ann(json!(counts), 4, 5);
        let out = rescale_annotation(&ann, (5, 4), (10, 8)).unwrap();
        let list: Vec<u64> = out["segmentation"]["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(rle_to_string(&list), "4260L4000N202N0040L0");
        // The same size in and out leaves the mask alone.
        let same = rescale_annotation(&ann, (5, 4), (5, 4)).unwrap();
        assert_eq!(same["segmentation"], ann["segmentation"]);
        assert_eq!(same["area"], json!(8));
    }

    #[test]
    fn rle_problems_are_reported() {
        let bad_size = rle_ann(json!("21120O2O20"), 5, 4);
        let err = rescale_annotation(&bad_size, (5, 4), (10, 8)).unwrap_err();
        assert!(err.contains("size"), "{err}");
        let short = rle_ann(json!([3, 4]), 4, 5);
        let err = rescale_annotation(&short, (5, 4), (10, 8)).unwrap_err();
        assert!(err.contains("cover 7 pixels"), "{err}");
        let negative = rle_ann(json!([3, -4]), 4, 5);
        assert!(rescale_annotation(&negative, (5, 4), (10, 8)).is_err());
        let no_counts = json!({"segmentation": {"size": [4, 5]}});
        assert!(rescale_annotation(&no_counts, (5, 4), (10, 8)).is_err());
    }

    #[test]
    fn boxes_polygons_and_keypoints_scale_exactly() {
        let ann = json!({
            "id": 5, "image_id": 9, "category_id": 2, "iscrowd": 0, "extra": {"k": [1]},
            "bbox": [10, 20.5, 30, 40],
            "segmentation": [[10, 20, 40, 20, 40, 60], [1.5, 2.5, 3, 4, 5, 6]],
            "area": 600.5,
            "keypoints": [10, 20, 2, 0, 0, 0, 15.5, 30, 1],
            "num_keypoints": 2
        });
        let out = rescale_annotation(&ann, (100, 50), (200, 100)).unwrap();
        assert_eq!(out["bbox"], json!([20.0, 41.0, 60.0, 80.0]));
        assert_eq!(
            out["segmentation"],
            json!([
                [20.0, 40.0, 80.0, 40.0, 80.0, 120.0],
                [3.0, 5.0, 6.0, 8.0, 10.0, 12.0]
            ])
        );
        assert_eq!(out["area"], json!(2402.0));
        assert_eq!(
            out["keypoints"],
            json!([20.0, 40.0, 2, 0.0, 0.0, 0, 31.0, 60.0, 1])
        );
        for key in [
            "id",
            "image_id",
            "category_id",
            "iscrowd",
            "extra",
            "num_keypoints",
        ] {
            assert_eq!(out[key], ann[key], "{key}");
        }
        // Unequal factors: x by 1/2, y by 3.
        let out = rescale_annotation(&ann, (100, 50), (50, 150)).unwrap();
        assert_eq!(out["bbox"], json!([5.0, 61.5, 15.0, 120.0]));
        assert_eq!(out["area"], json!(600.5 * 1.5));
        // No geometry at all is fine.
        let bare = json!({"id": 1, "image_id": 1, "category_id": 1});
        assert_eq!(rescale_annotation(&bare, (10, 10), (20, 20)).unwrap(), bare);
    }

    #[test]
    fn malformed_geometry_is_an_error_string() {
        let cases = [
            (json!({"bbox": [1, 2, 3]}), "4"),
            (json!({"bbox": [1, 2, -3, 4]}), "negative"),
            (json!({"bbox": "x"}), "bbox"),
            (json!({"segmentation": [[1, 2, 3]]}), "pairs"),
            (json!({"segmentation": [[1, "a"]]}), "segmentation[0]"),
            (
                json!({"segmentation": [{"size": [1, 1], "counts": "1"}]}),
                "polygon",
            ),
            (json!({"segmentation": 3}), "not polygons or RLE"),
            (json!({"keypoints": [1, 2]}), "multiple of 3"),
            (json!({"area": "big"}), "area"),
            (json!([1, 2]), "not an object"),
        ];
        for (ann, needle) in cases {
            let err = rescale_annotation(&ann, (10, 10), (20, 20)).unwrap_err();
            assert!(err.contains(needle), "{ann}: {err}");
        }
        assert!(rescale_annotation(&json!({}), (10, 10), (0, 20)).is_err());
        assert!(rescale_annotation(&json!({}), (0, 10), (20, 20)).is_err());
    }

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
