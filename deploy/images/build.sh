#!/usr/bin/env bash
# Builds the Weft container images, FROM scratch, from static (musl) release binaries:
#   weft-proxy:<version>   the sidecar proxy
#   weft-control:<version> the control service and weftctl
# (each also tagged :dev). Needs Docker and a Rust toolchain; installs the musl target and
# musl-tools when missing. Prints each image's size.
#
#   bash deploy/images/build.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
target=x86_64-unknown-linux-musl

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
  rustup target add "$target" >/dev/null 2>&1 \
    || { [[ -x ../shared/toolchain/add-target.sh ]] && bash ../shared/toolchain/add-target.sh "$target"; } \
    || { echo "images: cannot install the $target target" >&2; exit 1; }
fi
# ring and jemalloc compile C for the target.
if ! command -v musl-gcc >/dev/null; then
  if [[ $(id -u) == 0 ]]; then
    apt-get install -y musl-tools >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y musl-tools >/dev/null; }
  else
    echo "images: needs musl-gcc (apt-get install musl-tools)" >&2; exit 1
  fi
fi
command -v docker >/dev/null || { echo "images: needs docker" >&2; exit 1; }

cargo build --locked --profile image --target "$target" \
  -p weft-proxy -p weft-control --bin weft-proxy --bin weft-control --bin weftctl
bin="target/$target/image"

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/etc" "$ctx/state"
printf 'root:x:0:0:root:/:/sbin/nologin\nweft:x:65532:65532:weft:/var/lib/weft:/sbin/nologin\n' > "$ctx/etc/passwd"
printf 'root:x:0:\nweft:x:65532:\n' > "$ctx/etc/group"
cp /etc/ssl/certs/ca-certificates.crt "$ctx/" 2>/dev/null \
  || { echo "images: needs /etc/ssl/certs/ca-certificates.crt (apt-get install ca-certificates)" >&2; exit 1; }
cp "$bin/weft-proxy" "$bin/weft-control" "$bin/weftctl" "$ctx/"

for image in proxy control; do
  docker build --quiet -f "deploy/images/$image.Dockerfile" \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" --build-arg CREATED="$created" \
    -t "weft-$image:$version" -t "weft-$image:dev" "$ctx" >/dev/null
  size=$(docker image inspect -f '{{.Size}}' "weft-$image:dev")
  echo "weft-$image:$version $((size / 1024)) KiB"
done
