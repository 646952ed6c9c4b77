use serde_json::{json, Value};

use super::*;

fn bounds() -> Bounds {
    Bounds {
        limits: Limits::default(),
        model: "m".into(),
        max_steps: 999,
        default_steps: limits::DEFAULT_STEPS,
        default_long_side: limits::DEFAULT_LONG_SIDE,
        default_guidance_scale: limits::DEFAULT_GUIDANCE_SCALE,
        default_control_scale: limits::DEFAULT_CONTROL_SCALE,
        size_multiple: 16,
        min_side: 16,
        max_side: 2048,
        max_side_from_model: false,
        layout: LayoutBounds {
            min_layout_size: 14,
            max_layout_size: 2048,
            default_layout_size: 518,
            max_components: 12,
            default_components: 8,
            max_image_pixels: 1 << 20,
        },
        default_scheduler: SchedulerKind::Ddim,
    }
}

fn request(v: Value) -> SynthesisRequest {
    serde_json::from_value(v).unwrap()
}

fn resolve(v: Value) -> Result<SynthesisPlan> {
    request(v).resolve(&bounds(), &GuideInfo::image((800, 600)))
}

fn refused(v: Value, field: &str) {
    match resolve(v.clone()) {
        Err(Error::InvalidParameter { name, .. }) => assert_eq!(name, field, "{v}"),
        other => panic!("{v}: expected a `{field}` error, got {other:?}"),
    }
}

#[test]
fn a_models_defaults_come_from_its_lumen_json() {
    // What lumen.json's default_steps / default_size / default_guidance_scale set.
    let b = Bounds {
        default_steps: 20,
        default_long_side: 64,
        default_guidance_scale: 3.0,
        default_control_scale: 2.0,
        ..bounds()
    };
    let p = request(json!({}))
        .resolve(&b, &GuideInfo::image((800, 600)))
        .unwrap();
    assert_eq!(p.settings.steps, 20);
    assert_eq!(p.guidance_scale, 3.0);
    assert_eq!(p.control_scale, 2.0);
    assert_eq!((p.settings.width, p.settings.height), (64, 48));
    let given =
        request(json!({"steps": 5, "guidance_scale": 7.5, "control_scale": 1.0, "height": 32}))
            .resolve(&b, &GuideInfo::image((800, 600)))
            .unwrap();
    assert_eq!(given.settings.steps, 5);
    assert_eq!(given.guidance_scale, 7.5);
    assert_eq!(given.control_scale, 1.0);
    assert_eq!((given.settings.width, given.settings.height), (48, 32));
}

#[test]
fn defaults_are_resolved_once() {
    let p = resolve(json!({"seed": 3})).unwrap();
    assert_eq!(p.settings.steps, limits::DEFAULT_STEPS);
    assert_eq!(p.guidance_scale, limits::DEFAULT_GUIDANCE_SCALE);
    assert_eq!(p.control_scale, limits::DEFAULT_CONTROL_SCALE);
    assert_eq!(p.num_images, limits::DEFAULT_NUM_IMAGES);
    assert_eq!(p.components, 8);
    assert_eq!(p.layout_size, 518);
    assert_eq!(p.settings.scheduler, SchedulerKind::Ddim);
    assert_eq!(p.format, OutputFormat::Png);
    // 800x600 → longer side 512, 384 (a multiple of 16).
    assert_eq!((p.settings.width, p.settings.height), (512, 384));
    let r = p.parameters("k-8".into(), "m");
    assert_eq!(r.seed, 3);
    assert_eq!(r.layout_id, "k-8");
    assert_eq!(r.for_image(2).seed, 5);
    assert_eq!(r.for_image(2).num_images, 1);
}

#[test]
fn a_missing_side_follows_the_guide_aspect() {
    let b = bounds();
    assert_eq!(output_size(&b, (800, 600), Some(640), None), (640, 480));
    assert_eq!(output_size(&b, (800, 600), None, Some(96)), (128, 96));
    assert_eq!(output_size(&b, (600, 800), None, None), (384, 512));
    // Derived sides stay within the bounds.
    assert_eq!(output_size(&b, (100, 4000), Some(2048), None), (2048, 2048));
    assert_eq!(output_size(&b, (4000, 10), Some(64), None), (64, 16));
    let small = Bounds {
        max_side: 128,
        ..bounds()
    };
    assert_eq!(output_size(&small, (800, 600), None, None), (128, 96));
}

#[test]
fn sides_outside_the_models_supported_sizes_are_refused() {
    // lumen.json min_size 48, max_size 64 (below the deployment's --max-side).
    let b = Bounds {
        min_side: 48,
        max_side: 64,
        max_side_from_model: true,
        default_long_side: 64,
        ..bounds()
    };
    let guide = GuideInfo::image((64, 64));
    for (field, body) in [
        ("width", json!({"width": 128})),
        ("height", json!({"height": 80})),
        ("width", json!({"width": 32})),
        ("height", json!({"height": 16})),
    ] {
        match request(body.clone()).resolve(&b, &guide) {
            Err(Error::InvalidParameter { name, message }) => {
                assert_eq!(name, field, "{body}");
                assert!(message.contains("lumen.json"), "{message}");
            }
            other => panic!("{body}: expected a `{field}` error, got {other:?}"),
        }
    }
    let p = request(json!({"width": 48})).resolve(&b, &guide).unwrap();
    assert_eq!((p.settings.width, p.settings.height), (48, 48));
    // Derived sides stay within the supported ones: a wide guide's short
    // side is raised to min_size rather than given at a size the model lacks.
    assert_eq!(output_size(&b, (800, 200), None, None), (64, 48));
    let rules = rules(&b.limits, Some(&b));
    let width = rules.iter().find(|r| r.name == "width").unwrap();
    assert_eq!((width.minimum, width.maximum), (Some(48.0), Some(64.0)));
}

#[test]
fn every_rule_is_what_validation_enforces() {
    let b = bounds();
    let samples = |rule: &FieldRule| -> Vec<(Value, bool)> {
        let mut v = Vec::new();
        if let (Some(lo), Some(hi)) = (rule.minimum, rule.maximum) {
            let step = rule.multiple_of.map_or(1.0, |m| m as f64);
            let int = !matches!(rule.name, "guidance_scale" | "control_scale");
            let n = |x: f64| if int { json!(x as i64) } else { json!(x) };
            v.extend([(n(lo), true), (n(hi), true), (n(hi + step), false)]);
            if lo - step >= 0.0 || !int {
                v.push((n(lo - step), false));
            }
            if let Some(m) = rule.multiple_of {
                v.push((n(lo + m as f64 / 2.0), false));
            }
        }
        if let Some(choices) = &rule.choices {
            v.extend(choices.iter().map(|c| (json!(c), true)));
            v.push((json!("bogus"), false));
        }
        if let Some(d) = &rule.default {
            v.push((d.clone(), true));
        }
        v
    };
    for rule in rules(&b.limits, Some(&b)) {
        for (value, ok) in samples(&rule) {
            let body = json!({ rule.name: value });
            let got = resolve(body.clone());
            if ok {
                assert!(got.is_ok(), "{body}: {got:?}");
            } else {
                refused(body, rule.name);
            }
        }
    }
    // Without a model the rules still hold for every model.
    let generic = rules(&Limits::default(), None);
    let steps = generic.iter().find(|r| r.name == "steps").unwrap();
    assert_eq!(steps.maximum, Some(1000.0));
}

#[test]
fn conflicts_and_guide_defaults() {
    let b = bounds();
    let cached = GuideInfo {
        source_size: (64, 64),
        layout_size: Some(224),
        components: Some(3),
    };
    let p = request(json!({})).resolve(&b, &cached).unwrap();
    assert_eq!((p.components, p.layout_size), (3, 224));
    let e = request(json!({"layout_size": 224}))
        .resolve(&b, &cached)
        .unwrap_err();
    assert_eq!(e.field(), Some("layout_size"));
    // A layout_id's K outside the basis is refused by name.
    let bad = GuideInfo {
        components: Some(40),
        ..cached
    };
    assert_eq!(
        request(json!({})).resolve(&b, &bad).unwrap_err().field(),
        Some("components")
    );
    refused(json!({"guidance_scale": 1e9}), "guidance_scale");
    refused(json!({"scheduler": "pndm"}), "scheduler");
    refused(json!({"format": "PNG"}), "format");
    assert!(serde_json::from_value::<SynthesisRequest>(json!({"colour": 1})).is_err());
}

#[test]
fn layout_requests_share_the_rules() {
    let b = bounds();
    let r: LayoutRequest = serde_json::from_value(json!({})).unwrap();
    assert_eq!(r.resolve(&b.layout).unwrap(), (8, 518));
    let r: LayoutRequest = serde_json::from_value(json!({"components": 13})).unwrap();
    assert_eq!(
        r.resolve(&b.layout).unwrap_err().field(),
        Some("components")
    );
    let r: LayoutRequest = serde_json::from_value(json!({"layout_size": 13})).unwrap();
    assert_eq!(
        r.resolve(&b.layout).unwrap_err().field(),
        Some("layout_size")
    );
}
