//! Soak: one `lumen serve` (the embedded model) under mixed load at
//! saturation for `LUMEN_SOAK_S` seconds (60 by default, as CI runs it; the
//! full run is `LUMEN_SOAK_S=600 cargo test --release --test soak -- --nocapture`).
//!
//! The load: layouts of many guides and K (cache misses, then hits, with a
//! layout cache small enough to evict), syntheses by `layout_id` (an evicted
//! one gives 404) and by upload at several sizes, K, step counts and image
//! counts, clients that give up mid-synthesis, requests refused as invalid,
//! and more clients than the queue holds (429s). Twice a second the
//! server's RSS, open file descriptors and threads are sampled from /proc.
//!
//! Checked: no answer outside 200/400/404/429 and nothing lost; the median
//! RSS of the last fifth is at most 5 % above the highest after warm-up (the
//! load's largest requests on purpose, then its first fifth) to half-way; descriptors and threads come back to where they
//! were once the clients are gone; `/metrics` agrees with the client's counts.
//! The curve and counts are printed and written to `target/soak-report.json`.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{b64, metric_sum};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

const WORKERS: usize = 6;
const MAX_QUEUE: &str = "4";
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// A guide: a few coloured rectangles on a coloured ground, as PNG.
fn guide(rng: &mut ChaCha8Rng) -> Vec<u8> {
    let (w, h) = (rng.random_range(48..=128u32), rng.random_range(48..=128u32));
    guide_of_size(rng, w, h)
}

fn guide_of_size(rng: &mut ChaCha8Rng, w: u32, h: u32) -> Vec<u8> {
    let ground = image::Rgb([rng.random(), rng.random(), rng.random()]);
    let mut img = image::RgbImage::from_pixel(w, h, ground);
    for _ in 0..rng.random_range(1..5) {
        let c = image::Rgb([rng.random(), rng.random(), rng.random()]);
        let (x0, y0) = (rng.random_range(0..w), rng.random_range(0..h));
        let (x1, y1) = (rng.random_range(x0..=w), rng.random_range(y0..=h));
        for y in y0..y1 {
            for x in x0..x1 {
                img.put_pixel(x, y, c);
            }
        }
    }
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Before the measured run, drive the server through the load's largest
/// shapes: full queues of the biggest syntheses (96 px, two images, from a
/// 128 px guide) beside layouts of that guide, a few rounds over. The heap's
/// high-water mark is then reached on purpose, not first met late in the run
/// by chance, so growth after warm-up means memory kept, not a larger batch.
/// Returns its answers by (endpoint, status), which `/metrics` counts too.
async fn warm_up(
    client: &Client,
    base: &str,
    rng: &mut ChaCha8Rng,
) -> BTreeMap<(String, u16), u64> {
    let big = b64(&guide_of_size(rng, 128, 128));
    let queue: usize = MAX_QUEUE.parse().unwrap();
    let mut answers = BTreeMap::new();
    for _ in 0..3 {
        let mut jobs = Vec::new();
        for i in 0..queue + 2 {
            let (endpoint, body) = if i < queue {
                (
                    "/synthesize",
                    json!({"image": big, "components": 8, "steps": 4,
                    "width": 96, "height": 96, "num_images": 2,
                    "seed": rng.random_range(0..1000u64)}),
                )
            } else {
                ("/layout", json!({"image": big, "components": 8}))
            };
            let (client, url) = (client.clone(), format!("{base}{endpoint}"));
            jobs.push(tokio::spawn(async move {
                let mut refused = 0;
                loop {
                    let r = client.post(&url).json(&body).send().await.unwrap();
                    if r.status() != StatusCode::TOO_MANY_REQUESTS {
                        assert_eq!(r.status(), StatusCode::OK, "warm-up {url}");
                        r.bytes().await.unwrap();
                        return (endpoint, refused);
                    }
                    r.bytes().await.unwrap();
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }));
        }
        for j in jobs {
            let (endpoint, refused) = j.await.unwrap();
            *answers.entry((endpoint.to_string(), 200)).or_default() += 1;
            if refused > 0 {
                *answers.entry((endpoint.to_string(), 429)).or_default() += refused;
            }
        }
    }
    answers
}

#[derive(Default)]
struct Tally {
    /// (endpoint, status) → answers the client read in full.
    answers: BTreeMap<(String, u16), u64>,
    /// endpoint → requests this client gave up on before an answer.
    abandoned: BTreeMap<String, u64>,
    /// Requests with no answer although the client waited (lost).
    lost: u64,
    unexpected: Vec<String>,
}

struct Load {
    base: String,
    client: Client,
    impatient: Client,
    guides: Vec<String>,
    layout_ids: Mutex<Vec<String>>,
    tally: Mutex<Tally>,
}

impl Load {
    /// Send one request; returns whether it was refused as overloaded.
    async fn one(&self, rng: &mut ChaCha8Rng) -> bool {
        let pick = rng.random_range(0..100);
        let guide = self.guides[rng.random_range(0..self.guides.len())].clone();
        let k = rng.random_range(1..=8);
        let (endpoint, body, give_up) = match pick {
            0..25 => ("/layout", json!({"image": guide, "components": k}), false),
            25..55 => {
                let id = {
                    let ids = self.layout_ids.lock().unwrap();
                    if ids.is_empty() {
                        return false;
                    }
                    ids[rng.random_range(0..ids.len())].clone()
                };
                let steps = rng.random_range(2..=5);
                (
                    "/synthesize",
                    json!({"layout_id": id, "steps": steps, "width": 64, "height": 64,
                           "seed": rng.random_range(0..1000u64)}),
                    false,
                )
            }
            55..85 => {
                let size = [64, 96][rng.random_range(0..2)];
                (
                    "/synthesize",
                    json!({"image": guide, "components": k, "steps": rng.random_range(2..=4),
                           "width": size, "height": size, "num_images": rng.random_range(1..=2),
                           "seed": rng.random_range(0..1000u64)}),
                    false,
                )
            }
            85..97 => (
                "/synthesize",
                json!({"image": guide, "steps": 30, "width": 96, "height": 96}),
                true,
            ),
            _ => (
                "/synthesize",
                json!({"image": guide, "components": 99}),
                false,
            ),
        };
        let client = if give_up {
            &self.impatient
        } else {
            &self.client
        };
        let sent = client
            .post(format!("{}{endpoint}", self.base))
            .json(&body)
            .send()
            .await;
        let answer = match sent {
            Ok(r) => {
                let status = r.status();
                r.bytes().await.map(|b| (status, b))
            }
            Err(e) => Err(e),
        };
        let mut tally = self.tally.lock().unwrap();
        let overloaded = matches!(&answer, Ok((s, _)) if *s == StatusCode::TOO_MANY_REQUESTS);
        match answer {
            Err(e) if give_up && e.is_timeout() => {
                *tally.abandoned.entry(endpoint.into()).or_default() += 1;
            }
            Err(e) => {
                tally.lost += 1;
                tally.unexpected.push(format!("{endpoint}: no answer: {e}"));
            }
            Ok((status, bytes)) => {
                *tally
                    .answers
                    .entry((endpoint.into(), status.as_u16()))
                    .or_default() += 1;
                let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let expected = match status.as_u16() {
                    200 => true,
                    400 => v["error"]["code"] == "invalid_parameter",
                    404 => v["error"]["code"] == "unknown_layout",
                    429 => v["error"]["code"] == "overloaded",
                    _ => false,
                };
                if !expected {
                    tally.unexpected.push(format!("{endpoint}: {status} {}", v));
                }
                if status == StatusCode::OK && endpoint == "/layout" {
                    let mut ids = self.layout_ids.lock().unwrap();
                    if let Some(id) = v["layout_id"].as_str() {
                        if ids.len() >= 32 {
                            ids.remove(0);
                        }
                        ids.push(id.to_string());
                    }
                }
            }
        }
        overloaded
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_mixed_load_keeps_memory_descriptors_and_threads_flat() {
    let seconds: u64 = std::env::var("LUMEN_SOAK_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let duration = Duration::from_secs(seconds);
    let (mut child, base, _logs) = common::spawn_serve(
        &[
            "--max-queue",
            MAX_QUEUE,
            "--max-batch",
            "2",
            "--layout-cache",
            "8",
            "--request-timeout-s",
            "120",
        ],
        None,
    );
    let pid = child.id();
    common::wait_ready(&Client::new(), &base).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle_before = common::proc_sample(pid);

    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let warm_answers = warm_up(&Client::new(), &base, &mut rng).await;
    let load = Arc::new(Load {
        base: base.clone(),
        client: Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap(),
        impatient: Client::builder()
            .timeout(Duration::from_millis(400))
            .build()
            .unwrap(),
        guides: (0..24).map(|_| b64(&guide(&mut rng))).collect(),
        layout_ids: Mutex::new(Vec::new()),
        tally: Mutex::new(Tally::default()),
    });

    let start = Instant::now();
    let samples = Arc::new(Mutex::new(Vec::<(f64, u64, usize, usize)>::new()));
    let sampler = {
        let samples = samples.clone();
        tokio::spawn(async move {
            loop {
                let (rss, fds, threads) = common::proc_sample(pid);
                samples
                    .lock()
                    .unwrap()
                    .push((start.elapsed().as_secs_f64(), rss, fds, threads));
                if start.elapsed() >= duration {
                    break;
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        })
    };
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let load = load.clone();
            tokio::spawn(async move {
                let mut rng = ChaCha8Rng::seed_from_u64(100 + w as u64);
                while start.elapsed() < duration {
                    if load.one(&mut rng).await {
                        // Back off a little, as a client honouring Retry-After
                        // would (but sooner, to keep the queue full).
                        let ms = rng.random_range(50..250);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    sampler.await.unwrap();
    let ran = start.elapsed();

    // Let the server see every client connection close, then read /metrics
    // on a connection of its own.
    let load = Arc::try_unwrap(load).ok().expect("workers are done");
    let tally = load.tally.into_inner().unwrap();
    drop((load.client, load.impatient));
    let probe = Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut idle_after = common::proc_sample(pid);
    let t = Instant::now();
    // Idle blocking-pool threads exit after tokio's 10 s keep-alive.
    while (idle_after.1 > idle_before.1 || idle_after.2 > idle_before.2)
        && t.elapsed() < Duration::from_secs(15)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        idle_after = common::proc_sample(pid);
    }
    let metrics = probe
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();

    // The RSS curve. The allocator hands memory back between batches, so
    // single samples swing by a tenth with the work in flight at that instant,
    // and even the median of a few seconds wanders by ±6 % with no trend. A
    // leak shows as the level of the last fifth of the run (its median) above
    // the range seen from warm-up (the first fifth) to half-way (its highest
    // sample): the level rises, the swings do not.
    let samples = samples.lock().unwrap().clone();
    let window = |from: f64, to: f64| {
        let mut rss: Vec<u64> = samples
            .iter()
            .filter(|s| s.0 >= from && s.0 <= to)
            .map(|s| s.1)
            .collect();
        assert!(!rss.is_empty(), "samples in the window");
        rss.sort_unstable();
        rss
    };
    let fifth = duration.as_secs_f64() / 5.0;
    let at_warmup = *window(fifth, 2.5 * fifth).last().unwrap();
    let end = {
        let rss = window(ran.as_secs_f64() - fifth, ran.as_secs_f64());
        rss[rss.len() / 2]
    };
    let peak = samples
        .iter()
        .filter(|s| s.0 >= fifth)
        .map(|s| s.1)
        .max()
        .unwrap();
    let mb = |b: u64| b as f64 / 1048576.0;
    let growth = end as f64 / at_warmup as f64 - 1.0;
    let max_threads = samples.iter().map(|s| s.3).max().unwrap();

    let total: u64 =
        tally.answers.values().sum::<u64>() + tally.abandoned.values().sum::<u64>() + tally.lost;
    let mut by_status = BTreeMap::<u16, u64>::new();
    for ((_, status), n) in &tally.answers {
        *by_status.entry(*status).or_default() += n;
    }
    let report = json!({
        "seconds": ran.as_secs_f64(),
        "requests": total,
        "requests_per_s": total as f64 / ran.as_secs_f64(),
        "answers_by_status": by_status,
        "abandoned": tally.abandoned,
        "lost": tally.lost,
        "rss_mb": {"start": mb(samples[0].1), "high_after_warmup": mb(at_warmup),
                   "median_end": mb(end), "peak_after_warmup": mb(peak),
                   "growth_after_warmup": growth},
        "idle_fds": [idle_before.1, idle_after.1],
        "idle_threads": [idle_before.2, idle_after.2],
        "max_threads": max_threads,
        "samples": samples.iter().map(|s| json!([s.0, mb(s.1), s.2, s.3])).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    let path = common::root().join("target/soak-report.json");
    let _ = std::fs::write(&path, &text);
    eprintln!(
        "soak {:.0} s: {total} requests, by status {by_status:?}, abandoned {:?}, lost {}\n\
         RSS start {:.1} MB, highest after warm-up {:.1} MB, median at the end {:.1} MB ({:+.1} %), peak {:.1} MB\n\
         idle fds {} -> {}, idle threads {} -> {}, at most {max_threads} threads; report in {}",
        ran.as_secs_f64(),
        tally.abandoned,
        tally.lost,
        mb(samples[0].1),
        mb(at_warmup),
        mb(end),
        growth * 100.0,
        mb(peak),
        idle_before.1,
        idle_after.1,
        idle_before.2,
        idle_after.2,
        path.display()
    );

    assert!(
        tally.unexpected.is_empty() && tally.lost == 0,
        "{:?}",
        tally.unexpected
    );
    for status in [200, 429] {
        assert!(
            by_status.get(&status).copied().unwrap_or(0) > 0,
            "no {status} answers: the load did not saturate"
        );
    }
    assert!(
        growth <= 0.05,
        "RSS at the end (median) is {:.1} % above the highest after warm-up",
        growth * 100.0
    );
    assert!(
        idle_after.1 <= idle_before.1,
        "descriptors leaked: {idle_before:?} -> {idle_after:?}"
    );
    assert!(
        idle_after.2 <= idle_before.2,
        "threads leaked: {idle_before:?} -> {idle_after:?}"
    );
    // Under load: at most the capped blocking pool on top (`lumen serve`
    // allows twice the cores, at least 4).
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    assert!(
        max_threads <= idle_before.2 + (2 * cores).max(4),
        "{max_threads} threads under load, {} idle",
        idle_before.2
    );

    // /metrics agrees with the client: every answer the client read (the
    // warm-up's too) was counted, and the server counted at most the
    // abandoned ones on top.
    let mut read = tally.answers.clone();
    for (key, n) in warm_answers {
        *read.entry(key).or_default() += n;
    }
    for ((endpoint, status), n) in &read {
        let counted = metric_sum(
            &metrics,
            &format!("lumen_http_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}}"),
        );
        let slack = tally.abandoned.get(endpoint).copied().unwrap_or(0) as f64;
        assert!(
            counted >= *n as f64 && counted <= *n as f64 + slack,
            "{endpoint} {status}: the client read {n}, /metrics counts {counted}"
        );
    }
    let dropped = metric_sum(
        &metrics,
        "lumen_queue_dropped_total{reason=\"disconnected\"}",
    );
    let abandoned: u64 = tally.abandoned.values().sum();
    assert!(
        dropped <= abandoned as f64,
        "{dropped} dropped, {abandoned} abandoned"
    );
    assert_eq!(metric_sum(&metrics, "lumen_queue_depth"), 0.0);
    assert_eq!(metric_sum(&metrics, "lumen_queue_in_flight"), 0.0);
}
