#!/usr/bin/env bash
# Show the local cluster started by start.sh (same RNB_CLUSTER_DIR): addresses and `ray status`.
# Exit code 0 when it runs, 1 when it does not.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ ! -f "$RNB_STATE_FILE" ]] || [[ -z "$(rnb_cluster_pids)" ]]; then
    echo "rnb local cluster in $RNB_CLUSTER_DIR is not running"
    exit 1
fi
grep -v '^#' "$RNB_STATE_FILE"
"$RNB_RAY" status --address="127.0.0.1:$RNB_GCS_PORT"
