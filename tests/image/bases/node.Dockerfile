# Stand-in for node:20-slim, from Debian's packages: Node.js and npm.
ARG BASE=iot-local/debian:bookworm
FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends nodejs npm ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
ENV LANG=C.UTF-8
CMD ["node"]
