#!/usr/bin/env bash
# The demo's sections on the compose mesh (deploy/compose/docker-compose.yml): brings it up
# afresh, then calls service1 from the host as a user would. Needs the images (bash
# deploy/images/build.sh), Docker Compose and curl. Leaves the mesh up; take it down with
#   docker-compose -f deploy/compose/docker-compose.yml down -v
set -euo pipefail
cd "$(dirname "$0")"
compose() { docker-compose -f docker-compose.yml "$@"; }
section() { printf '\n== %s\n' "$*"; }

for image in weft-proxy weft-control weft-init weft-demo; do
  docker image inspect "$image:dev" >/dev/null 2>&1 \
    || { echo "compose demo: no $image:dev image; build them with: bash deploy/images/build.sh" >&2; exit 1; }
done
# A fresh mesh: the demo kills one of its containers.
compose down -v --remove-orphans >/dev/null 2>&1 || true
compose up -d
app=$(compose port service1 8080) admin=$(compose port service1 15000)
echo "service1 (app port 8080) is on $app, its sidecar's admin on $admin"
echo -n "waiting for the mesh (filters compiled, identities issued, instances registered) "
for i in $(seq 1 240); do
  curl -fs "http://$app/" 2>/dev/null | grep -q '"service":"service2' \
    && [[ $(curl -s "http://$admin/clusters" | grep -c ':8080"') -ge 3 ]] && break
  (( i % 8 == 0 )) && echo -n "."
  sleep 0.25
done
echo
curl -fs "http://$app/" >/dev/null || { echo "compose demo: service1 does not answer; docker-compose logs:" >&2; compose logs --tail 20 >&2; exit 1; }

section "1. the host calls service1; its app calls http://service2:8080 and knows nothing of the mesh"
curl -s "http://$app/hello"
echo "(upstream.x-forwarded-proto https: the hop between the sidecars was mutual TLS)"

section "2. 400 calls: weights 1:3 give service2-a ~25%, service2-b ~75%"
for _ in $(seq 1 400); do curl -s "http://$app/"; done | grep -o '"service":"service2-[ab]"' | sort | uniq -c

section "3. faults injected by service1's chain (asked for with request headers)"
echo -n "abort 503: "; curl -s -o /dev/null -w '%{http_code}\n' -H 'x-weft-fault-abort: 503' "http://$app/"
echo -n "delay 300 ms: "; curl -s -o /dev/null -w '%{http_code} in %{time_total} s\n' -H 'x-weft-fault-delay-ms: 300' "http://$app/"

section "4. metrics of service1's sidecar: captured requests by cluster, protocols detected"
curl -s "http://$admin/stats/prometheus" | grep -E '^weft_(requests_total\{listener="outbound"|protocol_detections_total|downstream_tls)' || true

section "5. an access log line (telemetry filter, JSON, from service1's sidecar)"
compose logs --no-color service1 | grep -m1 -o '{"authority".*}' || true

section "6. service2-b's container is killed: every call still succeeds (retries, outlier ejection), then its registration expires"
compose kill service2-b >/dev/null 2>&1
for _ in $(seq 1 40); do curl -s -o /dev/null -w '%{http_code}\n' "http://$app/"; done | sort | uniq -c
sleep 4
echo "service1's sidecar now knows:"; curl -s "http://$admin/clusters" | grep -o '"address": "[^"]*:8080"' || true

section "7. graceful drain: service1's sidecar is stopped (SIGTERM), drains and exits 0"
compose stop -t 10 service1 >/dev/null 2>&1
docker inspect -f 'exit code {{.State.ExitCode}}' "$(compose ps -q service1)"
echo "done: docker-compose -f deploy/compose/docker-compose.yml down -v to remove it"
