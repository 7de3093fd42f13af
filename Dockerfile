# One image for every corral process: the supervisor and each agent differ
# only in the command compose gives them.
FROM python:3.11-slim

# LITELLM_LOCAL_MODEL_COST_MAP: use litellm's bundled model price map instead
# of fetching it from the internet at import time (slow, and fails offline).
# PYTHONUNBUFFERED: logs reach `docker logs` immediately, not on buffer flush.
ENV LITELLM_LOCAL_MODEL_COST_MAP=True \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Unprivileged user; nothing in the container needs root at runtime.
RUN groupadd --system corral \
    && useradd --system --gid corral --home-dir /app --no-create-home corral

WORKDIR /app

# The whole repo (filtered by .dockerignore) is copied, not just the packages:
# the image must carry examples/ so `-c examples/support/corral.yaml` works.
COPY . /app
RUN pip install --no-cache-dir /app \
    && chown -R corral:corral /app

USER corral

# compose.yaml supplies the real command per service.
CMD ["corral", "--help"]
