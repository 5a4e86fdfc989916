# `weft-proxy init` with iptables (nft backend) and the libraries it loads, FROM scratch: run
# once, as root with NET_ADMIN, in a pod's or container's network namespace before its app
# starts (what istio-init and linkerd-init do). Built by deploy/images/build.sh.
FROM scratch
ARG VERSION=dev
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="weft-init" \
      org.opencontainers.image.description="Weft sidecar traffic capture rules (weft-proxy init, iptables-nft)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Weft"
COPY init/ /
ENV XTABLES_LIBDIR=/usr/lib/xtables
ENTRYPOINT ["/usr/local/bin/weft-proxy", "init"]
