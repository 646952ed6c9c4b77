# syntax=docker/dockerfile:1
# lumen, CPU image. Multi-stage: cargo-chef caches the dependency build in its
# own layer, the runtime stage is debian-slim with the binary and a model folder.
#
#   docker build -t lumen .
#   docker run --rm -p 8080:8080 lumen                          # the shapes model baked in at /models
#   docker run --rm -p 8080:8080 -v /srv/lumen-model:/models:ro lumen   # a real model folder
#
# Build arguments:
#   MODELS_DIR  model folder (in the build context) baked in at /models; default models/shapes (the embedded one).
#               A folder mounted at /models at run time replaces it.

ARG RUST_VERSION=1.89
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN} AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin lumen \
    && install -m 0755 target/release/lumen /usr/local/bin/lumen

FROM debian:${DEBIAN}-slim AS runtime
ARG MODELS_DIR=models/shapes
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /home/lumen --create-home lumen
COPY --from=builder /usr/local/bin/lumen /usr/local/bin/lumen
COPY --chown=lumen:lumen ${MODELS_DIR} /models
USER 10001:10001
ENV LUMEN_MODELS=/models \
    LUMEN_HOST=0.0.0.0 \
    LUMEN_PORT=8080 \
    LUMEN_LOG_FORMAT=json
EXPOSE 8080
# The probe follows LUMEN_PORT, so a container run with another port stays healthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["sh", "-c", "curl -fsS \"http://127.0.0.1:${LUMEN_PORT:-8080}/health\""]
STOPSIGNAL SIGTERM
ENTRYPOINT ["lumen"]
CMD ["serve"]
