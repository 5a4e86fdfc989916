#!/usr/bin/env bash
# Abuse benchmark: Weft and nginx, as plain reverse proxies in front of the same origin, one
# worker each and the usual 1,024 open-file limit, under what a hostile client does:
#
#  0. silent: 800 connections that send nothing — memory per connection;
#  0. rapid reset: HTTP/2 streams opened and cancelled 5 ms later, in batches of 20, for
#     10 s — streams sent, connections the proxy cut, requests that reached the origin;
#  1. slowloris: 500 connections sending a request head a byte every 5 s — memory per
#     connection, and how long until the proxy closes them (70 s window);
#  3. churn (with 16,384 descriptors each): 5,000 connections each sending half a head, held
#     3 s, closed — resident memory before, while held, and 15 s after (what the allocator
#     gives back);
#  2. flood: 1,500 connections each sending half a head, held — the share of 50 ordinary
#     requests (a new connection each) that still get a 200 while they are held, and the
#     proxy's resident memory before, during and 15 s after.
#
#   bash benches/abuse/run.sh          (about 5 minutes; installs nginx with apt if missing)
#
# Everything listens on 127.0.0.1 only, ports 18280-18284 and 18291. Processes it starts are
# stopped by PID on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
WEFT_BIN=${WEFT_BIN:-$TARGET_DIR/release/weft-proxy}
log() { printf '[abuse] %s\n' "$*" >&2; }

SUDO=""
[[ $EUID -ne 0 ]] && SUDO=sudo
if ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]]; then
  log "installing nginx"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx-light >/dev/null 2>&1 ||
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx >/dev/null
fi
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
if [[ ${NO_BUILD:-0} != 1 ]]; then
  log "building weft-proxy (release)"
  (cd "$ROOT" && cargo build --release --quiet -p weft-proxy --bin weft-proxy)
fi

TMP=$(mktemp -d /tmp/weft-abuse.XXXXXX)
chmod 755 "$TMP"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 0.5
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

# The origin: a tiny HTTP server.
python3 -m http.server 18280 --bind 127.0.0.1 --directory "$TMP" >"$TMP/origin.log" 2>&1 &
PIDS+=($!)
echo ok >"$TMP/index.html"

cat >"$TMP/weft.yaml" <<YAML
admin: { address: "127.0.0.1:18291" }
listeners:
  - name: front
    address: 127.0.0.1:18281
    default_cluster: origin
  - name: front-h2
    address: 127.0.0.1:18283
    protocol: http2
    default_cluster: origin
clusters:
  - name: origin
    endpoints: [ { address: "127.0.0.1:18280" } ]
YAML
cat >"$TMP/nginx.conf" <<NGINX
worker_processes 1;
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  server {
    listen 127.0.0.1:18282;
    location / { proxy_pass http://127.0.0.1:18280; proxy_http_version 1.1; }
  }
  server {
    listen 127.0.0.1:18284 http2;
    location / { proxy_pass http://127.0.0.1:18280; proxy_http_version 1.1; }
  }
}
NGINX

# Both under the usual 1,024 open-file limit (soft and hard, so neither can raise it).
(ulimit -n 1024 && exec "$WEFT_BIN" --config "$TMP/weft.yaml" --workers 1) >"$TMP/weft.log" 2>&1 &
PIDS+=($!)
WEFT_PID=$!
(ulimit -n 1024 && exec "$NGINX_BIN" -c "$TMP/nginx.conf" -g 'daemon off;') >"$TMP/nginx.log" 2>&1 &
PIDS+=($!)
NGINX_PID=$!
sleep 1

python3 "$ROOT/benches/abuse/abuse.py" "$TMP/origin.log" \
  weft 18281 "$WEFT_PID" 18283 nginx 18282 "$NGINX_PID" 18284

# Churn: the same two, again, with room for 16,384 descriptors, so that a flood costs memory
# instead of being shed; is that memory given back once the flood is gone?
kill -TERM "$WEFT_PID" "$NGINX_PID"
wait "$WEFT_PID" "$NGINX_PID" 2>/dev/null || true
sed -i 's/worker_connections 1024/worker_connections 16384/' "$TMP/nginx.conf"
(ulimit -n 16384 && exec "$WEFT_BIN" --config "$TMP/weft.yaml" --workers 1) >>"$TMP/weft.log" 2>&1 &
PIDS+=($!)
WEFT_PID=$!
(ulimit -n 16384 && exec "$NGINX_BIN" -c "$TMP/nginx.conf" -g 'daemon off;') >>"$TMP/nginx.log" 2>&1 &
PIDS+=($!)
NGINX_PID=$!
sleep 1
ulimit -n 16384 2>/dev/null || true
python3 "$ROOT/benches/abuse/abuse.py" churn weft 18281 "$WEFT_PID" nginx 18282 "$NGINX_PID"
