# MLflow tracking server with the PostgreSQL driver (compose.yaml's `mlflow` service).
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1

RUN pip install "mlflow==${MLFLOW_VERSION}" psycopg2-binary

EXPOSE 5000
CMD ["mlflow", "server", "--help"]
