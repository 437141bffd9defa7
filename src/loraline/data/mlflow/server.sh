#!/usr/bin/env bash
# Start the MLflow tracking server (REST API + UI) in the foreground; `loraline services up` runs it.
#
# Inputs (environment variables; defaults in brackets):
#   MLFLOW_BACKEND_STORE_URI      required. Runs and registered models. `services up` passes
#                                 sqlite:///<home>/mlflow.db, the same file loraline writes without a
#                                 server, so runs made before and after `services up` are in one store.
#   MLFLOW_ARTIFACTS_DESTINATION  [./mlartifacts] where served artifacts (mlflow-artifacts:/...) are
#                                 stored; `services up` passes <home>/mlartifacts.
#   MLFLOW_HOST                   [127.0.0.1] interface to bind.
#   MLFLOW_PORT                   required. TCP port.
#   MLFLOW_WORKERS                [1] uvicorn worker processes (SQLite serialises writes anyway).
#   MLFLOW_ALLOWED_HOSTS          [127.0.0.1:PORT,localhost:PORT] Host headers accepted (DNS-rebinding
#                                 guard; mlflow's own default also admits every private IP).
#   MLFLOW_CORS_ALLOWED_ORIGINS   [http://127.0.0.1:PORT,http://localhost:PORT] origins allowed to make
#                                 state-changing cross-origin requests.
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION [false] mlflow's background job runner (GenAI scorers etc.);
#                                 loraline uses none, and it adds consumer processes.
#   MLFLOW_BIN                    [mlflow] the mlflow executable; `services up` passes the one beside
#                                 its Python.
#   Extra arguments are passed on to `mlflow server` unchanged.
#
# Production (any of these replace the embedded defaults; nothing here is loraline-specific):
#   - Postgres backend: MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db.internal:5432/mlflow
#     with the password in PGPASSWORD or ~/.pgpass (libpq reads both), never inside the URI: the URI
#     ends up in process listings and logs. Install psycopg2 beside mlflow.
#   - S3 artifacts: MLFLOW_ARTIFACTS_DESTINATION=s3://bucket/path with AWS_ACCESS_KEY_ID /
#     AWS_SECRET_ACCESS_KEY (or an instance role), AWS_DEFAULT_REGION, and MLFLOW_S3_ENDPOINT_URL for
#     S3-compatible stores. Clients then never need bucket credentials: the server proxies artifacts.
#   - Exposed beyond 127.0.0.1: MLFLOW_HOST=0.0.0.0, MLFLOW_ALLOWED_HOSTS=mlflow.example.com,
#     MLFLOW_CORS_ALLOWED_ORIGINS=https://mlflow.example.com, and authentication: pass
#     `--app-name basic-auth`, with the first admin's password in MLFLOW_AUTH_ADMIN_PASSWORD (read
#     once, when the user store is empty) and the auth store/permissions in the ini that
#     MLFLOW_AUTH_CONFIG_PATH names, and a random MLFLOW_FLASK_SERVER_SECRET_KEY (its CSRF key, required);
#     serve it behind a TLS-terminating proxy (basic auth sends the
#     password with every request). Use more MLFLOW_WORKERS with Postgres.
#
# This script never prints its inputs' secrets: the one line it prints shows URIs with any
# user:password@ part masked.
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. sqlite:////abs/path/mlflow.db}"
: "${MLFLOW_PORT:?set MLFLOW_PORT, e.g. 5000}"
MLFLOW_ARTIFACTS_DESTINATION="${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}"
MLFLOW_HOST="${MLFLOW_HOST:-127.0.0.1}"
MLFLOW_WORKERS="${MLFLOW_WORKERS:-1}"
MLFLOW_ALLOWED_HOSTS="${MLFLOW_ALLOWED_HOSTS:-127.0.0.1:${MLFLOW_PORT},localhost:${MLFLOW_PORT}}"
MLFLOW_CORS_ALLOWED_ORIGINS="${MLFLOW_CORS_ALLOWED_ORIGINS:-http://127.0.0.1:${MLFLOW_PORT},http://localhost:${MLFLOW_PORT}}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
MLFLOW_BIN="${MLFLOW_BIN:-mlflow}"

mask() { sed -E 's#(://)[^/@[:space:]]+@#\1***@#g' <<<"$1"; }
echo "mlflow server: backend $(mask "$MLFLOW_BACKEND_STORE_URI"), artifacts $(mask "$MLFLOW_ARTIFACTS_DESTINATION")," \
     "http://${MLFLOW_HOST}:${MLFLOW_PORT}, ${MLFLOW_WORKERS} worker(s)"

exec "$MLFLOW_BIN" server \
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --serve-artifacts \
    --host "$MLFLOW_HOST" \
    --port "$MLFLOW_PORT" \
    --workers "$MLFLOW_WORKERS" \
    --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" \
    --cors-allowed-origins "$MLFLOW_CORS_ALLOWED_ORIGINS" \
    "$@"
