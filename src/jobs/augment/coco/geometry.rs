//! The geometry of a COCO annotation: checked against its image's size
//! ([`check`]) and moved to another size ([`rescale_annotation`]): boxes,
//! polygons and keypoints scaled as continuous coordinates, RLE masks
//! resized by the nearest pixel-centre rule ([`super::rle::resize_rle`]).

use serde_json::{Map, Number, Value};

use super::kind;
use super::rle::{resize_rle, rle_from_string, rle_to_string};

/// One COCO annotation moved from an image of `from = (width, height)` to one
/// of `to`: `bbox` `[x, y, w, h]`, polygon `segmentation` points and
/// `keypoints` `[x, y, v, …]` scaled by `sx = to_w / from_w`,
/// `sy = to_h / from_h`; an RLE `segmentation` (`{"size": [h, w], "counts":
/// …}`, column-major, compressed string or uncompressed list) resized by the
/// nearest pixel-centre rule and written back in the same form with the new
/// `size`; `area` multiplied by `sx · sy`, or, for RLE, the resized mask's
/// pixel count. Every other field is copied. The error says what is
/// malformed (including an RLE `size` other than `from`).
pub fn rescale_annotation(ann: &Value, from: (u32, u32), to: (u32, u32)) -> Result<Value, String> {
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
fn parse_geometry(obj: &Map<String, Value>, size: (u32, u32)) -> Result<Geometry, String> {
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
) -> Result<Segmentation, String> {
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

fn finite_numbers(v: &Value, what: &str) -> Result<Vec<f64>, String> {
    let list = v
        .as_array()
        .ok_or_else(|| format!("`{what}` is {}, not a list of numbers", kind(v)))?;
    list.iter()
        .map(|n| n.as_f64().filter(|f| f.is_finite()))
        .collect::<Option<Vec<f64>>>()
        .ok_or_else(|| format!("`{what}` holds something other than numbers"))
}

fn number(v: f64, what: &str) -> Result<Value, String> {
    Number::from_f64(v)
        .map(Value::Number)
        .ok_or_else(|| format!("`{what}` overflows when rescaled"))
}

fn numbers(values: &[f64], what: &str) -> Result<Value, String> {
    values
        .iter()
        .map(|&v| number(v, what))
        .collect::<Result<Vec<Value>, String>>()
        .map(Value::Array)
}

/// Whether an annotation's geometry is well formed for an image of `size`.
pub(super) fn check(obj: &Map<String, Value>, size: (u32, u32)) -> Result<(), String> {
    parse_geometry(obj, size).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::super::rle::tests::{decode, encode, M1, M2_STRING};
    use super::*;
    use serde_json::json;

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
}
