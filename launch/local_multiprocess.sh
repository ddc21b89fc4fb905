#!/usr/bin/env bash
# A multi-host run rehearsed on one machine: N emola-train processes joined by jax.distributed
# over 127.0.0.1, each simulating K CPU devices (EMOLA_CPU_DEVICES). Waits for all of them; the
# first one to fail stops the others and its exit status becomes the script's.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_multiprocess.sh --num_processes=N --devices_per_process=K [--port=P]
           [--log_dir=DIR] [--grace_s=S] [--dry_run] -- emola-train args

Starts N processes of
  EMOLA_CPU_DEVICES=K python -m emola_jax.cli.train --coordinator_address=127.0.0.1:P \
      --num_processes=N --process_id=I ARGS
writes the output of process I to DIR/process_I.log and waits for all. When one fails, or on
Ctrl-C, the others get SIGTERM (emola-train saves a checkpoint after the current step), and
SIGKILL S seconds later.

Flags (--flag=VALUE or --flag VALUE):
  --num_processes        N >= 1 (required)
  --devices_per_process  K >= 1 simulated CPU devices per process (required)
  --port                 coordinator port on 127.0.0.1 (default 8476; use another for a second
                         run on the same machine)
  --log_dir              folder of the per-process logs (default logs/local_multiprocess)
  --grace_s              seconds between SIGTERM and SIGKILL when stopping (default 10)
  --dry_run              print the N commands instead of running them
  -h, --help             this text

Environment: EMOLA_PYTHON, the interpreter (default: the repository's .venv/bin/python, or
$EMOLA_VENV/bin/python, when present, else python3).

Example (2 processes x 4 CPU devices = one 8-device mesh):
  launch/local_multiprocess.sh --num_processes=2 --devices_per_process=4 -- \
      --config=configs/tiny.py --workdir=/tmp/emola_2proc \
      --config.data.dir=DATA --config.data.tokenizer=DATA/tokenizer \
      --config.train.batch_size=8 --config.mesh.data=1 --config.mesh.fsdp=8
EOF
}

die() {
  echo "local_multiprocess.sh: $*" >&2
  echo "Run 'launch/local_multiprocess.sh -h' for usage." >&2
  exit 2
}

# One word as it must be typed in a shell: as is when it is plain, else in single quotes.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

num_processes="" devices_per_process="" port=8476 log_dir="logs/local_multiprocess" grace_s=10
dry_run=0
train_args=()

set_flag() {
  case $1 in
    --num_processes) num_processes=$2 ;;
    --devices_per_process) devices_per_process=$2 ;;
    --port) port=$2 ;;
    --log_dir) log_dir=$2 ;;
    --grace_s) grace_s=$2 ;;
    *) return 1 ;;
  esac
}

while (($#)); do
  case $1 in
    --)
      shift
      train_args=("$@")
      break
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    --dry_run) dry_run=1 ;;
    --dry_run=*) die "flag '--dry_run' takes no value" ;;
    --*=*) set_flag "${1%%=*}" "${1#*=}" ||
      die "unknown flag '${1%%=*}' (emola-train arguments go after --)" ;;
    --*)
      (($# >= 2)) || die "flag '$1' needs a value"
      set_flag "$1" "$2" ||
        die "unknown flag '$1' (emola-train arguments go after --)"
      shift
      ;;
    *) die "unexpected argument '$1' (emola-train arguments go after --)" ;;
  esac
  shift
done

[[ $num_processes =~ ^[1-9][0-9]*$ ]] || die "--num_processes='$num_processes': give a number >= 1"
[[ $devices_per_process =~ ^[1-9][0-9]*$ ]] ||
  die "--devices_per_process='$devices_per_process': give a number >= 1"
if ! [[ $port =~ ^[1-9][0-9]{0,4}$ ]] || ((port > 65535)); then
  die "--port='$port': give a port in 1-65535"
fi
[[ $grace_s =~ ^[0-9]+$ ]] || die "--grace_s='$grace_s': give a whole number of seconds"
[[ -n $log_dir ]] || die "--log_dir is empty"
((${#train_args[@]})) || die "give the emola-train arguments after -- (at least --config and --workdir)"

if [[ -n ${EMOLA_PYTHON:-} ]]; then
  python=$EMOLA_PYTHON
else
  venv=${EMOLA_VENV:-.venv}
  [[ $venv == /* ]] || venv="$ROOT/$venv"
  if [[ -x $venv/bin/python ]]; then
    python="$venv/bin/python"
  else
    python=python3
  fi
fi

command_of() {  # the argv of process $1
  cmd=("$python" -m emola_jax.cli.train "--coordinator_address=127.0.0.1:$port"
    "--num_processes=$num_processes" "--process_id=$1" "${train_args[@]}")
}

if ((dry_run)); then
  for ((i = 0; i < num_processes; i++)); do
    command_of "$i"
    echo "EMOLA_CPU_DEVICES=$devices_per_process $(quote_all "${cmd[@]}")" \
      "> $(quote "$log_dir/process_$i.log") 2>&1"
  done
  exit 0
fi

mkdir -p "$log_dir"
pids=()

# Stops every process still running: SIGTERM to its process group, SIGKILL to what is left after
# grace_s. The group also holds the helpers a process started (Grain's workers).
stop_all() {
  local pid deadline=$((SECONDS + grace_s)) alive
  for pid in "${pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  while :; do
    alive=0
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then
        alive=1
      fi
    done
    ((alive && SECONDS < deadline)) || break
    sleep 0.2
  done
  for pid in "${pids[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}

on_signal() {
  trap - INT TERM
  echo "local_multiprocess.sh: $1 received, stopping the processes" >&2
  stop_all
  exit "$2"
}
trap 'on_signal SIGINT 130' INT
trap 'on_signal SIGTERM 143' TERM

# Job control only while starting: each process gets its own process group (so stop_all reaches
# its helpers, and a terminal's Ctrl-C reaches only this script, which stops them in order).
set -m
for ((i = 0; i < num_processes; i++)); do
  command_of "$i"
  EMOLA_CPU_DEVICES=$devices_per_process "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 </dev/null &
  pids+=("$!")
done
set +m
for ((i = 0; i < num_processes; i++)); do
  echo "process $i: pid ${pids[i]}, log $log_dir/process_$i.log" >&2
done

# Poll rather than `wait -n`: it names the process that ended, and works with bash < 4.3.
running=("${!pids[@]}")
while ((${#running[@]})); do
  still=()
  for i in "${running[@]}"; do
    if kill -0 "${pids[i]}" 2>/dev/null; then
      still+=("$i")
      continue
    fi
    if wait "${pids[i]}"; then
      status=0
    else
      status=$?
    fi
    if ((status)); then
      trap - INT TERM
      {
        echo "local_multiprocess.sh: process $i exited with status $status; stopping the others."
        echo "Last lines of $log_dir/process_$i.log:"
        tail -n 20 "$log_dir/process_$i.log"
      } >&2
      stop_all
      exit "$status"
    fi
    echo "process $i finished" >&2
  done
  running=("${still[@]+"${still[@]}"}")
  ((${#running[@]} == 0)) || sleep 0.2
done
echo "all $num_processes processes finished; logs in $log_dir" >&2
