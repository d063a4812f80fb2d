# marketflow: the daemon, and (same image) the exchange simulators used by docker-compose.yml.
#
#   docker build -t marketflow .
#   docker run --rm -e MARKETFLOW_HTTP__CONTROL_TOKEN="$(openssl rand -hex 32)" \
#       -p 127.0.0.1:8080:8080 marketflow
#
# Two stages: build a wheel with the build tools, install it into a clean slim image.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY marketflow ./marketflow
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    # Inside a container the API must listen on all interfaces to be reachable through the
    # published port; compose publishes it on the host's loopback only. Beyond loopback the
    # daemon refuses to start without MARKETFLOW_HTTP__CONTROL_TOKEN (it guards POST /mode/*).
    MARKETFLOW_HTTP__HOST=0.0.0.0 \
    MARKETFLOW_EMBEDDED__DATA_DIR=/var/lib/marketflow
RUN groupadd --system marketflow \
    && useradd --system --gid marketflow --home-dir /var/lib/marketflow --shell /usr/sbin/nologin marketflow \
    && install -d -o marketflow -g marketflow -m 0750 /var/lib/marketflow \
    && install -d -m 0755 /etc/marketflow
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config.toml /etc/marketflow/config.toml
WORKDIR /var/lib/marketflow
USER marketflow
VOLUME ["/var/lib/marketflow"]
EXPOSE 8080
# The daemon stops cleanly on SIGTERM (drains queues, flushes the partial minute).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status != 200)"]
CMD ["python", "-m", "marketflow", "--config", "/etc/marketflow/config.toml"]
