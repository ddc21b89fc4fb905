#!/usr/bin/env bash
# Cloud TPU VM pod launcher: creates the slice, copies this checkout to every worker, runs
# emola-train on all workers at once (JAX's multi-controller model: one process per worker, joined
# by jax.distributed), tails the logs, stops the run and deletes the slice. Every action is a
# `gcloud compute tpus tpu-vm ...` command; --dry_run prints them, one per line, instead.
# The commands for the workers are built as text whose `$...` must expand on the worker, hence
# single quotes on purpose:
# shellcheck disable=SC2016
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh SUBCOMMAND --name=NAME --zone=ZONE [flags] [-- emola-train args]

Subcommands:
  create   create the TPU VM slice (needs --accelerator_type and --version)
  copy     pack this checkout, copy it to every worker, unpack it into --remote_dir there and
           install it into --remote_dir/.venv with jax[tpu]
  run      start emola-train on all workers in the background (nohup); the log of each worker
           is REMOTE_DIR/logs/emola-train-HOSTNAME.log on that worker
  logs     follow the log of --worker (default 0, the process that writes metrics)
  stop     send SIGTERM to emola-train on all workers (it saves a checkpoint, then exits)
  delete   delete the slice (gcloud asks for confirmation)
  all      create, copy, run

Flags (--flag=VALUE or --flag VALUE):
  --name              TPU name (required)
  --zone              zone, e.g. us-east5-a (required)
  --project           GCP project (default: gcloud's configured project)
  --accelerator_type  e.g. v5p-64 (create, all)
  --version           TPU VM runtime, e.g. v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e,
                      tpu-ubuntu2204-base for v4 (create, all)
  --spot              create a Spot slice (create, all)
  --remote_dir        code folder on the workers, relative to the home folder (default emola-jax)
  --python            Python >= 3.11 on the workers used to make the venv (default python3.11;
                      copy installs it with apt when the worker lacks it)
  --worker            logs: worker index or "all" (default 0)
  --lines             logs: lines of history to show first (default 100)
  --dry_run           print the commands instead of running them
  -h, --help          this text

Arguments after -- go to emola-train (run, all); relative paths are relative to --remote_dir.

Example (EmoLA-7B on a v5p-64 slice = 32 chips, 8 workers):
  launch/tpu_pod.sh all --name=emola --zone=us-east5-a --project=my-project \
      --accelerator_type=v5p-64 --version=v2-alpha-tpuv5 -- \
      --config=configs/emola_lora.py --workdir=/mnt/shared/runs/emola \
      --config.mesh.data=1 --config.mesh.fsdp=32 --config.mesh.tensor=1
EOF
}

die() {
  echo "tpu_pod.sh: $*" >&2
  echo "Run 'launch/tpu_pod.sh -h' for usage." >&2
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

# Prints the command (dry run) or echoes it to stderr and runs it.
do_cmd() {
  if ((dry_run)); then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

(($#)) || {
  usage >&2
  exit 2
}
case $1 in
  -h | --help)
    usage
    exit 0
    ;;
  create | copy | run | logs | stop | delete | all) subcommand=$1 ;;
  *) die "unknown subcommand '$1' (use create, copy, run, logs, stop, delete or all)" ;;
esac
shift

name="" zone="" project="" accelerator_type="" version="" remote_dir="emola-jax"
python="python3.11" worker="0" lines="100" spot=0 dry_run=0
train_args=()

set_flag() {
  case $1 in
    --name) name=$2 ;;
    --zone) zone=$2 ;;
    --project) project=$2 ;;
    --accelerator_type) accelerator_type=$2 ;;
    --version) version=$2 ;;
    --remote_dir) remote_dir=$2 ;;
    --python) python=$2 ;;
    --worker) worker=$2 ;;
    --lines) lines=$2 ;;
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
    --spot) spot=1 ;;
    --dry_run) dry_run=1 ;;
    --spot=* | --dry_run=*) die "flag '${1%%=*}' takes no value" ;;
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

[[ -n $name ]] || die "--name is required"
# gcloud's rule for TPU names; it also keeps the name safe inside the workers' commands.
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name=$name: use lower-case letters, digits and hyphens, starting with a letter"
[[ -n $zone ]] || die "--zone is required"
[[ -n $remote_dir && $remote_dir != /* ]] || die "--remote_dir=$remote_dir: give a folder relative to the workers' home folder"
if [[ $subcommand == create || $subcommand == all ]]; then
  [[ -n $accelerator_type ]] || die "$subcommand needs --accelerator_type (e.g. v5p-64)"
  [[ -n $version ]] || die "$subcommand needs --version (the TPU VM runtime, e.g. v2-alpha-tpuv5 for v5p)"
elif ((spot)); then
  die "--spot applies to create and all, not $subcommand"
fi
if [[ $subcommand == run || $subcommand == all ]]; then
  ((${#train_args[@]})) || die "$subcommand needs emola-train arguments after -- (at least --config and --workdir)"
elif ((${#train_args[@]})); then
  die "arguments after -- are for run and all, not $subcommand"
fi
[[ $worker == all || $worker =~ ^[0-9]+$ ]] || die "--worker=$worker: give a worker index or all"
[[ $lines =~ ^[0-9]+$ ]] || die "--lines=$lines: give a number"

where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")
tpu_vm=(gcloud compute tpus tpu-vm)

dir_q="$(quote "$remote_dir")"
# Per-worker file stem on the worker, expanded there (hostnames differ between workers).
log_stem='logs/emola-train-$(hostname)'
remote_tarball="/tmp/emola-jax-$name.tar.gz"

create() {
  local cmd=("${tpu_vm[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator_type"
    --version="$version")
  ((!spot)) || cmd+=(--spot)
  do_cmd "${cmd[@]}"
}

copy() {
  local tmp="${TMPDIR:-/tmp}"
  local tarball="${tmp%/}/emola-jax-$name.tar.gz"
  local py_q setup
  py_q="$(quote "$python")"
  # The working tree, not a commit: uncommitted edits are what one usually wants to run.
  do_cmd tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=.pytest_cache --exclude=runs --exclude=logs -C "$ROOT" .
  do_cmd "${tpu_vm[@]}" scp "$tarball" "$name:$remote_tarball" "${where[@]}" --worker=all
  # TPU VM images ship an older python3; python_requires is >= 3.11. One pip resolution of the
  # package and jax[tpu] picks the libtpu that matches the jax version setup.py allows.
  setup="mkdir -p $dir_q && tar -xzf $remote_tarball -C $dir_q && rm -f $remote_tarball"
  setup+=" && cd $dir_q && { $py_q -c \"import ensurepip\" 2>/dev/null"
  setup+=" || { sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive apt-get -qq"
  setup+=" install -y $py_q $(quote "$python-venv"); }; }"
  setup+=" && $py_q -m venv .venv && .venv/bin/python -m pip install -q --upgrade pip"
  setup+=" && .venv/bin/python -m pip install -q -e . \"jax[tpu]\""
  do_cmd "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker=all --command "$setup"
  do_cmd rm -f "$tarball"
}

run() {
  local train start
  train=".venv/bin/python -m emola_jax.cli.train --auto_distributed $(quote_all "${train_args[@]}")"
  # A second run on a worker whose TPU is still held by the first would fail deep in libtpu.
  start="cd $dir_q && mkdir -p logs && f=$log_stem"
  start+=' && if [ -f "$f.pid" ] && kill -0 "$(cat "$f.pid")" 2>/dev/null; then echo'
  start+=' "emola-train still runs on $(hostname) (pid $(cat "$f.pid")): use tpu_pod.sh stop" >&2;'
  start+=' exit 1; fi'
  start+=" && { nohup $train > \"\$f.log\" 2>&1 < /dev/null & echo \$! > \"\$f.pid\"; }"
  start+=' && echo "emola-train started on $(hostname), log: '"$dir_q"'/$f.log"'
  do_cmd "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker=all --command "$start"
}

logs() {
  do_cmd "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker="$worker" \
    --command "tail -n $lines -F $dir_q/$log_stem.log"
}

stop() {
  local remote="cd $dir_q && f=$log_stem"
  remote+=' && if [ -f "$f.pid" ] && kill "$(cat "$f.pid")" 2>/dev/null; then echo'
  remote+=' "SIGTERM sent to emola-train on $(hostname)"; else echo "no emola-train runs on $(hostname)"; fi'
  do_cmd "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker=all --command "$remote"
}

delete() {
  do_cmd "${tpu_vm[@]}" delete "$name" "${where[@]}"
}

case $subcommand in
  all)
    create
    copy
    run
    ;;
  *) "$subcommand" ;;
esac
