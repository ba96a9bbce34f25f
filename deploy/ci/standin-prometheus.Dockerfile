# A stand-in for the official prom/prometheus image, for machines that can reach Debian's
# mirror but no image registry (deploy/ci/prepare-docker.sh builds it there and tags it with the
# official name): Debian's `prometheus` package (bookworm: 2.42, not the 3.x the compose stack
# pins), laid out as the official image is: /bin/prometheus (bookworm's /bin is /usr/bin) as
# the entrypoint, running as nobody (65534) in /prometheus, which nobody owns (so that a new
# volume mounted there is writable).
ARG BASE=imgserve-ci/debian:bookworm
FROM ${BASE}
# Whatever version bookworm's mirror has today (2.42 and its security updates).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && test -x /bin/prometheus \
 && install -d -o 65534 -g 65534 /prometheus
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
LABEL org.opencontainers.image.description="stand-in for prom/prometheus: Debian's prometheus package (deploy/ci/prepare-docker.sh)"
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
