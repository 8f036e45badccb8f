# geoloc: the HTTP service in a container. The image runs what CI runs: `pip install -e .`
# (plus extras) and `geoloc serve`.
#
#   docker build -t geoloc .                                  # CPU (CPU-only torch wheels)
#   docker build -t geoloc:gpu --build-arg VARIANT=gpu .       # CUDA torch + the `gpu` extra
#   docker build -t geoloc:geoclip --build-arg EXTRAS=geoclip \
#       --build-arg WEIGHTS=baked --build-arg BACKBONE_URL=https://.../ViT-L-14.pt \
#       --build-arg BACKBONE_SHA256=<sha256> .                # GeoCLIP with its backbone baked in
#
# The container waits for its database and migrates it (GEOLOC_MIGRATE_ON_START; replicas
# take a lock and migrate once), serves on :8000 as an unprivileged user, and on SIGTERM stops
# reporting ready and lets in-flight requests finish (GEOLOC_SHUTDOWN_GRACE_S).
# deploy/docker-compose.yml runs several replicas behind nginx; docs/OPERATIONS.md explains.

ARG PYTHON_VERSION=3.11
# none: the bundled bluemarble weights only; baked: BACKBONE_URL is downloaded into the image.
ARG WEIGHTS=none

# -- web page libraries: npm ci from the lockfile (what `make web` runs) ----------------------
FROM node:20-slim AS web
WORKDIR /web
COPY service/web/package.json service/web/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error

# -- build: a virtual environment with geoloc and its dependencies ---------------------------
FROM python:${PYTHON_VERSION}-slim AS builder
# cpu: torch from PyTorch's CPU wheel index (about 1 GB smaller); gpu: torch from PyPI (CUDA).
ARG VARIANT=cpu
# Where the cpu variant takes torch from: a mirror of that index where it is not reachable.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Extra pyproject extras, comma-separated (e.g. geoclip).
ARG EXTRAS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv
# torch first, in its own layer: it depends only on VARIANT, so a change to the sources does
# not download it again.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --upgrade pip \
    && case "$VARIANT" in \
         cpu) pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" \
                torch torchvision ;; \
         gpu) pip install --no-cache-dir torch torchvision ;; \
         *) echo "VARIANT must be cpu or gpu, not '$VARIANT'" >&2; exit 2 ;; \
       esac
WORKDIR /app
COPY . /app
RUN extras="$EXTRAS" \
    && if [ "$VARIANT" = gpu ]; then extras="gpu${EXTRAS:+,$EXTRAS}"; fi \
    && pip install --no-cache-dir -e ".${extras:+[$extras]}" \
    && geoloc profiles
# The page's static folder: the npm packages and the offline base map (as `make web`).
COPY --from=web /web/node_modules /app/service/web/node_modules
RUN python -m service.api.webpage build && rm -rf /app/service/web/node_modules

# -- model weights: nothing, or a checkpoint baked in (checked against its sha256) ------------
# One stage with a condition rather than a stage named by a build arg: buildah and podman
# (1.28 at least) do not resolve `FROM stage-${ARG}`.
FROM builder AS weights
ARG WEIGHTS
ARG BACKBONE_URL=""
ARG BACKBONE_SHA256=""
RUN mkdir -p /weights \
    && case "$WEIGHTS" in \
         none) ;; \
         baked) python /app/deploy/fetch_weights.py "$BACKBONE_URL" "$BACKBONE_SHA256" \
                  /weights/backbone.pt ;; \
         *) echo "WEIGHTS must be none or baked, not '$WEIGHTS'" >&2; exit 2 ;; \
       esac

# -- runtime: slim, unprivileged --------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GEOLOC_HOST=0.0.0.0 \
    GEOLOC_PORT=8000 \
    GEOLOC_DATA_DIR=/data \
    GEOLOC_MIGRATE_ON_START=true
RUN groupadd --system --gid 10001 geoloc \
    && useradd --system --uid 10001 --gid geoloc --home-dir /app --shell /usr/sbin/nologin geoloc \
    && mkdir -p /data \
    && chown geoloc:geoloc /data
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
COPY --from=weights /weights /opt/geoloc/weights
WORKDIR /app
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "/app/deploy/healthcheck.py"]
ENTRYPOINT ["geoloc"]
CMD ["serve"]
