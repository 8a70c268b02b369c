# Stand-in for python:3.11-slim, from Debian's packages (no registry to pull from): Python 3.11 with
# `python`, `pip` and the right to pip-install into the system, as in the official image; no compiler.
ARG BASE=iot-local/debian:bookworm
FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/lib/python3.11/EXTERNALLY-MANAGED \
    && ln -s /usr/bin/python3 /usr/local/bin/python \
    && ln -s /usr/bin/pip3 /usr/local/bin/pip
ENV LANG=C.UTF-8
CMD ["python3"]
