#!/usr/bin/env bash
# Start a multi-node Ray cluster on this machine: one head + N worker nodes.
#
#   cluster/local/start.sh [--workers N] [--head-cpus N] [--worker-cpus N[,N...]] [--object-store-mb MB]
#
# Each node is a separate `ray start` with its own CPU count, its own --temp-dir (Ray 2.60 allows a
# temp dir per node) and its own fixed ports; every worker node carries the custom resource
# {"worker_node": 1} so work can be pinned to it and scheduling across nodes is real. The dashboard (and
# so the job API) binds to 127.0.0.1 only, and token authentication is on (RAY_AUTH_MODE=token).
# Running it again while the cluster is up changes nothing, except that it restarts any worker node
# whose raylet has died (as an autoscaler would replace a failed node); it says which.
# Settings (ports, state dir) come from environment variables: see common.sh.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

workers="${RNB_WORKERS:-1}"
head_cpus="${RNB_HEAD_CPUS:-1}"
worker_cpus="${RNB_WORKER_CPUS:-1}"
object_store_mb="${RNB_OBJECT_STORE_MB:-256}"

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --workers) workers="${2:?}"; shift 2 ;;
        --head-cpus) head_cpus="${2:?}"; shift 2 ;;
        --worker-cpus) worker_cpus="${2:?}"; shift 2 ;;
        --object-store-mb) object_store_mb="${2:?}"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "error: unknown argument '$1'" >&2; usage ;;
    esac
done

is_count() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_count "$workers" || { echo "error: --workers '$workers' is not a whole number" >&2; exit 2; }
is_count "$head_cpus" || { echo "error: --head-cpus '$head_cpus' is not a whole number" >&2; exit 2; }
is_count "$object_store_mb" && (( object_store_mb >= 80 )) \
    || { echo "error: --object-store-mb '$object_store_mb' must be a whole number >= 80" >&2; exit 2; }
IFS=',' read -r -a cpu_list <<<"$worker_cpus"
for c in "${cpu_list[@]}"; do
    is_count "$c" || { echo "error: --worker-cpus '$worker_cpus' must be N or N,N,..." >&2; exit 2; }
done
cpus_of_worker() {  # the i-th entry of --worker-cpus, the last one repeating
    local i=$1
    (( i < ${#cpu_list[@]} )) || i=$(( ${#cpu_list[@]} - 1 ))
    echo "${cpu_list[$i]}"
}

gcs="127.0.0.1:$RNB_GCS_PORT"
dashboard="http://127.0.0.1:$RNB_DASHBOARD_PORT"

export RNB_LOCAL_CLUSTER="$RNB_CLUSTER_DIR"   # the marker stop.sh looks for (see common.sh)
export RAY_DISABLE_USAGE_STATS=1
# Job entrypoints say `python ...`: make that the interpreter the cluster itself runs on (the venv).
PATH="$(dirname "$RNB_RAY"):$PATH"
export PATH

node_ports() {  # node_ports INDEX -> the fixed per-node ports as ray start flags
    local b=$(( RNB_PORT_BASE + 10 * $1 )) w=$(( RNB_PORT_BASE + 100 * ($1 + 1) ))
    echo "--node-manager-port=$b --object-manager-port=$((b + 1))" \
         "--dashboard-agent-listen-port=$((b + 2)) --dashboard-agent-grpc-port=$((b + 3))" \
         "--metrics-export-port=$((b + 4)) --runtime-env-agent-port=$((b + 5))" \
         "--min-worker-port=$w --max-worker-port=$((w + 99))"
}
log="$RNB_CLUSTER_DIR/start.log"
fail() {
    echo "error: $1 (log: $log); stopping what was started" >&2
    tail -n 20 "$log" >&2 || true
    "$(dirname "${BASH_SOURCE[0]}")/stop.sh" >/dev/null 2>&1 || true
    exit 1
}

raylet_alive() {  # raylet_alive NODE -> 0 when the raylet of node NODE (head, w1, ...) runs
    local f cmd
    for f in /proc/[0-9]*/cmdline; do
        cmd=$(tr '\0' '\n' 2>/dev/null <"$f") || continue
        if [[ "${cmd%%$'\n'*}" == */raylet && "$cmd" == *"$RNB_CLUSTER_DIR/$1/"* ]]; then
            return 0
        fi
    done
    return 1
}
start_worker() {  # start_worker I
    local i=$1 b=$(( RNB_PORT_BASE + 10 * $1 )) p
    for _ in $(seq 1 20); do  # a killed node's agents may hold its ports for a moment
        busy=0
        for p in $(seq "$b" $(( b + 5 ))); do rnb_port_open "$p" && busy=1; done
        (( busy == 0 )) && break
        sleep 0.5
    done
    # shellcheck disable=SC2046  # node_ports emits separate flags on purpose; they hold only digits.
    "$RNB_RAY" start --address="$gcs" \
        --node-ip-address=127.0.0.1 \
        --num-cpus="$(cpus_of_worker $(( i - 1 )))" --resources="{\"worker_node\": 1, \"worker_node_$i\": 1}" \
        --object-store-memory=$(( object_store_mb * 1024 * 1024 )) \
        --temp-dir="$RNB_CLUSTER_DIR/w$i" --disable-usage-stats \
        $(node_ports "$i") >>"$log" 2>&1
}

# --- already running? ------------------------------------------------------------------------------
if [[ -f "$RNB_STATE_FILE" ]] && [[ -n "$(rnb_cluster_pids)" ]]; then
    if ! rnb_port_open "$RNB_GCS_PORT"; then
        echo "error: processes of the cluster in $RNB_CLUSTER_DIR are alive but its GCS port" \
             "$RNB_GCS_PORT does not answer; run cluster/local/stop.sh first" >&2
        exit 1
    fi
    # The cluster's own shape wins over this call's flags: re-read it from the state file.
    workers=$(grep '^RNB_WORKERS=' "$RNB_STATE_FILE" | cut -d= -f2)
    worker_cpus=$(grep '^RNB_WORKER_CPUS=' "$RNB_STATE_FILE" | cut -d= -f2)
    object_store_mb=$(grep '^RNB_OBJECT_STORE_MB=' "$RNB_STATE_FILE" | cut -d= -f2)
    IFS=',' read -r -a cpu_list <<<"$worker_cpus"
    restarted=()
    for (( i = 1; i <= workers; i++ )); do
        if ! raylet_alive "w$i"; then
            start_worker "$i" || { echo "error: could not restart worker node $i (log: $log)" >&2; exit 1; }
            restarted+=("w$i")
        fi
    done
    if (( ${#restarted[@]} )); then
        echo "rnb local cluster was running; restarted dead worker node(s): ${restarted[*]}"
    else
        echo "rnb local cluster already running (state: $RNB_STATE_FILE); nothing to do"
    fi
    echo "  RAY_ADDRESS=$gcs   dashboard/jobs: $dashboard"
    echo "  stop it with cluster/local/stop.sh (same RNB_CLUSTER_DIR)"
    exit 0
fi
for p in "$RNB_GCS_PORT" "$RNB_DASHBOARD_PORT" "$RNB_CLIENT_PORT"; do
    if rnb_port_open "$p"; then
        echo "error: port $p on 127.0.0.1 is already in use by another program (or another Ray);" \
             "choose free ports with RNB_GCS_PORT / RNB_DASHBOARD_PORT / RNB_CLIENT_PORT" >&2
        exit 1
    fi
done

# --- token -----------------------------------------------------------------------------------------
if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
    "$RNB_RAY" get-auth-token --generate >/dev/null
    chmod 600 "$HOME/.ray/auth_token"
fi
if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
    echo "error: RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty" >&2
    exit 1
fi

mkdir -p "$RNB_CLUSTER_DIR"
: >"$log"

# --- head ------------------------------------------------------------------------------------------
# shellcheck disable=SC2046  # node_ports emits separate flags on purpose; they hold only digits.
"$RNB_RAY" start --head \
    --node-ip-address=127.0.0.1 --port="$RNB_GCS_PORT" \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$RNB_DASHBOARD_PORT" \
    --ray-client-server-port="$RNB_CLIENT_PORT" \
    --num-cpus="$head_cpus" --resources='{"head_node": 1}' \
    --object-store-memory=$(( object_store_mb * 1024 * 1024 )) \
    --temp-dir="$RNB_CLUSTER_DIR/head" --disable-usage-stats \
    $(node_ports 0) >>"$log" 2>&1 || fail "the head node did not start"

# --- worker nodes ----------------------------------------------------------------------------------
for (( i = 1; i <= workers; i++ )); do
    start_worker "$i" || fail "worker node $i did not start"
done

# --- wait until every node is registered and the job API answers -----------------------------------
expected=$(( workers + 1 ))
for _ in $(seq 1 60); do
    alive=$("$RNB_RAY" list nodes --address="$gcs" --filter "state=ALIVE" --format=json 2>/dev/null \
            | grep -o '"node_id"' | wc -l || true)
    if [[ "$alive" == "$expected" ]] && rnb_port_open "$RNB_DASHBOARD_PORT"; then
        break
    fi
    sleep 1
done
[[ "${alive:-0}" == "$expected" ]] || fail "only ${alive:-0} of $expected nodes registered within 60 tries"

cat >"$RNB_STATE_FILE" <<EOF
# written by cluster/local/start.sh; read by stop.sh, status.sh and the tests
RNB_CLUSTER_DIR=$RNB_CLUSTER_DIR
RAY_ADDRESS=$gcs
RNB_DASHBOARD_URL=$dashboard
RNB_WORKERS=$workers
RNB_HEAD_CPUS=$head_cpus
RNB_WORKER_CPUS=$worker_cpus
RNB_PORT_BASE=$RNB_PORT_BASE
RNB_OBJECT_STORE_MB=$object_store_mb
EOF

echo "rnb local cluster up: head ($head_cpus CPU) + $workers worker node(s) (CPUs: $worker_cpus)"
echo "  export RAY_ADDRESS=$gcs RAY_AUTH_MODE=token"
echo "  ray job submit --address $dashboard --working-dir . -- python jobs/<job>.py ..."
echo "  state and logs: $RNB_CLUSTER_DIR   stop: cluster/local/stop.sh"
