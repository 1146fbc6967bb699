"""A single-node SLURM cluster on this machine, for the tests: munge + slurmctld + slurmd in a
temporary folder, private ports, two partitions (`cpu`, `gpu`) and two fake GPUs.

Needs root and Debian's `slurm-wlm` and `munge` (`.ci/run` installs them). The executor plugin's
job step drops every `SLURM_*` variable, `SLURM_CONF` too, before its inner `srun`, which then
reads the default `/etc/slurm/slurm.conf`: the cluster writes its configuration there too while it
runs (and refuses to start where that file already exists, i.e. on a machine with a real SLURM). Accounting is off
(no slurmdbd): finished jobs stay visible to `squeue`/`scontrol` for MinJobAge=600 s, which is how
the executor plugin polls them here (`slurm-status-command: squeue`).

    with SlurmCluster(tmp) as cluster:   # cluster.env: SLURM_CONF for sbatch/squeue/snakemake
        ...

Everything the cluster writes stays in its folder: the daemons run there, and `cluster.env` sets
`SBATCH_OUTPUT`, so a job submitted without `--output` does not leave `slurm-<id>.out` in the
directory it was submitted from (a stray `slurm-1.out` once got committed at the repository root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if not (shutil.which(b) or Path("/usr/sbin", b).is_file())]


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """Start with ``start()`` (or as a context manager), stop with ``stop()``; every daemon, file
    and socket lives in ``root``. ``cpus``/``mem_mb``/``gpus`` describe the one node."""

    def __init__(self, root: str | os.PathLike, cpus: int | None = None, mem_mb: int = 16000, gpus: int = 2,
                 port: int = 16817):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 2
        self.mem_mb, self.gpus, self.port = mem_mb, gpus, port
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        # SBATCH_OUTPUT: a job submitted without --output (sbatch's default is slurm-<id>.out in the
        # directory it was submitted from, e.g. the checkout) writes into this folder instead.
        self.job_output = self.root / "jobs"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "SBATCH_OUTPUT": str(self.job_output / "slurm-%j.out")}
        self._pids: list[Path] = []
        self._etc_conf: Path | None = None

    # --------------------------------------------------------------------------- configuration
    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge", "jobs"):
            (r / d).mkdir(parents=True, exist_ok=True)
        gres = "\n".join(f"NodeName={self.host} Name=gpu File={f}" for f in ("/dev/zero", "/dev/null")[: self.gpus])
        (r / "gres.conf").write_text(gres + "\n")
        self.conf.write_text(f"""\
ClusterName=provpt-test
SlurmctldHost={self.host}(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
SlurmctldPort={self.port}
SlurmdPort={self.port + 1}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
GresTypes=gpu
MinJobAge=600
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.mem_mb} Gres=gpu:{self.gpus} State=UNKNOWN
PartitionName=cpu Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={self.host} MaxTime=INFINITE State=UP
""")

    # --------------------------------------------------------------------------- life cycle
    def start(self, timeout_s: float = 60) -> SlurmCluster:
        if missing := missing_binaries():
            raise RuntimeError(f"SLURM test cluster: {missing} not installed (apt-get install slurm-wlm munge)")
        if os.geteuid() != 0:
            raise RuntimeError("SLURM test cluster: slurmd must run as root (SlurmdUser=root)")
        etc = Path("/etc/slurm/slurm.conf")
        if etc.exists():
            raise RuntimeError(f"SLURM test cluster: {etc} exists (a real SLURM here?); not overwriting it")
        self._write_config()
        etc.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.conf, etc)
        self._etc_conf = etc
        m = self.root / "munge"
        key = m / "munge.key"
        subprocess.run([_bin("mungekey"), "--create", f"--keyfile={key}", "--force"], check=True,
                       capture_output=True, cwd=self.root)
        key.chmod(0o600)
        subprocess.run([_bin("munged"), f"--key-file={key}", f"--socket={m}/munge.socket",
                        f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/seed",
                        "--force"], check=True, capture_output=True, cwd=self.root)
        self._pids.append(m / "munged.pid")
        subprocess.run([_bin("slurmctld"), "-c", "-f", str(self.conf)], check=True, env=self.env, capture_output=True,
                       cwd=self.root)
        self._pids.append(self.root / "slurmctld.pid")
        subprocess.run([_bin("slurmd"), "-f", str(self.conf)], check=True, env=self.env, capture_output=True,
                       cwd=self.root)
        self._pids.append(self.root / "slurmd.pid")
        t0 = time.monotonic()
        while True:
            state = subprocess.run([_bin("sinfo"), "-h", "-N", "-o", "%t"], env=self.env, capture_output=True,
                                   text=True).stdout.split()
            if state and all(s in ("idle", "mix", "alloc") for s in state):
                return self
            if time.monotonic() - t0 > timeout_s:
                self.stop()
                logs = "\n".join(p.read_text()[-2000:] for p in (self.root / "log").glob("*.log"))
                raise RuntimeError(f"SLURM test cluster: node not idle after {timeout_s} s (state {state})\n{logs}")
            time.sleep(0.5)

    def stop(self) -> None:
        for pid_file in reversed(self._pids):
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, 15)
            except (OSError, ValueError, IndexError):
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
        self._pids.clear()
        if self._etc_conf is not None:
            self._etc_conf.unlink(missing_ok=True)
            self._etc_conf = None

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --------------------------------------------------------------------------- queries
    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still knows (running or finished within MinJobAge), as the
        key=value fields of `scontrol -o show job`."""
        out = subprocess.run([_bin("scontrol"), "-o", "show", "job"], env=self.env, capture_output=True,
                             text=True, check=True).stdout
        jobs = []
        for line in out.splitlines():
            if not line.startswith("JobId="):
                continue
            fields, key = {}, None
            for token in line.split(" "):
                if "=" in token and not token.startswith("="):
                    key, _, value = token.partition("=")
                    fields[key] = value.strip()
                elif key:  # a value with spaces (Comment=..., Command=...)
                    fields[key] = (fields[key] + " " + token).strip()
            jobs.append(fields)
        return jobs
