# One image for every plannersync process: workers, tools and the simulators.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends tzdata ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/plannersync plannersync \
    && mkdir -p /var/lib/plannersync /var/lib/plannersync-definitions /etc/plannersync/ca \
    && chown plannersync /var/lib/plannersync /var/lib/plannersync-definitions
# /var/lib/plannersync: the state directory (PLANNERSYNC_STATE_DIR; the compose volume "state").
# /var/lib/plannersync-definitions: where compose's broker-definitions service writes RabbitMQ's definitions.
WORKDIR /opt/plannersync
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY simulators ./simulators
COPY plannersync ./plannersync
RUN pip install '.[postgres,mssql]'
USER plannersync
WORKDIR /var/lib/plannersync
ENTRYPOINT ["plannersync"]
CMD ["--help"]
