#!/usr/bin/env bash
# Create the Secrets the reidfleet manifests read (random values; run once per cluster, before
# `kubectl apply -k deploy/k8s`). Prints the dashboard passwords once; they are not stored anywhere else.
#   ./make-secrets.sh              # create them in namespace reidfleet (kubectl's current context)
#   ./make-secrets.sh --dry-run    # print the Secret manifests instead (no cluster needed)
set -euo pipefail
ns="${REIDFLEET_NAMESPACE:-reidfleet}"
dry=""
[ "${1:-}" = "--dry-run" ] && dry="--dry-run=client"
rand() { python3 -c "import secrets; print(secrets.token_urlsafe(24))"; }
admin="$(rand)"
manager="$(rand)"
apply() {
  if [ -n "$dry" ]; then kubectl create secret generic "$@" -n "$ns" $dry -o yaml; echo "---"
  else kubectl create secret generic "$@" -n "$ns"; fi
}
[ -n "$dry" ] || kubectl get namespace "$ns" >/dev/null 2>&1 || kubectl create namespace "$ns"
apply reidfleet-postgres --from-literal=password="$(rand)"
apply reidfleet-qdrant --from-literal=api-key="$(rand)"
apply reidfleet-dashboard --from-literal=admin-password="$admin" --from-literal=manager-password="$manager"
if [ -z "$dry" ]; then
  echo "dashboard logins: admin / $admin    manager / $manager" >&2
fi
