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

mapfile -t pids < <(rnb_cluster_pids)
if (( ${#pids[@]} == 0 )); then
    echo "rnb local cluster in $RNB_CLUSTER_DIR is not running"
else
    # SIGTERM first (raylets unregister, logs flush); the GCS and autoscaler monitor may ignore it, so
    # whatever is left after the grace period gets SIGKILL, as `ray stop` does after its own grace period.
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 1 $(( ${RNB_STOP_GRACE_S:-5} * 2 ))); do
        # Still-alive members of the original set (children lose their tree link once a parent dies).
        alive=()
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
        pids=("${alive[@]}")
        (( ${#pids[@]} == 0 )) && break
        sleep 0.5
    done
    if (( ${#pids[@]} > 0 )); then
        kill -KILL "${pids[@]}" 2>/dev/null || true
        sleep 0.5
    fi
    echo "rnb local cluster in $RNB_CLUSTER_DIR stopped"
fi
rm -f "$RNB_STATE_FILE"
if (( purge )); then
    rm -rf -- "$RNB_CLUSTER_DIR"
fi
