# One image for the whole platform; the console script chosen at run time picks the service:
#   iot-api, iot-ingest, iot-realtime, iot-migrate (and iot-sim, the device simulator).
# One image keeps the three services on exactly the same locked dependencies and schema library.
# Build from the repository root:  docker build -t iot-platform .

FROM node:20-slim AS dashboard
WORKDIR /dashboard
COPY dashboard/package.json dashboard/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY dashboard/build.mjs ./
COPY dashboard/src src
RUN npm run build

FROM python:3.11-slim AS build
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=/app/.venv
RUN pip install --no-cache-dir uv
WORKDIR /src
# Third-party dependencies first: this layer is rebuilt only when uv.lock or a pyproject changes.
COPY pyproject.toml uv.lock ./
COPY libs/common/pyproject.toml libs/common/pyproject.toml
COPY services/api/pyproject.toml services/api/pyproject.toml
COPY services/ingest/pyproject.toml services/ingest/pyproject.toml
COPY services/realtime/pyproject.toml services/realtime/pyproject.toml
COPY tools/sim/pyproject.toml tools/sim/pyproject.toml
RUN uv sync --frozen --no-dev --no-install-workspace
# Then the platform's own packages, installed (not editable) into the same environment.
COPY libs libs
COPY services services
COPY tools tools
RUN uv sync --frozen --no-dev --no-editable

FROM python:3.11-slim AS runtime
RUN groupadd --system --gid 10001 iot && useradd --system --uid 10001 --gid iot --no-create-home iot
COPY --from=build /app/.venv /app/.venv
COPY --from=dashboard /dashboard/dist /app/dashboard
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1 IOT_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8000 8001 8002
CMD ["iot-api"]
