# The demo's app image, FROM scratch: demo-service (an HTTP service that may call another),
# weftctl, the standard filters (/filters) and a busybox shell, for the compose mesh's apps and
# its setup job (deploy/compose). Runs as uid 1000: not the proxy's user, so its traffic is
# captured. Built by deploy/images/build.sh.
FROM scratch
ARG VERSION=dev
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="weft-demo" \
      org.opencontainers.image.description="Weft demo service, weftctl and the standard filters" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Weft"
COPY demo/ /
ENV PATH=/usr/local/bin:/bin
USER 1000:1000
ENTRYPOINT ["/usr/local/bin/demo-service"]
