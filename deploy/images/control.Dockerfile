# The Weft control service and its CLI: static binaries (musl), CA certificates and a
# non-root user, FROM scratch. Built by deploy/images/build.sh, which prepares the context.
FROM scratch
ARG VERSION=dev
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="weft-control" \
      org.opencontainers.image.description="Weft control service (weft-control) and CLI (weftctl)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Weft"
COPY etc/passwd etc/group /etc/
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --chown=65532:65532 state /var/lib/weft
COPY weft-control weftctl /usr/local/bin/
USER 65532:65532
WORKDIR /var/lib/weft
EXPOSE 7070
ENTRYPOINT ["/usr/local/bin/weft-control"]
# Beyond loopback the control channel is TLS (`--tls-name` adds the names clients use).
CMD ["--data-dir", "/var/lib/weft", "--listen", "0.0.0.0:7070", "--tls"]
