#!/usr/bin/env bash
# Stop the local cluster started by start.sh with the same RNB_CLUSTER_DIR — and nothing else.
#
#   cluster/local/stop.sh [--purge]      (--purge also deletes RNB_CLUSTER_DIR: logs and temp dirs)
#   RNB_STOP_GRACE_S (default 5): seconds between SIGTERM and SIGKILL
#
# `ray stop` would kill every Ray process of this user on the machine (other clusters, ray.init
# sessions); this script signals only processes that carry this cluster's marker (see common.sh).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

purge=0
case "${1:-}" in
    --purge) purge=1 ;;
    "") ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac

still_running() {  # a PID that exists and is not a zombie (zombies are dead, just not reaped yet)
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat="${stat##*) }"
    [[ "${stat%% *}" != "Z" ]]
}
wait_gone() {  # wait_gone TRIES: poll every 0.5 s until no PID of the original set still runs
    local alive p
    for _ in $(seq 1 "$1"); do
        # Re-check the original set: children lose their tree link once their parent has died.
        alive=()
        for p in "${pids[@]}"; do still_running "$p" && alive+=("$p"); done
        pids=("${alive[@]}")
        (( ${#pids[@]} == 0 )) && return 0
        sleep 0.5
    done
}

mapfile -t pids < <(rnb_cluster_pids)
if (( ${#pids[@]} == 0 )); then
    echo "rnb local cluster in $RNB_CLUSTER_DIR is not running"
else
    # SIGTERM first (raylets unregister, logs flush); the GCS and autoscaler monitor may ignore it, so
    # whatever is left after the grace period gets SIGKILL, as `ray stop` does after its own grace period.
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait_gone $(( ${RNB_STOP_GRACE_S:-5} * 2 ))
    if (( ${#pids[@]} > 0 )); then
        kill -KILL "${pids[@]}" 2>/dev/null || true
        wait_gone 20
    fi
    echo "rnb local cluster in $RNB_CLUSTER_DIR stopped"
fi
rm -f "$RNB_STATE_FILE"
if (( purge )); then
    rm -rf -- "$RNB_CLUSTER_DIR"
fi
