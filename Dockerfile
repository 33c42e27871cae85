# syntax=docker/dockerfile:1
# The auditrelay image: the sidecar (`auditrelay serve`, the entrypoint) and the Fluent Bit plugin
# at /opt/auditrelay/out_auditrelay.so, which the Helm chart's init container copies into the
# official Fluent Bit image's pod. The plugin is built on Debian 12 (glibc 2.36), so it loads into
# the Fluent Bit images built on Debian 12 or newer (docs/plugin.md).

# 1. The plugin: cgo, so it links against the builder's glibc.
FROM golang:1.26-bookworm AS plugin
WORKDIR /src
COPY Makefile ./
COPY fluent-bit/ fluent-bit/
RUN make plugin

# 2. The Python package as a wheel (the bundled audit policy is copied into it).
FROM python:3.11-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md audit_policy.yaml ./
COPY sidecar/ sidecar/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# 3. The runtime: the package and its dependencies, the plugin, a non-root user, and the programs
# the chart's containers run besides `auditrelay`: cp and install (coreutils) in the plugin and
# state init containers, nsenter (util-linux) in the k3s/RKE2 audit-setup Job, which restarts the
# server through the host's systemd. Debian's base has both; they are named here so that stays
# true (tests/helm/test_chart_image_programs.py checks the chart against this list).
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install --yes --no-install-recommends coreutils util-linux \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir /wheels/*.whl \
 && groupadd --gid 10001 auditrelay \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin auditrelay
COPY --from=plugin /src/fluent-bit/out_auditrelay.so /opt/auditrelay/out_auditrelay.so
USER 10001:10001
EXPOSE 2021
ENTRYPOINT ["auditrelay"]
CMD ["serve"]
