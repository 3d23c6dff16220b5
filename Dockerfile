# The gateway image used by docker-compose.yml and deploy/kubernetes/:
# `docker build -t llm-failover-gateway .`
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY breakers ./breakers
# With the Redis client: replicas share provider state, limits and the cache through it
# (REDIS_URL); without REDIS_URL the gateway never uses it.
RUN pip install .[redis] && rm -rf /app/build

RUN useradd --system --uid 10001 --no-create-home gateway
USER gateway

ENV GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]

CMD ["python", "-m", "gateway"]
