"""The systems the benchmark starts: smtp-sink, mailrelay, a private Postfix, accept-only servers.

Each one runs on 127.0.0.1 on a free port, lives in its own temp directory and is stopped by PID.
Nothing here depends on files outside the project.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binary(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and os.path.exists(f"/usr/sbin/{name}"):
        found = f"/usr/sbin/{name}"
    return found


def wait_listening(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _stat(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()  # fields from 3 (state) on


def cpu_ticks(root_pid: int) -> int:
    """CPU time (clock ticks) of a process, its live descendants and its reaped children."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(int(st[1]), []).append(int(entry))
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        st = _stat(pid)
        if st is None:
            continue
        # utime stime cutime cstime are fields 14-17, i.e. st[11:15]
        total += sum(int(x) for x in st[11:15])
        todo.extend(children.get(pid, ()))
    return total


class System:
    """Something smtp-source talks to: a name, a port, a root PID for CPU accounting."""

    name = "?"
    port = 0

    def pid(self) -> int | None:
        return None

    def cpu(self) -> int:
        pid = self.pid()
        return cpu_ticks(pid) if pid else 0

    def stop(self) -> None:
        pass


class Sink(System):
    """Postfix's smtp-sink, counting messages (-c) to a file we poll."""

    name = "smtp-sink"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-sink-"))
        self.port = free_port()
        exe = binary("smtp-sink")
        if exe is None:
            raise RuntimeError("smtp-sink not found (Debian package postfix)")
        args = [exe]
        if IS_ROOT:
            args += ["-u", "nobody"]  # smtp-sink refuses to run as root
        args += ["-c", "-m", "1000", f"127.0.0.1:{self.port}", "1024"]
        self.out = open(self.dir / "counters", "wb")
        self.proc = subprocess.Popen(
            args,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_listening(self.port, proc=self.proc)

    def pid(self) -> int | None:
        return self.proc.pid

    def count(self) -> int:
        with open(self.dir / "counters", "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 400))
            tail = f.read().replace(b"\r", b"\n").split(b"\n")
        for line in reversed(tail):
            if b"mesg=" in line:
                return int(line.split(b"mesg=")[1].split()[0])
        return 0

    def wait_for(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count() >= n:
                return True
            time.sleep(0.02)
        return self.count() >= n

    def stop(self) -> None:
        stop_process(self.proc)
        self.out.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class BlackHole:
    """A next hop that accepts TCP connections into its backlog and never answers: delivery is
    effectively paused (the relay's few delivery attempts wait for a greeting)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]

    def stop(self) -> None:
        self.sock.close()


MAILRELAY_CONFIG = """\
[server]
hostname = "bench-relay.example.test"
listen = ["tcp:{port}:interface=127.0.0.1:backlog=1024"]
trusted_networks = ["127.0.0.0/8"]
max_connections_per_ip = 1000
max_message_size = "1G"
workers = {workers}

[spool]
path = "{spool}"

[queue]
retry_schedule = ["{retry}"]

[[routes]]
type = "static"
domains = ["*"]
hosts = ["127.0.0.1:{nexthop}"]
"""


def tree_env(tree: Path) -> dict[str, str]:
    """The environment that makes a Python child import ``mailrelay`` from ``tree`` (first on
    ``PYTHONPATH``, ahead of the venv's editable install), checked once with a child of its own
    (run in ``/``, as the relay runs in a temp dir: ``python -c`` puts its cwd first)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p)
    found = subprocess.run(
        [sys.executable, "-c", "import mailrelay; print(mailrelay.__file__)"],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if not found or not Path(found).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"mailrelay imports from {found or 'nowhere'}, not from {tree}")
    return env


class MailRelay(System):
    """mailrelay under twistd, relaying everything to one next hop, its spool in a temp dir.

    ``tree`` is the source tree whose code runs (default: the one this file is in)."""

    name = "mailrelay"

    def __init__(
        self,
        nexthop_port: int,
        retry: str = "5s",
        label: str = "mailrelay",
        workers: int = 1,
        tree: Path = ROOT,
    ) -> None:
        self.name = label
        self.workers = workers
        self.tree = tree
        env = tree_env(tree)  # before the temp dir: a wrong tree leaves nothing behind
        self.dir = Path(tempfile.mkdtemp(prefix="bench-mailrelay-"))
        self.port = free_port()
        self.spool = self.dir / "spool"
        conf = self.dir / "mailrelay.toml"
        conf.write_text(
            MAILRELAY_CONFIG.format(
                port=self.port, spool=self.spool, nexthop=nexthop_port, retry=retry, workers=workers
            )
        )
        twistd = Path(sys.executable).parent / "twistd"
        self.log = open(self.dir / "twistd.log", "wb")
        self.proc = subprocess.Popen(
            [str(twistd), "-n", "--pidfile=", "mailrelay", "--config", str(conf)],
            cwd=self.dir,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_listening(self.port, proc=self.proc)
            self._wait_workers()
        except Exception:
            self.log.flush()
            sys.stderr.write((self.dir / "twistd.log").read_text(errors="replace")[-4000:])
            self.stop()  # the caller never gets the object to stop
            raise

    def _wait_workers(self, timeout: float = 30.0) -> None:
        """With workers > 1 the supervisor listens before its workers run: wait for them all."""
        if self.workers <= 1:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = (self.dir / "twistd.log").read_text(errors="replace")
            if all(f"worker {k} running" in text for k in range(self.workers)):
                return
            time.sleep(0.05)
        raise RuntimeError(f"mailrelay: {self.workers} workers not running after {timeout}s")

    def pid(self) -> int | None:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


POSTFIX_MAIN_CF = """\
# private benchmark instance: own config and queue, loopback only, no DNS, stock tuning
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
maillog_file_prefixes = /tmp
maillog_file = {dir}/maillog
myhostname = bench-postfix.localhost.test
mydomain = localhost.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 local delivery disabled
alias_maps =
alias_database =
biff = no
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains =
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions =
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtp_host_lookup = native
message_size_limit = 52428800
default_transport = smtp
relay_transport = relay
relayhost = [127.0.0.1]:{nexthop}
"""

# chroot (5th column) is n everywhere: a chroot under /tmp would need /etc files copied in.
POSTFIX_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
lmtp      unix  - - n - - lmtp
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class Postfix(System):
    """A throwaway Postfix instance relaying everything to ``[127.0.0.1]:nexthop``.

    Needs root (the master drops privileges to the ``postfix`` user). Its ``myhostname`` differs
    from the sink's greeting name, or Postfix would bounce with "mail loops back to myself".
    """

    name = "postfix"

    def __init__(self, nexthop_port: int) -> None:
        if not IS_ROOT:
            raise RuntimeError("a private Postfix instance needs root")
        exe = binary("postfix")
        if exe is None:
            raise RuntimeError("postfix not found (Debian package postfix)")
        self.dir = Path(tempfile.mkdtemp(prefix="bench-postfix-"))
        os.chmod(self.dir, 0o755)  # postfix-owned daemons must traverse it
        for sub in ("etc", "queue", "data"):
            (self.dir / sub).mkdir()
        shutil.chown(self.dir / "data", "postfix")  # data_directory belongs to mail_owner
        (self.dir / "maillog").touch()
        self.port = free_port()
        (self.dir / "etc" / "main.cf").write_text(
            POSTFIX_MAIN_CF.format(dir=self.dir, nexthop=nexthop_port)
        )
        (self.dir / "etc" / "master.cf").write_text(POSTFIX_MASTER_CF.format(port=self.port))
        self.exe = exe
        started = subprocess.run(
            [exe, "-c", str(self.dir / "etc"), "start"], capture_output=True, text=True
        )
        if started.returncode != 0:
            raise RuntimeError(f"postfix start failed: {started.stderr}\n{self._maillog()}")
        try:
            wait_listening(self.port)
        except TimeoutError:
            raise RuntimeError(f"postfix did not come up:\n{self._maillog()}") from None
        deadline = time.monotonic() + 10
        while not self._pidfile().exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _maillog(self) -> str:
        return (self.dir / "maillog").read_text(errors="replace")[-3000:]

    def _pidfile(self) -> Path:
        return self.dir / "queue" / "pid" / "master.pid"

    def pid(self) -> int | None:
        try:
            return int(self._pidfile().read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def queued(self) -> int:
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred"):
            for _, _, files in os.walk(self.dir / "queue" / sub):
                n += len(files)
        return n

    def stop(self) -> None:
        pid = self.pid()
        subprocess.run([self.exe, "-c", str(self.dir / "etc"), "stop"], capture_output=True)
        if pid:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


class PythonServer(System):
    """An accept-and-discard server from bench/ (aiosmtpd or twisted.mail), one process."""

    def __init__(self, name: str, script: str) -> None:
        self.name = name
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / script), "127.0.0.1", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_listening(self.port, proc=self.proc)
        except RuntimeError:
            err = self.proc.stderr.read() if self.proc.stderr is not None else b""
            raise RuntimeError(f"{name}: {err.decode(errors='replace')}") from None

    def pid(self) -> int | None:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)
