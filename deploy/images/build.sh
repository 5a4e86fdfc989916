#!/usr/bin/env bash
# Builds the Weft container images, FROM scratch, from static (musl) release binaries:
#   weft-proxy:<version>   the sidecar proxy
#   weft-control:<version> the control service and weftctl
#   weft-init:<version>    `weft-proxy init` with iptables (nft backend): the capture rules,
#                          run once in a pod's or container's network namespace
#   weft-demo:<version>    the demo's service, weftctl, the standard filters and a busybox
#                          shell: the compose mesh's apps and its setup job (deploy/compose)
# (each also tagged :dev). Needs Docker and a Rust toolchain; installs the musl and wasm32
# targets, musl-tools and iptables when missing, and unpacks busybox-static's package.
# Prints each image's size.
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
rustup target add wasm32-wasip1 >/dev/null 2>&1 || rustup target add wasm32-wasip1
# ring and jemalloc compile C for the target; the init image takes the host's iptables (nft
# backend) with the libraries it loads, the demo image busybox's static shell.
need=()
command -v musl-gcc >/dev/null || need+=(musl-tools)
[[ -x /usr/sbin/xtables-nft-multi ]] || need+=(iptables)
if (( ${#need[@]} )); then
  if [[ $(id -u) == 0 ]]; then
    apt-get install -y "${need[@]}" >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y "${need[@]}" >/dev/null; }
  else
    echo "images: needs ${need[*]} (apt-get install ${need[*]})" >&2; exit 1
  fi
fi
command -v docker >/dev/null || { echo "images: needs docker" >&2; exit 1; }

cargo build --locked --profile image --target "$target" \
  -p weft-proxy -p weft-control -p demo-service --bin weft-proxy --bin weft-control --bin weftctl --bin demo-service
cargo build --locked --profile filter --target wasm32-wasip1 -p weft-filter-router \
  -p weft-filter-retry -p weft-filter-fault -p weft-filter-telemetry -p weft-filter-ratelimit -p weft-filter-authz
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

# weft-init: the proxy binary (its `init` command) and iptables-nft with what it loads.
init="$ctx/init"
mkdir -p "$init/usr/local/bin" "$init/usr/sbin" "$init/run" "$init/etc"
cp "$bin/weft-proxy" "$init/usr/local/bin/"
for name in iptables-nft iptables-nft-restore iptables-nft-save ip6tables-nft ip6tables-nft-restore ip6tables-nft-save; do
  cp /usr/sbin/xtables-nft-multi "$init/usr/sbin/$name"   # it dispatches on its name
done
for lib in $(ldd /usr/sbin/xtables-nft-multi | grep -o '/[^ ]*'); do
  cp -L --parents "$lib" "$init/"
done
# Its extensions (REDIRECT, owner, tcp, ...), where the image's XTABLES_LIBDIR says.
xt=$(readlink -f "$(dirname "$(ldd /usr/sbin/xtables-nft-multi | grep -o '/[^ ]*libxtables[^ ]*')")/xtables")
mkdir -p "$init/usr/lib/xtables" && cp "$xt"/*.so "$init/usr/lib/xtables/"
cp /etc/protocols "$init/etc/" 2>/dev/null || printf 'tcp 6 TCP\nudp 17 UDP\n' > "$init/etc/protocols"

# weft-demo: the demo service, weftctl, the standard filters, a shell.
demo="$ctx/demo"
mkdir -p "$demo/usr/local/bin" "$demo/bin" "$demo/filters" "$demo/etc/ssl/certs"
cp "$bin/demo-service" "$bin/weftctl" "$demo/usr/local/bin/"
# busybox-static's binary, from its Debian package (unpacked here, not installed).
(cd "$ctx" && { apt-get download busybox-static >/dev/null 2>&1 \
  || { apt-get update >/dev/null && apt-get download busybox-static >/dev/null; }; }) \
  || { echo "images: cannot download busybox-static" >&2; exit 1; }
dpkg-deb -x "$ctx"/busybox-static_*.deb "$ctx/busybox"
cp "$ctx/busybox/bin/busybox" "$demo/bin/busybox" && cp "$ctx/busybox/bin/busybox" "$demo/bin/sh"
cp target/wasm32-wasip1/filter/weft_filter_*.wasm "$demo/filters/"
cp "$ctx/ca-certificates.crt" "$demo/etc/ssl/certs/"
printf 'root:x:0:0:root:/:/bin/sh\napp:x:1000:1000:app:/:/sbin/nologin\n' > "$demo/etc/passwd"
printf 'root:x:0:\napp:x:1000:\n' > "$demo/etc/group"

for image in proxy control init demo; do
  docker build --quiet -f "deploy/images/$image.Dockerfile" \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" --build-arg CREATED="$created" \
    -t "weft-$image:$version" -t "weft-$image:dev" "$ctx" >/dev/null
  size=$(docker image inspect -f '{{.Size}}' "weft-$image:dev")
  echo "weft-$image:$version $((size / 1024)) KiB"
done
