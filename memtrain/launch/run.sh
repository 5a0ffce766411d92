#!/usr/bin/env bash
# memtrain launcher: the DeepSpeed launcher around `python -m memtrain.train`, on one machine or many.
#
#   memtrain/launch/run.sh [options] -- [python -m memtrain.train arguments]
#
#   --nproc N              ranks per node (GPUs on CUDA machines; CPU processes otherwise)  [1]
#   --hostfile FILE        several machines: lines "hostname slots=N"; DeepSpeed reaches them by ssh/pdsh
#   --no-ssh --node-rank R start only this node's ranks (run the same command once on every node)
#   --master-addr ADDR     address of node 0                                               [127.0.0.1]
#   --master-port PORT     rendezvous port          [one machine: a free port; several: 29500]
#   --env KEY=VALUE        set for every rank, on every node (repeatable)
#   --dry-run              print the DeepSpeed launcher command instead of running it
#   -v, --verbose          DeepSpeed's launcher logs every step it takes (default: warnings only)
#
# Examples
#   memtrain/launch/run.sh --nproc 2 -- --config configs/demo.toml                       # 2 ranks, this machine
#   memtrain/launch/run.sh --hostfile hosts --master-addr node0 -- --config configs/tp2.toml
#   memtrain/launch/run.sh --hostfile hosts --no-ssh --node-rank 1 --master-addr node0 -- --config ...   # on node 1
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"  # the folder holding memtrain/: the checkout, or site-packages when installed
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"

nproc=1 hostfile="" no_ssh=0 node_rank=-1 master_addr=127.0.0.1 master_port="" dry_run=0 log_level=warning
envs=()
die() { echo "memtrain/launch/run.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) nproc="${2:?--nproc needs a number}"; shift 2 ;;
    --hostfile) hostfile="${2:?--hostfile needs a file}"; shift 2 ;;
    --no-ssh) no_ssh=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -v|--verbose) log_level=info; shift ;;
    --node-rank) node_rank="${2:?--node-rank needs a number}"; shift 2 ;;
    --master-addr) master_addr="${2:?--master-addr needs an address}"; shift 2 ;;
    --master-port) master_port="${2:?--master-port needs a port}"; shift 2 ;;
    --env) [[ "${2:-}" == *=* ]] || die "--env needs KEY=VALUE, got '${2:-}'"; envs+=("$2"); shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) die "unknown option '$1' (train arguments go after --)" ;;
  esac
done

[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, got '$nproc'"
if [ -n "$hostfile" ] && [ ! -f "$hostfile" ]; then die "hostfile '$hostfile' not found"; fi
if [ "$no_ssh" = 1 ] && { [ -z "$hostfile" ] || [ "$node_rank" -lt 0 ]; }; then
  die "--no-ssh needs --hostfile (all nodes) and --node-rank (this node)"
fi

# Environment for every rank: exported here (local ranks inherit it) and written to a DeepSpeed env
# file, which the multi-node (pdsh) runner forwards to the other machines.
env_file="$(mktemp)"
trap 'rm -f "$env_file"' EXIT
for kv in "${envs[@]+"${envs[@]}"}"; do
  export "${kv?}"
  echo "$kv" >> "$env_file"
done
export DS_ENV_FILE="$env_file" PYTHONUNBUFFERED=1 DS_BUILD_OPS=0

if [ -z "$master_port" ]; then
  if [ -n "$hostfile" ]; then
    master_port=29500  # every node must name the same port: a fixed default (or --master-port)
  else  # one machine: a port nobody is using, so two jobs on a shared machine never collide
    master_port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    echo "memtrain/launch/run.sh: master port $master_port (a free one; --master-port PORT to choose)" >&2
  fi
fi
args=(--master_addr "$master_addr" --master_port "$master_port" --log_level "$log_level")
if [ -n "$hostfile" ]; then
  args+=(--hostfile "$hostfile")
  # a hostfile's slots give the ranks per node; --nproc limits them when given explicitly
  [ "$nproc" != 1 ] && args+=(--num_gpus "$nproc")
else
  args+=(--num_gpus "$nproc")
fi
[ "$no_ssh" = 1 ] && args+=(--no_ssh --node_rank "$node_rank")

# Ranks run in the caller's directory (relative --config and --run-dir paths mean what they say) and import
# memtrain from where this script lies, installed or not.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if [ "$dry_run" = 1 ]; then
  printf '%q ' "$python" -m deepspeed.launcher.runner "${args[@]}" --module memtrain.train "$@"; echo
  exit 0
fi
# Not exec: the EXIT trap must still remove the env file, and TERM/INT must reach the ranks. The runner gets a
# session of its own (setsid): a terminal's Ctrl-C or a TERM to this script's group then reaches this script
# alone, not DeepSpeed's per-node launcher, whose handler would kill the ranks 30 s later and exit 1. This
# script sends the signal straight to this machine's ranks: each finishes its step, saves a checkpoint and exits
# with code 75, which the launcher passes back here. Over ssh (a hostfile without --no-ssh) the runner's own
# handler signals the ranks on every node.
descendants() {  # every process below pid $1 (from /proc: no procps needed)
  local pid child
  for pid in /proc/[0-9]*; do
    child="${pid#/proc/}"
    # field 4 of /proc/PID/stat is the parent; the command name (field 2) may hold spaces, so cut after ") "
    if [ "$(sed -n 's/^.*) [A-Za-z] \([0-9]*\).*$/\1/p' "$pid/stat" 2>/dev/null)" = "$1" ]; then
      echo "$child"; descendants "$child"
    fi
  done
}
forward() {  # $1: the signal
  [ -n "${runner:-}" ] || exit 143  # nothing started yet
  if [ -n "$hostfile" ] && [ "$no_ssh" = 0 ]; then kill -"$1" "$runner" 2>/dev/null; return; fi
  local pid
  for pid in $(descendants "$runner"); do
    # the ranks are `python -u -m memtrain.train ...`; the launcher between them only mentions the module
    if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- ' -m memtrain.train '; then
      kill -"$1" "$pid" 2>/dev/null
    fi
  done
}
runner=""
stopping=""  # the signal forwarded, once one came
on_signal() { stopping="$1"; forward "$1"; }
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
spawn=()
command -v setsid > /dev/null && spawn=(setsid)
"${spawn[@]}" "$python" -m deepspeed.launcher.runner "${args[@]}" --module memtrain.train "$@" &
runner=$!
# A trapped signal ends a wait early: wait again until the runner is gone. Once a signal was forwarded, send it
# again every 30 s while the runner lives, so a rank that missed it (or was not yet visible in /proc) still stops;
# a rank that already has it just finishes its save (the repeat only sets its stop flag again).
waited=0
while kill -0 "$runner" 2>/dev/null; do
  if [ -z "$stopping" ]; then
    wait "$runner" || true
  else
    sleep 1 & wait $! || true
    waited=$((waited + 1))
    # (locally only: over ssh the runner's own handler owns the ranks, and a second signal would make it kill them)
    if [ $((waited % 30)) = 0 ] && { [ -z "$hostfile" ] || [ "$no_ssh" = 1 ]; } && kill -0 "$runner" 2>/dev/null; then
      forward "$stopping"
    fi
  fi
done
if wait "$runner"; then status=0; else status=$?; fi  # the runner's own status (bash keeps it after it ended)
exit "$status"
