# Shared settings for the local multi-node cluster scripts (sourced by start.sh, stop.sh, status.sh).
#
# Every setting is an environment variable so tests and users can run several clusters side by side:
#   RNB_CLUSTER_DIR      state + per-node temp dirs (default /tmp/rnb-cluster; keep it short: Ray puts
#                        unix sockets under it and socket paths are limited to ~107 characters)
#   RNB_GCS_PORT         head GCS port                 (default 6379)
#   RNB_DASHBOARD_PORT   dashboard / job API port      (default 8265, bound to 127.0.0.1 only)
#   RNB_CLIENT_PORT      Ray Client server port        (default 10001)
#   RNB_PORT_BASE        first of the per-node ports   (default 20000; node i uses BASE+10*i .. +5
#                        and worker ports BASE+100*(i+1) .. +99)
#   RNB_RAY              the `ray` executable           (default: `ray` on PATH, else ../../.venv/bin/ray)
# shellcheck shell=bash

RNB_CLUSTER_DIR="${RNB_CLUSTER_DIR:-/tmp/rnb-cluster}"
RNB_GCS_PORT="${RNB_GCS_PORT:-6379}"
RNB_DASHBOARD_PORT="${RNB_DASHBOARD_PORT:-8265}"
RNB_CLIENT_PORT="${RNB_CLIENT_PORT:-10001}"
RNB_PORT_BASE="${RNB_PORT_BASE:-20000}"

_rnb_repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -z "${RNB_RAY:-}" ]]; then
    if command -v ray >/dev/null 2>&1; then
        RNB_RAY="$(command -v ray)"
    elif [[ -x "$_rnb_repo_root/.venv/bin/ray" ]]; then
        RNB_RAY="$_rnb_repo_root/.venv/bin/ray"
    else
        echo "error: no \`ray\` executable found; activate the rnb-ray environment or set RNB_RAY" >&2
        exit 1
    fi
fi

# Strip a trailing slash so the process marker below matches exactly.
RNB_CLUSTER_DIR="${RNB_CLUSTER_DIR%/}"
RNB_STATE_FILE="$RNB_CLUSTER_DIR/cluster.env"
# Every process of this cluster (nodes, workers, job drivers) inherits this variable; stop.sh finds
# them by it, so it never touches another Ray on the same machine (unlike `ray stop`, which kills all).
RNB_MARK="RNB_LOCAL_CLUSTER=$RNB_CLUSTER_DIR"

# Token authentication stays on: nodes and clients run with RAY_AUTH_MODE=token. The token comes from
# RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (Ray's own lookup order).
export RAY_AUTH_MODE=token

for _v in RNB_GCS_PORT RNB_DASHBOARD_PORT RNB_CLIENT_PORT RNB_PORT_BASE; do
    if ! [[ "${!_v}" =~ ^[0-9]+$ ]] || (( ${!_v} < 1024 || ${!_v} > 65000 )); then
        echo "error: $_v=${!_v} is not a port number in 1024..65000" >&2
        exit 1
    fi
done

# PIDs of this cluster: processes carrying its marker in their environment (same user; /proc), plus all
# their descendants (Ray workers and agents rewrite their process title, which can clobber environ).
rnb_cluster_pids() {
    local envf pid roots=()
    for envf in /proc/[0-9]*/environ; do
        pid="${envf#/proc/}"
        pid="${pid%/environ}"
        [[ "$pid" == "$$" || "$pid" == "$BASHPID" ]] && continue
        if grep -qzxF -- "$RNB_MARK" "$envf" 2>/dev/null; then
            roots+=("$pid")
        fi
    done
    (( ${#roots[@]} )) || return 0
    ps -e -o pid=,ppid= | awk -v roots="${roots[*]}" '
        { parent[$1] = $2 }
        END {
            n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1
            do { added = 0
                 for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; added = 1 }
            } while (added)
            for (p in keep) if (p in parent) print p
        }'
}

rnb_port_open() {  # rnb_port_open PORT -> 0 when something listens on 127.0.0.1:PORT
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
