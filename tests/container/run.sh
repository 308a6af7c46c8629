#!/usr/bin/env bash
# The container smoke test: the production images built and run with Podman and podman-compose on this machine
# (no Docker engine, no registry), the Compose path checked end to end. Needs root; run it after the README's test
# command (it uses .venv for the SDK and blip-serve). See tests/container/smoke.py for what it checks.
#
#   bash tests/container/run.sh [--keep-going-on-cleanup-errors] [--show-a846359-bug]
#
# Installs what it needs when missing: Debian's podman, runc and debootstrap, and podman-compose in a virtual
# environment of its own under the cache (~/.cache/blip-caption/container-test, or $BLIP_CONTAINER_TEST_CACHE),
# which also keeps the bookworm root file systems and the wheels between runs.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "$(id -u)" != 0 ]; then
  echo "tests/container/run.sh: needs root (Podman runs the containers as root here)" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  echo "tests/container/run.sh: no .venv: run the README's test command first" >&2
  exit 2
fi

missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  echo "+ apt-get install -y ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # With Recommends: netavark, aardvark-dns (container-name DNS), catatonit, buildah come with podman.
  apt-get install -y -qq podman runc debootstrap >/dev/null
fi

cache="${BLIP_CONTAINER_TEST_CACHE:-$HOME/.cache/blip-caption/container-test}"
tools="$cache/tools-podman-compose-1.6.0"
if [ ! -x "$tools/bin/podman-compose" ]; then
  echo "+ podman-compose==1.6.0 into $tools"
  rm -rf "$tools"
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q --disable-pip-version-check podman-compose==1.6.0
fi

export BLIP_CONTAINER_TEST_CACHE="$cache" PODMAN_COMPOSE="$tools/bin/podman-compose"
exec .venv/bin/python tests/container/smoke.py "$@"
