#!/usr/bin/env bash
# Watch longhaul runs with a local Prometheus: link each run's prometheus_targets.json into targets/ and start
# Prometheus on this directory's config and rules (Ctrl-C stops it; the data stays in --storage.tsdb.path).
#
#   infra/prometheus/watch.sh runs/smoke [runs/other ...]     # then open http://127.0.0.1:9090 (or point Grafana at it)
#
# Environment: PROMETHEUS (binary, default `prometheus`), PROMETHEUS_LISTEN (default 127.0.0.1:9090),
# PROMETHEUS_DATA (default runs/prometheus). A run's targets file appears when its driver has started; linking it
# earlier is fine: Prometheus re-reads targets/ as files change.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
prometheus="${PROMETHEUS:-prometheus}"
listen="${PROMETHEUS_LISTEN:-127.0.0.1:9090}"
data="${PROMETHEUS_DATA:-runs/prometheus}"

[[ $# -ge 1 ]] || { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
command -v "$prometheus" >/dev/null || {
  echo "watch.sh: '$prometheus' not found: install Prometheus (Debian/Ubuntu: apt-get install prometheus)" >&2; exit 2; }

mkdir -p "$here/targets" "$data"
for run_dir in "$@"; do
  run_dir="$(cd "$run_dir" 2>/dev/null && pwd)" || { echo "watch.sh: no run directory '$run_dir'" >&2; exit 2; }
  ln -sfn "$run_dir/prometheus_targets.json" "$here/targets/$(basename "$run_dir").json"
  echo "watch.sh: scraping run $(basename "$run_dir") ($run_dir/prometheus_targets.json)"
done
echo "watch.sh: Prometheus on http://$listen, data in $data"
cd "$here"
exec "$prometheus" --config.file=prometheus.yml --web.listen-address="$listen" \
  --storage.tsdb.path="$(cd "$OLDPWD" && cd "$data" && pwd)"
