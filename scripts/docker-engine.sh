#!/usr/bin/env bash
# A private Docker engine for building and running the images here: Debian's docker.io
# (Engine 20.10; installed with apt-get when missing and we are root) with its state under
# .data/docker, its socket at .data/docker/docker.sock, no iptables changes. Podman's crun
# fails on these machines' hybrid cgroups; dockerd works.
#
#   scripts/docker-engine.sh start    # install if missing, start, wait until it answers
#   scripts/docker-engine.sh status   # exit 0 when it answers
#   scripts/docker-engine.sh stop     # stop it; nothing is left running
#   scripts/docker-engine.sh base     # a local python3.11 bookworm base image (no registry
#                                     # here): debootstrap --variant=minbase + docker import
#
# Then: DOCKER_HOST=unix://$PWD/.data/docker/docker.sock /usr/bin/docker ...
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)/.data/docker"
sock="$root/docker.sock"
pidfile="$root/docker.pid"
docker_cli="/usr/bin/docker"  # the engine's own CLI (20.10: BuildKit built in)
base_image="airatings-base:bookworm-py311"
export DOCKER_HOST="unix://$sock"

answers() { [ -S "$sock" ] && "$docker_cli" version >/dev/null 2>&1; }

install() {
    if command -v dockerd >/dev/null 2>&1 && [ -x "$docker_cli" ]; then return; fi
    if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "error: no dockerd; install Debian's docker.io (sudo apt-get install docker.io)" >&2
        exit 2
    fi
    apt_install docker.io
}

apt_install() {  # the package lists may be missing on a fresh machine: update once if so
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 || {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    }
}

case "${1:-status}" in
start)
    if answers; then echo "docker engine: running ($sock)"; exit 0; fi
    install
    mkdir -p "$root/data" "$root/exec"
    nohup dockerd --data-root "$root/data" --exec-root "$root/exec" -H "unix://$sock" \
        --pidfile "$pidfile" --iptables=false >"$root/dockerd.log" 2>&1 &
    for _ in $(seq 1 60); do
        if answers; then echo "docker engine: started ($sock)"; exit 0; fi
        sleep 1
    done
    echo "error: dockerd did not answer within 60 s; see $root/dockerd.log" >&2
    exit 75
    ;;
status)
    if answers; then echo "docker engine: running ($sock)"; exit 0; fi
    echo "docker engine: not running (scripts/docker-engine.sh start)"
    exit 1
    ;;
stop)
    pid="$(cat "$pidfile" 2>/dev/null || true)"  # dockerd removes its pidfile as it exits
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
    fi
    echo "docker engine: stopped"
    ;;
base)
    answers || { echo "error: start the engine first (scripts/docker-engine.sh start)" >&2; exit 2; }
    if "$docker_cli" image inspect "$base_image" >/dev/null 2>&1; then
        echo "$base_image: present"; exit 0
    fi
    if ! command -v debootstrap >/dev/null 2>&1; then
        [ "$(id -u)" = "0" ] || { echo "error: debootstrap missing (sudo apt-get install debootstrap)" >&2; exit 2; }
        apt_install debootstrap
    fi
    tmp="$(mktemp -d "$root/rootfs.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$tmp" http://deb.debian.org/debian >"$root/debootstrap.log" 2>&1
    tar -C "$tmp" -c . | "$docker_cli" import - "$base_image" >/dev/null
    echo "$base_image: imported"
    ;;
*)
    echo "usage: $0 start|status|stop|base" >&2
    exit 2
    ;;
esac
