# The compose mesh's setup job (busybox sh, in the weft-demo image, as root): the control
# service's CA bundle and a join token per sidecar into the shared volume, the standard
# filters and the mesh config (examples/demo/mesh.yaml) into the control service.
set -eu
export WEFT_CONTROL=https://control:7070 WEFT_CONTROL_CA=/shared/bundle.pem
tries=0
until [ -s /control/ca/bundle.pem ]; do
  tries=$((tries + 1)); [ "$tries" -le 300 ] || { echo "setup: weft-control made no CA in 30 s" >&2; exit 1; }
  sleep 0.1
done
cp /control/ca/bundle.pem /shared/bundle.pem
tries=0
until weftctl module ls >/dev/null 2>&1; do
  tries=$((tries + 1)); [ "$tries" -le 300 ] || { weftctl module ls; exit 1; }
  sleep 0.1
done
for f in telemetry router fault ratelimit retry authz; do
  weftctl module push "/filters/weft_filter_$f.wasm" --name "$f"
done
weftctl apply -f /setup/mesh.yaml
weftctl identity token --service-account service1 > /shared/service1.token
weftctl identity token --service-account service2 > /shared/service2-a.token
weftctl identity token --service-account service2 > /shared/service2-b.token
chmod 0644 /shared/*
echo "setup: filters pushed, mesh config applied, join tokens written"
