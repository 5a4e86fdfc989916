# The Weft sidecar proxy: one static binary (musl), CA certificates and a non-root user,
# FROM scratch. Built by deploy/images/build.sh, which prepares the context.
FROM scratch
ARG VERSION=dev
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="weft-proxy" \
      org.opencontainers.image.description="Weft service-mesh sidecar proxy (HTTP/1, HTTP/2, gRPC, mTLS, proxy-wasm filters)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Weft"
COPY etc/passwd etc/group /etc/
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --chown=65532:65532 state /var/lib/weft
COPY weft-proxy /usr/local/bin/weft-proxy
USER 65532:65532
WORKDIR /var/lib/weft
# The admin port answers /ready; mount the config at /etc/weft/proxy.yaml.
ENTRYPOINT ["/usr/local/bin/weft-proxy"]
CMD ["--config", "/etc/weft/proxy.yaml"]
