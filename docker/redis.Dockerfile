# Redis from Debian's package, for engines that cannot pull the official image.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /data
CMD ["redis-server", "--appendonly", "yes", "--dir", "/data"]
