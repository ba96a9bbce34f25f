# A stand-in for the official python:3.11 slim bookworm image, for machines that can reach
# Debian's mirror but no image registry (deploy/ci/prepare-docker.sh builds it there and tags
# it with the official name). Debian's own Python 3.11 with what the official image offers the
# project's Dockerfile: `python` and `pip` on PATH, `python -m venv`, and pip allowed to install
# into the system Python (no EXTERNALLY-MANAGED marker). The build context's
# ca-certificates/ holds the host's locally added CAs (/usr/local/share/ca-certificates): on a
# network whose HTTPS passes an intercepting proxy, pip trusts it only through them.
ARG BASE=imgserve-ci/debian:bookworm
FROM ${BASE}
COPY ca-certificates/ /usr/local/share/ca-certificates/
# The stand-in takes whatever bookworm's mirror has today, as the official image does.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-pip python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && update-ca-certificates \
 && ln -s /usr/bin/python3 /usr/local/bin/python \
 && ln -s /usr/bin/pip3 /usr/local/bin/pip \
 && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED
ENV LANG=C.UTF-8
LABEL org.opencontainers.image.description="stand-in for python:3.11-slim-bookworm: Debian's python3 (deploy/ci/prepare-docker.sh)"
CMD ["python3"]
