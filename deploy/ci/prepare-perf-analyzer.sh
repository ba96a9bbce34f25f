#!/usr/bin/env bash
# Prepares Triton's perf_analyzer (the load generator Triton users benchmark with) in DIR
# (default .venv/perf-analyzer) and writes DIR/perf_analyzer, a wrapper that runs it.
#
# PyPI's perf-analyzer wheel for manylinux_2_38 carries the binary, built against glibc 2.38
# and a newer libstdc++ than Debian bookworm has. The wrapper runs it under Debian trixie's
# dynamic loader, libc6, libstdc++6 and libgcc-s1, unpacked into DIR with dpkg-deb from
# packages fetched by apt-get download with a private sources list and state (the system's own
# libc and apt state are untouched). Needs Debian's apt-get and dpkg-deb, pip, and the package
# registries; exits non-zero, saying why, when it cannot (the perf_analyzer tests then skip).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${1:-$ROOT/.venv/perf-analyzer}
PIP=${PIP:-$ROOT/.venv/bin/pip}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
VERSION=2.60.0
SUITE=trixie

if [ -x "$DIR/perf_analyzer" ] && "$DIR/perf_analyzer" --version >/dev/null 2>&1; then
    exit 0
fi
for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "perf_analyzer: no $tool (Debian's)" >&2; exit 1; }
done
# The machine's own Debian mirror: the first active `deb URI` or `URIs: URI` ending in /debian.
mirror=$({ cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } | sed -nE 's#^(URIs:|deb( \[[^]]*\])?)[[:space:]]+(https?://[^ ]+/debian)/?([[:space:]].*)?$#\3#p' \
    | awk 'NR == 1')
[ -n "$mirror" ] || { echo "perf_analyzer: no Debian mirror in the apt sources" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$DIR"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror%/} $SUITE main" \
    >"$work/sources.list"
touch "$work/status"
apt=(apt-get -q -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
    -o "Dir::State::status=$work/status" -o APT::Sandbox::User=root)
"${apt[@]}" update >/dev/null
(cd "$work" && "${apt[@]}" download libc6 libstdc++6 libgcc-s1 >/dev/null)
rm -rf "$DIR/root"
for deb in "$work"/*.deb; do
    dpkg-deb -x "$deb" "$DIR/root"
done

"$PIP" download --quiet --no-deps --only-binary=:all: --platform manylinux_2_38_x86_64 \
    "perf-analyzer==$VERSION" -d "$work/wheel"
"$PYTHON" -m zipfile -e "$work"/wheel/perf_analyzer-*.whl "$work/unpacked"
install -m 0755 "$work/unpacked/perf_analyzer/bin/perf_analyzer" "$DIR/perf_analyzer.bin"

cat >"$DIR/perf_analyzer" <<'WRAPPER'
#!/bin/sh
# perf_analyzer under Debian trixie's loader and libraries (deploy/ci/prepare-perf-analyzer.sh).
here=$(cd "$(dirname "$0")" && pwd)
libs=$here/root/usr/lib/x86_64-linux-gnu
exec "$libs/ld-linux-x86-64.so.2" --library-path "$libs:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" \
    "$here/perf_analyzer.bin" "$@"
WRAPPER
chmod 0755 "$DIR/perf_analyzer"
"$DIR/perf_analyzer" --version
