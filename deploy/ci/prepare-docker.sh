#!/usr/bin/env bash
# Prepares what the container tests (tests/test_deploy_containers.py) need, on a machine of the
# CI's kind: Debian, root, no systemd, the package registries reachable but no image registry.
# `make test` runs it; it is safe to run again, and does only what is not done yet:
#
#  1. A Docker engine. One that answers `docker info` is used as it is (a developer's own).
#     Otherwise, as root with apt-get: Debian's docker.io is installed and dockerd started by
#     hand with overlay2 (there is no systemd to start it), logging to $DOCKERD_LOG.
#  2. The base images the project pulls: every python image the Dockerfile starts from, and the
#     Prometheus image of deploy/docker-compose.yml. Present ones are kept; missing ones are
#     pulled; when no registry answers, a stand-in is built and tagged with the official name:
#     a minimal bookworm from this machine's Debian mirror (debootstrap, docker import) with
#     Debian's python3 (standin-python.Dockerfile) or prometheus (standin-prometheus.Dockerfile).
#     The host's locally added CA certificates (/usr/local/share/ca-certificates) go into the
#     python stand-in, so that pip in the image builds trusts what the host trusts (an
#     intercepting proxy's CA, say). That is this machine's business, not the project's: the
#     project's Dockerfile knows nothing of it.
#
# It exits non-zero with a message when it cannot prepare something; the tests then skip with
# the reason, or fail under CI.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$ROOT/deploy/ci"
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/imgserve-dockerd.log}
MINBASE=imgserve-ci/debian:bookworm
SUITE=bookworm
LOCAL_CAS=/usr/local/share/ca-certificates

# Scratch space (a debootstrap tree, build contexts), removed however the script ends.
WORK=$(mktemp -d /var/tmp/imgserve-prepare-docker.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

say() { echo "prepare-docker: $*"; }
die() {
	echo "prepare-docker: $*" >&2
	exit 1
}

engine_answers() { timeout 20 docker info >/dev/null 2>&1; }

can_install() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }

apt_install() {
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 ||
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@" >/dev/null; } ||
		die "apt-get could not install $*"
}

start_engine() {
	if engine_answers; then
		say "a Docker engine answers: using it"
		return
	fi
	can_install || die "no Docker engine answers, and this script starts one only as root with" \
		"apt-get: start yours (docker info must answer)"
	if ! command -v dockerd >/dev/null; then
		say "installing Debian's docker.io"
		apt_install docker.io
	fi
	# The package's init script may have started one already.
	if ! engine_answers && ! pgrep -x dockerd >/dev/null; then
		say "starting dockerd --storage-driver=overlay2 (log: $DOCKERD_LOG)"
		setsid dockerd --storage-driver=overlay2 >>"$DOCKERD_LOG" 2>&1 </dev/null &
	fi
	for _ in $(seq 60); do
		engine_answers && return
		sleep 1
	done
	die "dockerd did not answer within a minute; its log, $DOCKERD_LOG, ends with:
$(tail -n 20 "$DOCKERD_LOG" 2>/dev/null)"
}

# The URI of this machine's Debian mirror, as its apt sources name it.
debian_mirror() {
	local uri
	# shellcheck disable=SC2016 # $(REPO_URI) is apt's placeholder, not the shell's
	local lookup=(apt-get indextargets --format '$(REPO_URI)' 'Origin: Debian' 'Identifier: Packages')
	uri=$("${lookup[@]}" 2>/dev/null | grep -v -- '-security' | head -n 1 || true)
	if [ -z "$uri" ]; then # no package lists yet
		apt-get update -qq >/dev/null 2>&1 || true
		uri=$("${lookup[@]}" 2>/dev/null | grep -v -- '-security' | head -n 1 || true)
	fi
	[ -n "$uri" ] || die "no Debian mirror in this machine's apt sources"
	echo "$uri"
}

# A minimal bookworm, imported from a debootstrap tree: the base of the stand-ins.
ensure_minbase() {
	docker image inspect "$MINBASE" >/dev/null 2>&1 && return
	can_install || die "building the stand-in base images needs root and apt-get (debootstrap)"
	command -v debootstrap >/dev/null || apt_install debootstrap
	local mirror rootfs="$WORK/rootfs"
	mirror=$(debian_mirror)
	say "debootstrap --variant=minbase $SUITE from $mirror"
	debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
		die "debootstrap failed; the end of its log:
$(tail -n 20 "$WORK/debootstrap.log")"
	# As Debian's own images do: packages installed in a build never start services.
	printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
	chmod 755 "$rootfs/usr/sbin/policy-rc.d"
	rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
	tar -C "$rootfs" -c . | docker import - "$MINBASE" >/dev/null
	rm -rf "$rootfs"
	say "imported $MINBASE"
}

build_standin() {
	local name=$1 dockerfile=$2 context="$WORK/context"
	ensure_minbase
	rm -rf "$context"
	mkdir -p "$context/ca-certificates"
	if [ -d "$LOCAL_CAS" ]; then
		cp -r "$LOCAL_CAS/." "$context/ca-certificates/"
	fi
	say "building a stand-in for $name ($(basename "$dockerfile"))"
	# The classic builder: these are one-stage builds, and it needs no buildx with any client.
	DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=$MINBASE" -f "$dockerfile" \
		-t "$name" "$context" >"$WORK/build.log" 2>&1 ||
		die "building the stand-in for $name failed:
$(tail -n 30 "$WORK/build.log")"
}

ensure_image() {
	local name=$1 standin=$2
	if docker image inspect "$name" >/dev/null 2>&1; then
		return
	fi
	if timeout 120 docker pull -q "$name" >/dev/null 2>&1; then
		say "pulled $name"
		return
	fi
	say "cannot pull $name (no registry answers)"
	build_standin "$name" "$standin"
}

start_engine
start=$SECONDS
mapfile -t pythons < <(sed -nE 's/^FROM (python:[^ ]+).*/\1/p' "$ROOT/Dockerfile" | sort -u)
prometheus=$(sed -nE 's/^ *image: *(prom\/prometheus:[^ ]+) *$/\1/p' "$ROOT/deploy/docker-compose.yml")
if [ "${#pythons[@]}" = 0 ] || [ -z "$prometheus" ]; then
	die "cannot find the python base (Dockerfile) or the Prometheus image (docker-compose.yml)"
fi
for image in "${pythons[@]}"; do
	ensure_image "$image" "$HERE/standin-python.Dockerfile"
done
ensure_image "$prometheus" "$HERE/standin-prometheus.Dockerfile"
say "ready: $(docker version --format 'engine {{.Server.Version}}'); base images" \
	"${pythons[*]} and $prometheus ($((SECONDS - start)) s for the images)"
