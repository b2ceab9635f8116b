#!/usr/bin/env bash
# Runs a program (training by default) as NUM_PROCESSES processes x DEVICES_PER_PROCESS CPU devices on this
# machine, connected by jax.distributed over loopback (gloo collectives): a multi-host run in
# miniature, for tests and for debugging sharding without a pod.
#
# Usage: launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS -- [program flags...]
#   e.g. launch/local.sh 2 2 -- --config=configs/digits.py --workdir=/tmp/digits
#
# Environment variables:
#   PYTHON       interpreter that runs the program (default: python3)
#   MODULE       the program: diffusion_jax.train (default) or diffusion_jax.evaluate
#   PORT         coordinator port on 127.0.0.1 (default: a free port picked by the OS)
#   LOG_DIR      if set, process i writes to $LOG_DIR/process_<i>.log instead of the terminal
#                (where its lines are prefixed with "[i] ")
#   KILL_AFTER   seconds the surviving processes get to exit after one fails or a signal
#                arrives, before they are killed with SIGKILL (default: 60)
#   JAX_PLATFORMS  defaults to "cpu", so that processes do not compete for an accelerator
#
# Waits for all processes. SIGINT and SIGTERM are forwarded to every process as SIGTERM (the
# program saves a checkpoint and exits). If a process fails, the others are sent SIGTERM (they
# cannot continue without it). The exit status is that of the first process that failed, or 0.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

if [[ $# -lt 3 || $3 != "--" ]]; then
    usage
fi
num_processes=$1
devices_per_process=$2
shift 3
if ! [[ $num_processes =~ ^[1-9][0-9]*$ && $devices_per_process =~ ^[1-9][0-9]*$ ]]; then
    echo "error: NUM_PROCESSES and DEVICES_PER_PROCESS must be positive integers" >&2
    usage
fi

python=${PYTHON:-python3}
kill_after=${KILL_AFTER:-60}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
port=${PORT:-$("$python" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')}
if [[ -n ${LOG_DIR:-} ]]; then
    mkdir -p "$LOG_DIR"
fi

running=()
stopping=0
watchdog=""
# Sends SIGTERM to the processes still running and starts the watchdog: a sleep of $kill_after
# seconds, at the end of which the wait loop below sends SIGKILL to the processes left.
stop_all() {
    if ((stopping)); then
        return
    fi
    stopping=1
    kill -TERM "${running[@]}" 2>/dev/null || true
    sleep "$kill_after" >/dev/null 2>&1 &
    watchdog=$!
}
on_signal() {
    echo "local.sh: signal received, stopping all processes" >&2
    stop_all
}
# While the processes are being started, a signal is only noted: stop_all, run by the trap
# between a process's `&` and `running+=("$!")`, would leave its watchdog's pid in $!, and that
# process would never be stopped.
signalled=0
trap 'signalled=1' INT TERM

for ((i = 0; i < num_processes && !signalled; i++)); do
    args=(
        -m "${MODULE:-diffusion_jax.train}"
        --cpu_devices="$devices_per_process"
        --coordinator_address="127.0.0.1:$port"
        --num_processes="$num_processes"
        --process_id="$i"
        "$@"
    )
    if [[ -n ${LOG_DIR:-} ]]; then
        "$python" "${args[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
    else
        # The filter is a child of this script (not of the process), for the final `wait`. It
        # ignores the Ctrl-C of a terminal (sent to all of them) and ends with its process's
        # output, which may still hold the process's last words.
        exec {to_filter}> >(trap '' INT TERM && exec sed -u "s/^/[$i] /")
        "$python" "${args[@]}" >&"$to_filter" 2>&1 &
        exec {to_filter}>&-
    fi
    running+=("$!")
done
trap on_signal INT TERM
if ((signalled)); then
    on_signal
fi

status=0
# Takes process $1 out of the running ones, with exit status $2; the first failure stops the
# others.
ended() {
    local j
    for j in "${!running[@]}"; do
        if [[ ${running[j]} == "$1" ]]; then
            unset "running[j]"
        fi
    done
    running=("${running[@]}")
    if (($2 != 0 && status == 0)); then
        status=$2
        echo "local.sh: process with pid $1 exited with status $2" >&2
        stop_all
    fi
}
while ((${#running[@]} > 0)); do
    rc=0
    # Returns when a process or the watchdog ends (its pid in $finished), or a trapped signal
    # arrives ($finished unset).
    wait -n -p finished "${running[@]}" ${watchdog:+"$watchdog"} 2>/dev/null || rc=$?
    if [[ -n $watchdog && ${finished:-} == "$watchdog" ]]; then
        watchdog=""
        kill -KILL "${running[@]}" 2>/dev/null || true
    elif [[ -n ${finished:-} ]]; then
        ended "$finished" "$rc"
    fi
    # Bash forgets a job killed by a signal once it has noted its end outside this `wait -n`
    # (two processes killed together, say): `wait -n` would never report it; `wait PID` has its
    # status.
    for pid in "${running[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rc=0
            wait "$pid" 2>/dev/null || rc=$?
            ended "$pid" "$rc"
        fi
    done
done
if [[ -n $watchdog ]]; then
    kill "$watchdog" 2>/dev/null || true
fi
wait # for the output filters to flush
exit "$status"
