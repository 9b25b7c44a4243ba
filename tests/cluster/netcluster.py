"""A real multi-node Ray cluster on this one machine, for the cluster tests and bench/cluster.py.

Every node is a network namespace of its own (`rt0` the head, where the launcher runs as a Ray
driver must; `rt1..` workers), joined by one bridge, each with a private /tmp (`unshare -m`), so
nodes share no network stack, Ray session or scratch space: what a real cluster does to a lost node
or a cut link happens here too. The object store (moto, logging every request with its client
address) listens on the host's end of the bridge only. Addresses: 198.18.0.128/26 (RFC 2544's
benchmark range; the host end .129, node K at .(140 + K)), apart from the acceptance checks'
198.18.0.0/24 addresses so both can run on one machine.

Faults are done from outside, the way they happen: `kill_node(k)` SIGKILLs every process in a node's
namespace, `cut(k)` / `heal(k)` take its link down and up. Needs root, iproute2 and unshare
(`available()` says why not). `NetCluster.close()` (or the context manager) ends every process it
started by namespace and removes the namespaces and the bridge; nothing else on the machine is
touched (no `ray stop`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BRIDGE = "rtb0"
HOST_IP = "198.18.0.129"
PREFIX = 26
S3_PORT = 9129
NS = "rt"
ROOT = Path(__file__).resolve().parents[2]
S3_SERVER = Path(__file__).with_name("s3server.py")


def ip_of(k: int) -> str:
    return f"198.18.0.{140 + k}"


def wait_for(predicate, timeout: float, what: str, fail: bool = True):
    """`predicate()`'s first true answer within `timeout` seconds (polled); else raises (or, with
    `fail=False`, returns None)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.3)
    if fail:
        raise AssertionError(f"timed out waiting for {what}")
    return None


def available() -> str | None:
    """None when a namespace cluster can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    # root in a container without CAP_SYS_ADMIN / CAP_NET_ADMIN cannot make either
    probe = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot make namespaces here ({probe.stderr.decode().strip()[:200]})"
    return None


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)


class NetCluster:
    def __init__(self, work: Path, workers: int = 3, cpus: int = 2, hosts: bool = False):
        """`hosts`: nodes get an /etc/hosts naming every node (name lookups answer at once, as
        on a cluster with DNS; without it a lookup waits out the host's resolver)."""
        self.work, self.workers, self.cpus = Path(work), workers, cpus
        self.hosts = self.work / "hosts" if hosts else None
        self.head = f"{ip_of(0)}:6379"
        self.temp = Path(f"/tmp/{NS}cluster-{os.getpid()}")
        self.s3_log = self.work / "s3.log"
        self.s3: subprocess.Popen | None = None
        bin_dir = os.path.dirname(sys.executable)
        self.resilient = os.path.join(bin_dir, "resilient")
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_DISABLE_USAGE_STATS": "1",
            "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "x",
            "AWS_DEFAULT_REGION": "us-east-1",
            "FSSPEC_S3": json.dumps({"client_kwargs": {"endpoint_url": self.s3_url}}),
        }
        self.env.pop("RAY_ADDRESS", None)

    @property
    def s3_url(self) -> str:
        return f"http://{HOST_IP}:{S3_PORT}"

    # -- building it -------------------------------------------------------------------------------
    def __enter__(self) -> NetCluster:
        try:
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def up(self) -> None:
        self.close()  # what a killed earlier run left
        self.work.mkdir(parents=True, exist_ok=True)
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")
        for k in range(self.workers + 1):
            self._link(k)
        self._start_s3()
        # the head keeps the host's /tmp (the launcher must find its session), so its session and
        # the "current cluster" file go to a folder of this cluster's, not /tmp/ray (where any
        # later `ray.init()` on this machine would find them and try to join)
        self.run_on(
            0,
            "ray", "start", "--head", "--node-ip-address", ip_of(0), "--port", "6379",
            "--num-cpus", "0", "--include-dashboard", "false", "--temp-dir", str(self.temp),
        )  # fmt: skip
        for k in range(1, self.workers + 1):
            self.start_node(k)

    def _link(self, k: int) -> None:
        ns = f"{NS}{k}"
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", f"rtv{k}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _sh("ip", "link", "set", f"rtv{k}", "master", BRIDGE)
        _sh("ip", "link", "set", f"rtv{k}", "up")
        _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip_of(k)}/{PREFIX}", "dev", "eth0")
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def _hosts(self) -> str:
        """Shell binding this cluster's hosts file over /etc/hosts (`hosts`), else nothing."""
        if self.hosts is None:
            return "true"
        if not self.hosts.exists():
            names = "".join(f"{ip_of(k)} {NS}{k}\n" for k in range(self.workers + 1))
            # every node shares the host's hostname here (no UTS namespace): it names itself
            me = f"127.0.1.1 {socket.gethostname()}\n"
            self.hosts.write_text(f"127.0.0.1 localhost\n{me}{names}")
        return f"mount --bind '{self.hosts}' /etc/hosts"

    def _private_tmp(self) -> str:
        """Shell for a node's own /tmp (with the venv bound back in where it lives under /tmp)."""
        prefix = sys.prefix
        if not prefix.startswith("/tmp/"):
            return f"{self._hosts()} && mount -t tmpfs tmpfs /tmp"
        keep = f"/mnt/{NS}-venv"
        return (
            f"{self._hosts()} && mkdir -p {keep} && mount --bind '{prefix}' {keep} && "
            f"mount -t tmpfs tmpfs /tmp && mkdir -p '{prefix}' && mount --bind {keep} '{prefix}'"
        )

    def start_node(self, k: int, cpus: int | None = None, drop_env: tuple[str, ...] = ()) -> None:
        """(Re)start worker node `k`, joined to the head (without the variables `drop_env`, e.g.
        the storage credentials every node has by default)."""
        cmd = (
            f"{self._private_tmp()} && cd / && exec ray start --address {self.head} "
            f"--node-ip-address {ip_of(k)} --num-cpus {cpus or self.cpus}"
        )
        self._in_ns(k, ["unshare", "-m", "--propagation", "private", "sh", "-c", cmd], drop_env)

    def _in_ns(self, k: int, cmd: list[str], drop_env: tuple[str, ...] = ()) -> None:
        log = self.work / f"node-{k}.log"
        with open(log, "a") as out:
            r = subprocess.run(
                ["ip", "netns", "exec", f"{NS}{k}", *cmd],
                env={n: v for n, v in self.env.items() if n not in drop_env},
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=120,
            )
        if r.returncode:
            raise RuntimeError(f"node {k}: {' '.join(cmd)[:80]} failed: {log.read_text()[-500:]}")

    def _start_s3(self) -> None:
        self.s3 = subprocess.Popen(
            [sys.executable, str(S3_SERVER), str(S3_PORT), str(self.s3_log), HOST_IP],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            r = subprocess.run(
                [sys.executable, "-c", f"import boto3; boto3.client('s3', endpoint_url="
                 f"'{self.s3_url}').create_bucket(Bucket='runs')"],
                env=self.env, capture_output=True, timeout=30,
            )  # fmt: skip
            if r.returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError("the S3 endpoint did not start")

    # -- using it ----------------------------------------------------------------------------------
    def run_on(self, k: int, *cmd: str) -> None:
        """Run a command to its end on node `k` (its network, the host's /tmp)."""
        self._in_ns(k, list(cmd))

    def launch(self, *args: str, log: Path) -> subprocess.Popen:
        """`resilient ARGS` (a launch) on the head, as a user would (output to `log`)."""
        return self.launch_cmd([self.resilient, *args], log)

    def spawn(self, k: int, cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        """A long-running process on node `k` (its network; the host's filesystem but /etc/hosts,
        see `hosts`), output to `log`."""
        shell = f'{self._hosts()} && exec "$@"'
        out = open(log, "w")  # noqa: SIM115 (the process holds it)
        return subprocess.Popen(
            ["ip", "netns", "exec", f"{NS}{k}", "unshare", "-m", "--propagation", "private",
             "sh", "-c", shell, "sh", *cmd],
            env={**self.env, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )  # fmt: skip

    def launch_cmd(self, cmd: list[str], log: Path) -> subprocess.Popen:
        """Any driver on the head (its network and /tmp: it finds the head's Ray session)."""
        out = open(log, "w")  # noqa: SIM115 (the process holds it)
        return subprocess.Popen(
            ["ip", "netns", "exec", f"{NS}0", *cmd],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Another `resilient` command, from the host (it reaches storage over the bridge)."""
        return subprocess.run(
            [self.resilient, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )

    def status(self, run: str) -> dict:
        r = self.cli("status", run, "--json")
        return json.loads(r.stdout) if r.returncode == 0 else {}

    @staticmethod
    def ns_of(pid: int) -> str | None:
        r = _sh("ip", "netns", "identify", str(pid), check=False)
        return r.stdout.strip() or None

    @staticmethod
    def pids(k: int) -> list[int]:
        r = _sh("ip", "netns", "pids", f"{NS}{k}", check=False)
        return [int(p) for p in r.stdout.split()]

    def kill_node(self, k: int) -> None:
        """Lose node `k`: every process in it SIGKILLed at once."""
        for pid in self.pids(k):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cut(self, k: int) -> None:
        _sh("ip", "link", "set", f"rtv{k}", "down")

    def heal(self, k: int) -> None:
        _sh("ip", "link", "set", f"rtv{k}", "up")

    def requests_from(self, k: int) -> int:
        """Requests the object store got from node `k`."""
        if not self.s3_log.exists():
            return 0
        ip = ip_of(k)
        return sum(1 for line in self.s3_log.read_text().splitlines() if line.endswith(f" {ip}"))

    def close(self) -> None:
        """End every process in the namespaces, then the namespaces, the bridge and the store."""
        r = _sh("ip", "netns", "list", check=False)
        mine = [w for w in (line.split()[0] for line in r.stdout.splitlines() if line) if w]
        mine = [n for n in mine if n.startswith(NS) and n[len(NS) :].isdigit()]
        for ns in mine:
            for _ in range(50):
                pids = self.pids(int(ns[len(NS) :]))
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            _sh("ip", "link", "del", f"rtv{ns[len(NS) :]}", check=False)
            _sh("ip", "netns", "del", ns, check=False)
        _sh("ip", "link", "del", BRIDGE, check=False)
        if self.s3 is not None:
            self.s3.kill()
            self.s3.wait(timeout=10)
            self.s3 = None
        shutil.rmtree(self.temp, ignore_errors=True)
