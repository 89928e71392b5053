# One image, one entrypoint: dlqproc (default command `run`) under tini.
#
# BASE is a Debian-based CPython 3.11+ image with the venv module: the
# conventional python:3.11-slim, or where no registry is reachable the
# equivalent that deploy/base-image.sh makes from Debian's packages:
#
#   buildah bud --isolation chroot --build-arg BASE=localhost/dlqproc-base:bookworm -t dlqproc .
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dlqproc ./dlqproc
COPY schema ./schema
# Wheels of dlqproc and every dependency first (one without a wheel for this
# platform is built here, never in the final stage), then a venv installed
# from those wheels alone. The venv's own pip and setuptools go: nothing
# installs at run time.
RUN python3 -m venv /opt/dlqproc \
    && /opt/dlqproc/bin/pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels . \
    && /opt/dlqproc/bin/pip install --no-cache-dir --disable-pip-version-check \
        --no-index --find-links /wheels dlqproc \
    && /opt/dlqproc/bin/pip uninstall --yes --disable-pip-version-check pip setuptools

FROM ${BASE}
# tini as PID 1 forwards SIGTERM to dlqproc and reaps any orphan, so no zombie
# outlives a worker. The local base carries it; python:3.11-slim gets Debian's.
# hadolint ignore=DL3008
RUN command -v tini >/dev/null \
    || { apt-get update \
        && apt-get install -y --no-install-recommends tini \
        && rm -rf /var/lib/apt/lists/*; }
# A numeric uid, so Kubernetes' runAsNonRoot can check it.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin dlqproc
COPY --from=build /opt/dlqproc /opt/dlqproc
COPY conf /etc/dlqproc
# Bytecode was compiled at install: with a read-only root nothing writes
# __pycache__. The only writable path dlqproc needs is its temp dir (the
# workers' metrics files, see server.metricsDir), an emptyDir in deploy/k8s.
ENV PATH=/opt/dlqproc/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# Health, readiness and metrics (server.port).
EXPOSE 8080
ENTRYPOINT ["/usr/bin/tini", "--", "dlqproc"]
CMD ["--config", "/etc/dlqproc/default.yaml", "run"]
