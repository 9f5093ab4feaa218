# syntax=docker/dockerfile:1
# One image for every role of the driver: `lvm-iscsi-csi controller|node|agent|status`.
# The Debian packages come from deploy/packages.txt, the one list that the e2e image builder reads too.
# Both stages use the same base, pinned by tag: Python 3.11 on Debian 13 "trixie", the stable release with
# security support (Debian 12 "bookworm" left regular security support in June 2026). The runtime stage must
# match the build stage, or the virtual environment's interpreter breaks.
# A release pipeline pins it by digest as well: FROM python:3.11.17-slim-trixie@sha256:...

# --- build: the package and its Python dependencies in a virtual environment, from wheels only --------------
FROM python:3.11.17-slim-trixie AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY requirements.lock pyproject.toml ./
COPY csi ./csi
# Every dependency, and the build backend, at the version requirements.lock pins and with one of the sha256
# it lists (scripts/lock-requirements writes it): a file changed or substituted on the index fails the build.
# The package itself is then built from this context with that backend, offline.
RUN python -m venv /opt/lvm-iscsi-csi \
 && /opt/lvm-iscsi-csi/bin/pip install --require-hashes --only-binary=:all: -r requirements.lock \
 && /opt/lvm-iscsi-csi/bin/pip install --no-deps --no-build-isolation --no-index . \
 && /opt/lvm-iscsi-csi/bin/pip check \
 && /opt/lvm-iscsi-csi/bin/lvm-iscsi-csi --help >/dev/null

# --- runtime: the tools the driver runs, the virtual environment, nothing else ------------------------------
FROM python:3.11.17-slim-trixie
LABEL org.opencontainers.image.title="lvm-iscsi-csi" \
      org.opencontainers.image.description="CSI driver: LVM volumes exported over the Linux LIO iSCSI target"
# pipefail: a missing or unreadable list must fail the build, not install nothing.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY deploy/packages.txt /tmp/packages.txt
# open-iscsi is installed for iscsiadm only: iscsid runs on the host (the chart README says why). Its
# post-install script writes an initiator name into the image; every node must use its own, the host's.
RUN apt-get update \
 && sed -e 's/#.*//' /tmp/packages.txt | xargs apt-get install -y --no-install-recommends \
 && rm -f /etc/iscsi/initiatorname.iscsi \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /tmp/packages.txt
COPY --from=build /opt/lvm-iscsi-csi /opt/lvm-iscsi-csi
ENV PATH=/opt/lvm-iscsi-csi/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Unprivileged by default (the controller); the chart runs the node plugin and the agent as root, privileged.
RUN useradd --system --uid 65532 --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin lvm-iscsi-csi
USER 65532:65532
# Kubernetes probes the roles (livenessprobe sidecar, the agent's gRPC port); no Docker health check.
HEALTHCHECK NONE
ENTRYPOINT ["lvm-iscsi-csi"]
CMD ["--help"]
