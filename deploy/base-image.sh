#!/usr/bin/env bash
# Makes a local stand-in for python:3.11-slim from Debian's own packages, for
# machines that reach Debian's archive but no container registry:
#
#   deploy/base-image.sh [TAG]          # default localhost/dlqproc-base:bookworm
#   buildah bud --isolation chroot --build-arg BASE=localhost/dlqproc-base:bookworm -t dlqproc .
#
# Like python:3.11-slim it is Debian bookworm with CPython 3.11 (here Debian's
# python3, with its venv module) and CA certificates; it also carries tini, the
# image's init, so the Dockerfile needs nothing from apt. Needs root, buildah
# and debootstrap (apt-get install buildah debootstrap). MIRROR overrides
# debootstrap's default Debian mirror.
set -euo pipefail
tag=${1:-localhost/dlqproc-base:bookworm}
suite=${SUITE:-bookworm}
ctr=$(buildah from scratch)
trap 'buildah umount "$ctr" >/dev/null 2>&1 || true; buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
root=$(buildah mount "$ctr")
# shellcheck disable=SC2086 # MIRROR is one optional word
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,tini \
    "$suite" "$root" ${MIRROR:-}
# What a slim image leaves out: caches, package lists, documentation.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/* "$root"/var/log/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/*
find "$root"/usr/lib/python3* -name __pycache__ -prune -exec rm -rf {} +
buildah umount "$ctr" >/dev/null
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 "$ctr"
buildah commit --rm -q "$ctr" "$tag" >/dev/null
trap - EXIT
echo "$tag"
