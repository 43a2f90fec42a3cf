"""A single-node SLURM on this machine, for trying atomforge's cluster path and for its tests.

``python -m atomforge.deployments.local_slurm start DIR`` writes ``DIR/slurm.conf`` for this
machine (its cores and memory as ``slurmd -C`` reports them), starts ``munged``,
``slurmctld`` and ``slurmd`` as background processes with their files in ``DIR``, waits
until ``sinfo`` shows the node idle, and prints the ``SLURM_CONF`` line to export;
``stop DIR`` stops them by their pid files; ``status DIR`` says what runs. Debian's
``slurm-wlm`` and ``munge`` packages provide the programs (no systemd needed). It runs as
root, the way the packages' daemons run; the jobs it accepts run as their submitter.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("slurmd", "slurmctld", "munged")
"""The daemons, in the order they are stopped (the reverse of the order they start)."""
PARTITION = "debug"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0


class LocalSlurmError(RuntimeError):
    """A daemon of the local SLURM did not start or did not stop."""


@dataclass(frozen=True)
class LocalSlurm:
    """A started local SLURM: its folder, its configuration file and its partition."""

    folder: Path
    conf: Path
    partition: str = PARTITION

    def environment(self) -> dict[str, str]:
        """Return the variables that point SLURM's commands (sbatch, squeue...) at it."""
        return {"SLURM_CONF": str(self.conf)}


def node_layout() -> dict[str, str]:
    """Return this machine's node line fields from ``slurmd -C`` (CPUs, sockets, memory...)."""
    output = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", output.splitlines()[0]))
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return {key: fields[key] for key in keep if key in fields}


def slurm_conf(folder: Path, layout: dict[str, str]) -> str:
    """Return a slurm.conf for one node, this machine on 127.0.0.1, its files in ``folder``."""
    node = " ".join(f"{key}={value}" for key, value in layout.items())
    return f"""\
ClusterName=atomforge-local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={folder / "munge" / "munge.socket"}
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
EnforcePartLimits=ALL
KillWait=5
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={folder / "slurmctld.pid"}
SlurmdPidFile={folder / "slurmd.pid"}
SlurmctldLogFile={folder / "slurmctld.log"}
SlurmdLogFile={folder / "slurmd.log"}
NodeName=localhost NodeAddr=127.0.0.1 {node} State=UNKNOWN
PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pid_file(folder: Path, daemon: str) -> Path:
    return folder / f"{daemon}.pid"


def _running_pid(folder: Path, daemon: str) -> int | None:
    """Return the pid of ``daemon`` started from ``folder`` if it still runs, else None."""
    try:
        pid = int(_pid_file(folder, daemon).read_text().split()[0])
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
        return None
    return pid


def _start_daemon(folder: Path, daemon: str, args: list[str], env: dict[str, str]) -> None:
    """Start ``daemon`` in the foreground mode, detached, output to ``folder/<daemon>.out``."""
    with (folder / f"{daemon}.out").open("ab") as out:
        process = subprocess.Popen(
            [daemon, *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    _pid_file(folder, daemon).write_text(str(process.pid))


def _node_state(env: dict[str, str]) -> str:
    result = subprocess.run(
        ["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, env=env
    )
    return result.stdout.strip()


def start(folder: Path) -> LocalSlurm:
    """Start munged, slurmctld and slurmd with their files in ``folder``; return the SLURM.

    Waits until the node is idle. A SLURM already started from ``folder`` is left running
    and returned. Raises LocalSlurmError if it does not become idle in time.
    """
    folder = folder.resolve()
    slurm = LocalSlurm(folder, folder / "slurm.conf")
    env = {**os.environ, **slurm.environment()}
    if all(_running_pid(folder, daemon) for daemon in DAEMONS):
        return slurm
    stop(folder)
    for sub in ("state", "spool", "munge"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    slurm.conf.write_text(slurm_conf(folder, node_layout()))
    socket = folder / "munge" / "munge.socket"
    munge = [
        "-F",
        "--force",
        f"--socket={socket}",
        f"--pid-file={_pid_file(folder, 'munged')}.own",
        f"--log-file={folder / 'munged.log'}",
        f"--seed-file={folder / 'munge' / 'munged.seed'}",
    ]
    _start_daemon(folder, "munged", munge, env)
    _wait_for(lambda: socket.exists(), "munged", folder)
    _start_daemon(folder, "slurmctld", ["-D", "-f", str(slurm.conf)], env)
    _start_daemon(folder, "slurmd", ["-D", "-f", str(slurm.conf), "-N", "localhost"], env)
    _wait_for(lambda: _node_state(env) == "idle", "slurmd (node idle)", folder)
    return slurm


def _wait_for(ready, what: str, folder: Path) -> None:
    """Wait until ``ready()``; raise LocalSlurmError naming ``what`` after the timeout."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not ready():
        if time.monotonic() > deadline:
            stop(folder)
            raise LocalSlurmError(
                f"{what} did not start in {START_TIMEOUT_SECONDS:.0f} s: see {folder}"
            )
        time.sleep(0.2)


def stop(folder: Path) -> list[str]:
    """Stop the daemons started from ``folder`` (SIGTERM, then SIGKILL); return their names."""
    stopped = []
    for daemon in DAEMONS:
        pid = _running_pid(folder, daemon)
        if pid is None:
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while _running_pid(folder, daemon) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _running_pid(folder, daemon):
            os.kill(pid, signal.SIGKILL)
        stopped.append(daemon)
    return stopped


def status(folder: Path) -> dict[str, int | None]:
    """Return each daemon's pid, or None where it does not run."""
    return {daemon: _running_pid(folder, daemon) for daemon in DAEMONS}


def available() -> bool:
    """Return True if this machine has SLURM's and munge's programs."""
    return all(shutil.which(program) for program in (*DAEMONS, "sbatch", "sinfo"))


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return its exit code."""
    parser = argparse.ArgumentParser(prog="python -m atomforge.deployments.local_slurm")
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("folder", type=Path, help="where its configuration, state and logs live")
    args = parser.parse_args(argv)
    folder = args.folder.resolve()
    if args.action == "start":
        try:
            slurm = start(folder)
        except LocalSlurmError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"export SLURM_CONF={slurm.conf}")
    elif args.action == "stop":
        print("stopped: " + (", ".join(stop(folder)) or "nothing was running"))
    else:
        for daemon, pid in status(folder).items():
            print(f"{daemon:10} {'running, pid ' + str(pid) if pid else 'not running'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
