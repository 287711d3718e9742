#!/usr/bin/env bash
# N jaxclr processes on this machine, M simulated CPU devices each, joined by
# jax.distributed through a coordinator on 127.0.0.1 (gloo collectives). It is
# the same multi-controller program that runs on a TPU pod or a GPU cluster,
# so it is how multi-host behaviour is tested without one.
#
#   launch/local.sh N [M] --config configs/default.py --workdir runs/x [FLAGS...]
#
# N: processes (>= 1). M: CPU devices per process (default 1). Everything else
# goes to `python -m $JAXCLR_MODULE` unchanged (default jaxclr.main; also
# jaxclr.linear_eval, jaxclr.finetune or jaxclr.distill). Output lines are prefixed with the
# process index. Waits for all processes; if one fails, the others are sent
# SIGTERM, then SIGKILL after $JAXCLR_KILL_GRACE_S seconds (default 10), and
# the script exits with the failed process's status. Ctrl-C stops them all.
#
# Environment: PYTHON (default: python), JAXCLR_PORT (default: a free port),
# JAXCLR_MODULE (default: jaxclr.main).
set -euo pipefail

usage() {
  echo "usage: $0 N [M] --config CONFIG --workdir DIR [job flags...]" >&2
  exit 2
}

[[ $# -ge 1 && $1 =~ ^[0-9]+$ && $1 -ge 1 ]] || usage
num_processes=$1
shift
devices_per_process=1
if [[ $# -ge 1 && $1 =~ ^[0-9]+$ ]]; then
  [[ $1 -ge 1 ]] || usage
  devices_per_process=$1
  shift
fi
python=${PYTHON:-python}
grace=${JAXCLR_KILL_GRACE_S:-10}
# shellcheck source=launch/jobs.sh
source "$(dirname "${BASH_SOURCE[0]}")/jobs.sh"
select_job local.sh

if [[ -n ${JAXCLR_PORT:-} ]]; then
  port=$JAXCLR_PORT
else
  # Ask the kernel for a free loopback port (tiny race until process 0 binds).
  port=$("$python" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
coordinator=127.0.0.1:$port

# Each process sees its own M CPU devices; drop any device count already set.
xla_flags=$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' \
  <<<"${XLA_FLAGS:-}")
[[ $xla_flags =~ ^[[:space:]]*$ ]] && xla_flags=""
xla_flags="${xla_flags:+$xla_flags }"
xla_flags+="--xla_force_host_platform_device_count=$devices_per_process"

pids=()
stop_all() {
  local pid alive=()
  for pid in "${pids[@]}"; do
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && alive+=("$pid")
  done
  [[ ${#alive[@]} -eq 0 ]] && return 0
  kill -TERM "${alive[@]}" 2>/dev/null || true
  local waited=0
  while [[ $waited -lt $((grace * 10)) ]]; do
    local any=0
    for pid in "${alive[@]}"; do
      kill -0 "$pid" 2>/dev/null && any=1
    done
    [[ $any -eq 0 ]] && return 0
    sleep 0.1
    waited=$((waited + 1))
  done
  echo "local.sh: killing processes still running after ${grace}s" >&2
  kill -KILL "${alive[@]}" 2>/dev/null || true
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

echo "local.sh: $module, $num_processes process(es) x $devices_per_process" \
  "CPU device(s), coordinator $coordinator" >&2
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS=$xla_flags JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1 \
    "$python" -m "$module" \
    --coordinator_address="$coordinator" --num_processes="$num_processes" \
    --process_id="$i" "$@" \
    > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=("$!")
done

# Poll rather than `wait -n -p` (bash >= 5.1) so that older bash works too.
status=0
remaining=$num_processes
while [[ $remaining -gt 0 ]]; do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ -z $pid ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" || rc=$?
    pids[$i]=""
    remaining=$((remaining - 1))
    if [[ $rc -ne 0 ]]; then
      echo "local.sh: process $i exited with status $rc; stopping the" \
        "other $remaining" >&2
      status=$rc
      stop_all
      break 2
    fi
  done
  sleep 0.2
done
wait || true  # Reap the others and the output filters.
exit "$status"
