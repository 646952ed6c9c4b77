//! The files that describe the whole output set, rewritten from
//! `manifest.jsonl` at the end of every unsharded run and by the shard that
//! completes a sharded job, so that they list exactly the kept outputs:
//!
//! - `annotations.json` (with `--coco`): COCO for every output;
//! - `metadata.jsonl`: the Hugging Face `imagefolder` metadata, one row per
//!   output ([`MetadataRow`]);
//! - `classes.json`: every mask value and class id the output carries, with
//!   its name from the input ([`super::classes`]) or `null`;
//! - `data.yaml` (with `--yolo`): the ultralytics dataset file.
//!
//! Each is written under a temporary name and renamed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value};

use super::classes::{ClassNames, MaskValue, Names};
use super::coco::{Coco, OutImage, Problem};
use super::mask::Mask;
use super::plan::Source;
use super::state::{read_lines, ManifestLine};
use crate::error::{Error, Result};
use crate::jobs::write_atomic_shared;

/// What the catalog is made from.
pub(super) struct Catalog<'a> {
    pub out: &'a Path,
    pub sources: &'a [Source],
    pub coco: Option<&'a Coco>,
    /// The COCO file (`--coco`), named in `classes.json`.
    pub coco_path: Option<&'a Path>,
    pub names: &'a ClassNames,
    /// Whether the job carries masks (`--masks`) and YOLO files (`--yolo`).
    pub masks: bool,
    pub yolo: bool,
}

/// One line of `metadata.jsonl`, as Hugging Face `imagefolder` reads it:
/// `file_name` and `mask_file_name` become Image columns `image` and
/// `mask`, `objects` the detection boxes (COCO `[x, y, width, height]` in
/// pixels of the output) and their category ids.
#[derive(Clone, Debug, Serialize)]
pub struct MetadataRow {
    /// The output image, relative to OUT.
    pub file_name: String,
    /// The prompt it was made with.
    pub text: String,
    /// Its mask, relative to OUT (with `--masks`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_file_name: Option<String>,
    /// Its boxes (with `--coco`, else with `--yolo`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub objects: Option<Objects>,
    pub source: String,
    pub components: usize,
    pub variant: usize,
    pub seed: u64,
    pub score: Option<f32>,
}

/// The `objects` of a row: parallel lists.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Objects {
    pub bbox: Vec<[f64; 4]>,
    pub categories: Vec<i64>,
}

/// Write every catalog file; returns the labels left out and why.
pub(super) fn write(c: &Catalog) -> Result<Vec<Problem>> {
    let lines: Vec<ManifestLine> = read_lines(&c.out.join("manifest.jsonl"))?;
    let by_rel: HashMap<&str, &Source> = c.sources.iter().map(|s| (s.rel.as_str(), s)).collect();
    let mut problems = Vec::new();
    let mut coco_objects: HashMap<u64, Objects> = HashMap::new();
    let mut coco_ids: BTreeSet<i64> = BTreeSet::new();
    if let Some(coco) = c.coco {
        let doc = write_coco(c.out, coco, &lines, &by_rel, &mut problems)?;
        for ann in doc["annotations"].as_array().into_iter().flatten() {
            let (Some(image), Some(category)) =
                (ann["image_id"].as_u64(), ann["category_id"].as_i64())
            else {
                continue;
            };
            coco_ids.insert(category);
            let Some(bbox) = bbox_of(&ann["bbox"]) else {
                continue;
            };
            let o = coco_objects.entry(image).or_default();
            o.bbox.push(bbox);
            o.categories.push(category);
        }
    }
    // YOLO files and masks, read once per source.
    let mut yolo: HashMap<&str, Vec<YoloBox>> = HashMap::new();
    let mut mask_values = MaskValues::default();
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for l in &lines {
        let Some(src) = by_rel.get(l.source.as_str()) else {
            continue;
        };
        if !seen.insert(src.rel.as_str()) {
            continue;
        }
        if let (true, Some(file)) = (c.yolo, &src.yolo) {
            let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
            let (boxes, bad) = parse_yolo(&text);
            problems.extend(
                bad.into_iter()
                    .map(|(n, why)| (format!("{} line {n}", file.display()), why)),
            );
            yolo.insert(src.rel.as_str(), boxes);
        }
        if let (true, Some(file)) = (c.masks, &src.mask) {
            mask_values.add(&Mask::read(file)?);
        }
    }

    let rows: Vec<MetadataRow> = lines
        .iter()
        .map(|l| MetadataRow {
            file_name: l.output.clone(),
            text: l.prompt.clone(),
            mask_file_name: c
                .masks
                .then(|| l.labels.iter().find(|p| p.starts_with("masks/")).cloned())
                .flatten(),
            objects: if c.coco.is_some() {
                Some(
                    l.coco_image_id
                        .and_then(|id| coco_objects.get(&id).cloned())
                        .unwrap_or_default(),
                )
            } else if c.yolo {
                Some(yolo_objects(
                    yolo.get(l.source.as_str())
                        .map(Vec::as_slice)
                        .unwrap_or(&[]),
                    (l.width, l.height),
                ))
            } else {
                None
            },
            source: l.source.clone(),
            components: l.components,
            variant: l.variant,
            seed: l.seed,
            score: l.score,
        })
        .collect();
    let mut text = String::new();
    for r in &rows {
        text += &serde_json::to_string(r).map_err(|e| Error::Internal(e.to_string()))?;
        text.push('\n');
    }
    write_atomic_shared(&c.out.join("metadata.jsonl"), text.as_bytes())?;

    let yolo_ids: BTreeSet<u64> = yolo
        .values()
        .flatten()
        .map(|b| b.class)
        .chain(c.names.yolo.names.keys().copied())
        .collect();
    let classes = classes_json(c, &mask_values, &coco_ids, &yolo_ids);
    let classes = serde_json::to_string_pretty(&classes)
        .map_err(|e| Error::Internal(format!("classes.json: {e}")))?;
    write_atomic_shared(&c.out.join("classes.json"), classes.as_bytes())?;
    if c.yolo {
        write_atomic_shared(
            &c.out.join("data.yaml"),
            data_yaml(&c.names.yolo, &yolo_ids)?.as_bytes(),
        )?;
    }
    Ok(problems)
}

/// `annotations.json` for every output in the manifest; returns the COCO object.
fn write_coco(
    out: &Path,
    c: &Coco,
    lines: &[ManifestLine],
    by_rel: &HashMap<&str, &Source>,
    problems: &mut Vec<Problem>,
) -> Result<Value> {
    let mut images = Vec::new();
    for l in lines {
        let (Some(id), Some(src)) = (l.coco_image_id, by_rel.get(l.source.as_str())) else {
            continue;
        };
        let Some(source) = src.coco else { continue };
        images.push(OutImage {
            id,
            file_name: l
                .output
                .strip_prefix("images/")
                .unwrap_or(&l.output)
                .to_string(),
            width: l.width,
            height: l.height,
            source,
        });
    }
    images.sort_by_key(|i| i.id);
    let (doc, left_out) = c.output(&images);
    problems.extend(left_out);
    let text = serde_json::to_string(&doc).map_err(|e| Error::Internal(e.to_string()))?;
    write_atomic_shared(&out.join("annotations.json"), text.as_bytes())?;
    Ok(doc)
}

fn bbox_of(v: &Value) -> Option<[f64; 4]> {
    let list = v.as_array()?;
    match list[..] {
        [ref x, ref y, ref w, ref h] => Some([x.as_f64()?, y.as_f64()?, w.as_f64()?, h.as_f64()?]),
        _ => None,
    }
}

/// One YOLO line: class and normalised centre box.
#[derive(Clone, Copy, Debug, PartialEq)]
struct YoloBox {
    class: u64,
    /// Centre x, centre y, width, height, as fractions of the image.
    xywh: [f64; 4],
}

/// The boxes of a YOLO file, and the lines (1-based) that are not YOLO. A
/// line is `class cx cy w h`, or, as ultralytics reads segmentation labels,
/// `class x1 y1 x2 y2 …` with more than five numbers: its box is the
/// points' extent.
fn parse_yolo(text: &str) -> (Vec<YoloBox>, Vec<(usize, String)>) {
    let (mut boxes, mut bad) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let class = fields[0].parse::<u64>().ok();
        let numbers: Option<Vec<f64>> = fields[1..]
            .iter()
            .map(|f| f.parse::<f64>().ok().filter(|v| v.is_finite()))
            .collect();
        let xywh = match (class, numbers.as_deref()) {
            (Some(_), Some(&[cx, cy, w, h])) => Some([cx, cy, w, h]),
            (Some(_), Some(points)) if points.len() > 4 && points.len() % 2 == 0 => {
                let xs = points.iter().step_by(2);
                let ys = points.iter().skip(1).step_by(2);
                let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let (y0, y1) = ys.fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                Some([(x0 + x1) / 2.0, (y0 + y1) / 2.0, x1 - x0, y1 - y0])
            }
            _ => None,
        };
        match (class, xywh) {
            (Some(class), Some(xywh)) => boxes.push(YoloBox { class, xywh }),
            _ => bad.push((
                i + 1,
                "not `class cx cy w h` or `class x1 y1 x2 y2 …`: left out of metadata.jsonl".into(),
            )),
        }
    }
    (boxes, bad)
}

/// YOLO boxes as `objects` of an image of `(width, height)`: COCO boxes in pixels.
fn yolo_objects(boxes: &[YoloBox], (w, h): (u32, u32)) -> Objects {
    let (w, h) = (f64::from(w), f64::from(h));
    let mut o = Objects::default();
    for b in boxes {
        let [cx, cy, bw, bh] = b.xywh;
        o.bbox
            .push([(cx - bw / 2.0) * w, (cy - bh / 2.0) * h, bw * w, bh * h]);
        o.categories.push(b.class as i64);
    }
    o
}

/// `classes.json`: a part per kind of label the job carries.
#[derive(Serialize)]
struct ClassesFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    masks: Option<Part<MaskEntry>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    coco: Option<Part<IdName>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    yolo: Option<Part<IdName>>,
    /// Which ids `metadata.jsonl`'s `objects.categories` are: `coco` or `yolo`.
    #[serde(skip_serializing_if = "Option::is_none")]
    objects: Option<&'static str>,
}

/// One kind of label: where its names came from, and every value or id.
#[derive(Serialize)]
struct Part<E> {
    names_from: Option<String>,
    classes: Vec<E>,
}

#[derive(Serialize)]
struct MaskEntry {
    /// A number, or one per channel for colour masks.
    value: Value,
    name: Option<String>,
    /// The palette's colour for it (palette masks).
    #[serde(skip_serializing_if = "Option::is_none")]
    colour: Option<[u8; 3]>,
}

#[derive(Serialize)]
struct IdName {
    id: i64,
    name: Option<String>,
}

/// `classes.json`: a part per kind of label the job carries, each listing
/// every value or id found in the labels or named in the input.
fn classes_json(
    c: &Catalog,
    masks: &MaskValues,
    coco_ids: &BTreeSet<i64>,
    yolo_ids: &BTreeSet<u64>,
) -> ClassesFile {
    let from = |p: Option<&Path>| p.map(|p| p.display().to_string());
    let masks = c.masks.then(|| {
        let names = &c.names.masks;
        let values: BTreeSet<&MaskValue> = masks.found.iter().chain(names.names.keys()).collect();
        Part {
            names_from: from(names.from.as_deref()),
            classes: values
                .into_iter()
                .map(|v| MaskEntry {
                    value: if v.len() == 1 { json!(v[0]) } else { json!(v) },
                    name: names.names.get(v).cloned().flatten(),
                    colour: masks.colour(v),
                })
                .collect(),
        }
    });
    let coco = c.coco.map(|coco| {
        let mut named: BTreeMap<i64, Option<String>> = BTreeMap::new();
        for cat in coco
            .categories
            .as_ref()
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(id) = cat["id"].as_i64() {
                named.insert(id, cat["name"].as_str().map(str::to_string));
            }
        }
        for &id in coco_ids {
            named.entry(id).or_insert(None);
        }
        Part {
            names_from: from(c.coco_path),
            classes: named
                .into_iter()
                .map(|(id, name)| IdName { id, name })
                .collect(),
        }
    });
    let yolo = c.yolo.then(|| {
        let names = &c.names.yolo;
        Part {
            names_from: from(names.from.as_deref()),
            classes: yolo_range(yolo_ids)
                .map(|id| IdName {
                    id: id as i64,
                    name: names.names.get(&id).cloned().flatten(),
                })
                .collect(),
        }
    });
    let objects = if c.coco.is_some() {
        Some("coco")
    } else if c.yolo {
        Some("yolo")
    } else {
        None
    };
    ClassesFile {
        masks,
        coco,
        yolo,
        objects,
    }
}

/// The values found in the masks, and the first palette seen.
#[derive(Default)]
struct MaskValues {
    found: BTreeSet<MaskValue>,
    palette: Option<Vec<u8>>,
}

impl MaskValues {
    fn add(&mut self, mask: &Mask) {
        self.found.extend(mask.values());
        if self.palette.is_none() && mask.color_type() == png::ColorType::Indexed {
            self.palette = mask.palette().map(<[u8]>::to_vec);
        }
    }

    /// The palette's colour of a palette index.
    fn colour(&self, v: &MaskValue) -> Option<[u8; 3]> {
        let [index] = v[..] else { return None };
        let at = index as usize * 3;
        let c = self.palette.as_ref()?.get(at..at + 3)?;
        Some([c[0], c[1], c[2]])
    }
}

/// Ids 0..=max: ultralytics wants every class below the largest named.
fn yolo_range(ids: &BTreeSet<u64>) -> impl Iterator<Item = u64> {
    0..ids.last().map_or(0, |m| m + 1)
}

/// The ultralytics dataset file: train and val are `images` (the dataset
/// root is this file's folder, as ultralytics takes it when `path` is not
/// given); `names` covers every id from 0 to the largest.
fn data_yaml(names: &Names<u64>, ids: &BTreeSet<u64>) -> Result<String> {
    let mut s = String::from(
        "# Written by lumen augment: this folder as an ultralytics (YOLO) dataset.\n\
         # No `path`: the dataset root is this file's folder, wherever it is moved.\n\
         # Labels: labels/ beside images/. Every image is in train and in val; split as you need.\n",
    );
    match &names.from {
        Some(p) => {
            s += &format!(
                "# Class names from {} (null: unnamed there); see classes.json.\n",
                p.display()
            )
        }
        None => s += "# The input gave no class names (null: unnamed); see classes.json.\n",
    }
    s += "train: images\nval: images\n";
    let named: BTreeMap<u64, Option<String>> = yolo_range(ids)
        .map(|id| (id, names.names.get(&id).cloned().flatten()))
        .collect();
    s += &serde_yaml_ng::to_string(&BTreeMap::from([("names", named)]))
        .map_err(|e| Error::Internal(format!("data.yaml: {e}")))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yolo_lines_boxes_and_polygons() {
        let (boxes, bad) =
            parse_yolo("0 0.5 0.5 0.25 0.5\n\n2 0.25 0.25 0.75 0.25 0.75 0.5\nx 1 2 3 4\n1 0.5\n");
        assert_eq!(
            boxes,
            [
                YoloBox {
                    class: 0,
                    xywh: [0.5, 0.5, 0.25, 0.5]
                },
                YoloBox {
                    class: 2,
                    xywh: [0.5, 0.375, 0.5, 0.25]
                },
            ]
        );
        assert_eq!(bad.iter().map(|b| b.0).collect::<Vec<_>>(), [4, 5]);
        let o = yolo_objects(&boxes[..1], (64, 32));
        assert_eq!(o.bbox, [[24.0, 8.0, 16.0, 16.0]]);
        assert_eq!(o.categories, [0]);
    }

    #[test]
    fn data_yaml_names_every_id_up_to_the_largest() {
        let names = Names {
            from: None,
            names: BTreeMap::from([(0, Some("circle".to_string())), (1, None)]),
        };
        let yaml = data_yaml(&names, &BTreeSet::from([0, 1, 3])).unwrap();
        #[derive(serde::Deserialize)]
        struct DataYaml {
            train: String,
            val: String,
            names: BTreeMap<u64, Option<String>>,
        }
        let read: DataYaml = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(
            (read.train.as_str(), read.val.as_str()),
            ("images", "images")
        );
        let want = [Some("circle"), None, None, None].map(|n| n.map(str::to_string));
        assert_eq!(read.names.into_values().collect::<Vec<_>>(), want, "{yaml}");
    }
}
