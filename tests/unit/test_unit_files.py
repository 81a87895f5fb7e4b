"""systemd/sluice.service and systemd/hardening.conf: parsed, verified, and their sandbox exercised.

* The files are parsed here and the settings the daemon relies on are checked, including that
  they agree with the config defaults (socket in the RuntimeDirectory, stop timeout above the
  drain deadline).
* ``systemd-analyze verify`` checks them as systemd would load them (unit plus drop-in), and
  ``systemd-analyze security --offline`` bounds the exposure score. Skipped where systemd is not
  installed (Debian: ``apt-get install -y systemd``; no running systemd is needed).
* The daemon's dependencies are run under the two restrictions that could break them:
  MemoryDenyWriteExecute (emulated with the kernel's PR_SET_MDWE) and the system call filter
  (the same allow-list installed with libseccomp).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from daemon.config import DEFAULT_CONFIG_PATH, DaemonSettings

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "sluice.service"
DROPIN = ROOT / "systemd" / "hardening.conf"
EXEC = "/opt/sluice/bin/sluice"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file as {section: {key: [values in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], defaultdict(list))
            continue
        assert current is not None, f"{path.name}:{lineno}: key outside a section"
        assert "=" in line, f"{path.name}:{lineno}: not KEY=VALUE: {raw!r}"
        assert not line.endswith("\\"), f"{path.name}:{lineno}: continuation lines are not used"
        key, _, value = line.partition("=")
        current[key.strip()].append(value.strip())
    return sections


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit or "s"]
    return total


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key)
    assert values, f"{key}= missing"
    assert len(values) == 1, f"{key}= set {len(values)} times"
    return values[0]


# ---------------------------------------------------------------------------------------------
# Parsed settings.


def test_service_settings() -> None:
    unit = parse_unit(UNIT)
    assert set(unit) == {"Unit", "Service", "Install"}
    assert one(unit["Install"], "WantedBy") == "multi-user.target"
    svc = unit["Service"]
    assert one(svc, "Type") == "notify"
    assert one(svc, "NotifyAccess") == "main"
    assert one(svc, "Restart") == "on-failure"
    assert 0 < seconds(one(svc, "RestartSec")) <= 10
    assert one(svc, "RestartPreventExitStatus") == "78"  # EX_CONFIG: a bad config does not loop
    assert one(svc, "User") == "sluice" and one(svc, "Group") == "sluice"
    assert "DynamicUser" not in svc
    assert one(svc, "RuntimeDirectory") == "sluice"
    assert one(svc, "RuntimeDirectoryMode") in ("0750", "0755")
    assert one(svc, "RuntimeDirectoryPreserve") == "restart"
    assert seconds(one(svc, "WatchdogSec")) == 10
    assert int(one(svc, "LimitNOFILE")) >= 65536
    assert one(svc, "KillMode") == "mixed"
    assert one(svc, "ExecReload") == "/bin/kill -HUP $MAINPID"


def test_service_agrees_with_config_defaults() -> None:
    svc = parse_unit(UNIT)["Service"]
    env = dict(v.split("=", 1) for v in svc["Environment"])
    assert env["SLUICE_CONFIG"] == DEFAULT_CONFIG_PATH
    assert one(svc, "ExecStart") == f"{EXEC} run --config ${{SLUICE_CONFIG}}"
    daemon = DaemonSettings()
    # The default socket (and the arenas beside it) live in the RuntimeDirectory systemd makes.
    assert os.path.dirname(daemon.socket_path) == "/run/" + one(svc, "RuntimeDirectory")
    assert daemon.runtime_path() == "/run/sluice"
    # systemd must not kill the daemon before its own drain deadline has passed.
    drain = daemon.shutdown_timeout_ms / 1000
    assert seconds(one(svc, "TimeoutStopSec")) >= drain + 15


def test_example_config_is_referenced() -> None:
    assert (ROOT / "systemd" / "sluice.toml").exists()
    doc = (ROOT / "docs" / "OPERATIONS.md").read_text()
    for needle in ("systemd/sluice.toml", "/etc/sluice/sluice.toml", "hardening.conf",
                   "journalctl", "systemctl reload", "allowed_uids", "metrics_port"):
        assert needle in doc, f"docs/OPERATIONS.md does not mention {needle}"


REQUIRED_HARDENING = {
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "NoNewPrivileges": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "MemoryDenyWriteExecute": "yes",
    "UMask": "0077",
    "RemoveIPC": "yes",
    # SO_PEERCRED would read every client as nobody inside a user namespace.
    "PrivateUsers": "no",
}


def test_hardening_settings() -> None:
    dropin = parse_unit(DROPIN)
    assert set(dropin) == {"Service"}
    svc = dropin["Service"]
    for key, want in REQUIRED_HARDENING.items():
        assert one(svc, key) == want, f"{key}={one(svc, key)!r}, want {want!r}"
    assert svc["SystemCallFilter"][0] == "@system-service"
    assert all(v.startswith("~") for v in svc["SystemCallFilter"][1:]), "denials after the allow-list"


def test_unit_and_dropin_do_not_overlap() -> None:
    """A key in both files would make the drop-in silently override (or append to) the unit."""
    unit = parse_unit(UNIT)["Service"]
    dropin = parse_unit(DROPIN)["Service"]
    assert not set(unit) & set(dropin)


def test_every_setting_group_is_commented() -> None:
    """Each blank-line-separated group of settings starts with a comment saying why."""
    for path in (UNIT, DROPIN):
        blocks = path.read_text().split("\n\n")
        for block in blocks:
            # Description= explains itself; any other setting needs a comment above it.
            lines = [ln for ln in block.strip().splitlines()
                     if not ln.startswith(("[", "Description="))]
            if any("=" in ln and not ln.startswith("#") for ln in lines):
                assert lines[0].startswith("#"), f"{path.name}: uncommented group:\n{block}"


# ---------------------------------------------------------------------------------------------
# systemd-analyze.

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not installed (Debian: apt-get install -y systemd)")


def _install(tmp_path: Path, dropin_text: str | None = None) -> Path:
    """Lay the unit out as systemd would find it, with ExecStart pointing at a real binary."""
    unit = tmp_path / "sluice.service"
    unit.write_text(UNIT.read_text().replace(EXEC, sys.executable))
    (tmp_path / "sluice.service.d").mkdir()
    (tmp_path / "sluice.service.d" / "hardening.conf").write_text(
        DROPIN.read_text() if dropin_text is None else dropin_text)
    return unit


def _verify(unit: Path) -> tuple[int, list[str]]:
    proc = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    out = (proc.stdout + proc.stderr).splitlines()
    # Only lines about our files: a host may carry unrelated broken units.
    ours = [ln for ln in out if str(unit.parent) in ln or "sluice.service" in ln]
    return proc.returncode, ours


@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    rc, complaints = _verify(_install(tmp_path))
    assert complaints == [] and rc == 0, "\n".join(complaints)


@needs_analyze
def test_systemd_analyze_reads_the_dropin(tmp_path: Path) -> None:
    """The check above would be hollow if the drop-in were not loaded: break it and see."""
    broken = DROPIN.read_text().replace("ProtectSystem=strict", "ProtectSystem=bogus")
    rc, complaints = _verify(_install(tmp_path, broken))
    assert any("hardening.conf" in ln and "bogus" in ln for ln in complaints), complaints


@needs_analyze
def test_security_exposure(tmp_path: Path) -> None:
    unit = _install(tmp_path)
    proc = subprocess.run([ANALYZE, "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0"})
    if "--offline" in proc.stderr and proc.returncode != 0:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    match = re.search(r"Overall exposure level for sluice\.service: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr
    # 1.5 when written (0 = fully locked down, 10 = none). The rest is what a Kafka producer
    # needs: the network, Unix sockets, other users as clients.
    assert float(match.group(1)) <= 2.0, proc.stdout


# ---------------------------------------------------------------------------------------------
# The dependencies under the sandbox's two riskiest restrictions.

EXERCISE = r'''
import ctypes, ctypes.util, os, sys

mode = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)

if mode == "mdwe":
    PR_SET_MDWE, MDWE_REFUSE_EXEC_GAIN = 65, 1
    if libc.prctl(PR_SET_MDWE, MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        print("SKIP: kernel has no PR_SET_MDWE (Linux >= 6.3)")
        sys.exit(77)
    import mmap
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        print("FAIL: W+X mapping allowed, the restriction is not active")
        sys.exit(1)
    except OSError:
        pass
elif mode == "mdwe-seccomp":
    # systemd 252's MemoryDenyWriteExecute=: a seccomp filter refusing mmap with PROT_WRITE and
    # PROT_EXEC together, and any mprotect/pkey_mprotect adding PROT_EXEC, and shmat(SHM_EXEC).
    class Cmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]
    seccomp = ctypes.CDLL(ctypes.util.find_library("seccomp"), use_errno=True)
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    seccomp.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(Cmp)]
    seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
    SCMP_ACT_ALLOW, SCMP_ACT_ERRNO_EPERM, MASKED_EQ = 0x7FFF0000, 0x00050000 | 1, 7
    PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
    if libc.prctl(38, 1, 0, 0, 0) != 0:
        sys.exit("no_new_privs failed")
    ctx = seccomp.seccomp_init(SCMP_ACT_ALLOW)
    for name, mask, value in (("mmap", PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC),
                              ("mprotect", PROT_EXEC, PROT_EXEC),
                              ("pkey_mprotect", PROT_EXEC, PROT_EXEC),
                              ("shmat", SHM_EXEC, SHM_EXEC)):
        cmp = Cmp(2, MASKED_EQ, mask, value)
        nr = seccomp.seccomp_syscall_resolve_name(name.encode())
        if seccomp.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO_EPERM, nr, 1, ctypes.byref(cmp)):
            sys.exit(f"rule for {name} refused")
    if seccomp.seccomp_load(ctx) != 0:
        sys.exit("seccomp_load failed")
    import mmap
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        print("FAIL: W+X mapping allowed, the filter is not active")
        sys.exit(1)
    except OSError:
        pass
elif mode == "seccomp":
    allowed = sys.argv[2].split(",")
    seccomp = ctypes.CDLL(ctypes.util.find_library("seccomp"), use_errno=True)
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    seccomp.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                         ctypes.c_uint]
    seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
    SCMP_ACT_ALLOW, SCMP_ACT_ERRNO_EPERM = 0x7FFF0000, 0x00050000 | 1
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, as NoNewPrivileges=yes
        sys.exit("no_new_privs failed")
    ctx = seccomp.seccomp_init(SCMP_ACT_ERRNO_EPERM)
    for name in allowed:
        nr = seccomp.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:
            seccomp.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0)
    if seccomp.seccomp_load(ctx) != 0:
        sys.exit("seccomp_load failed")
    try:
        os.setuid(os.getuid())  # in @privileged: must now be refused
        print("FAIL: setuid allowed, the filter is not active")
        sys.exit(1)
    except PermissionError:
        pass

# What the daemon does: the same calls, through the same libraries.
import asyncio, fcntl, mmap, signal, socket, struct, subprocess, tempfile
import uvloop, msgspec, crc32c, cramjam, psutil, prometheus_client
from daemon import metrics, peercred, systemd

fd = os.memfd_create("seg", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
os.ftruncate(fd, 1 << 20)
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
seg = mmap.mmap(fd, 1 << 20)
struct.pack_into("<Q", seg, 0, 42)
efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
os.eventfd_write(efd, 1)
assert os.eventfd_read(efd) == 1
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
socket.send_fds(a, [b"x"], [fd])
_, fds, _, _ = socket.recv_fds(b, 16, 1)
assert struct.unpack_from("<Q", mmap.mmap(fds[0], 1 << 20), 0)[0] == 42
assert peercred.peer_credentials(a)[0] == os.getpid()
assert peercred.check_peer(a, [os.getuid()], []) is None
assert peercred.peer_groups(a) is not None
os.sched_setaffinity(0, os.sched_getaffinity(0))
p = psutil.Process()
assert p.memory_info().rss > 0 and p.cpu_times().user >= 0 and p.cpu_affinity()
assert crc32c.crc32c(b"123456789") == 0xE3069283
data = bytes(range(256)) * 400
for codec in (cramjam.gzip, cramjam.snappy, cramjam.lz4, cramjam.zstd):
    assert bytes(codec.decompress(codec.compress(data))) == data
assert msgspec.msgpack.decode(msgspec.msgpack.encode({"k": [1, 2]})) == {"k": [1, 2]}
pid = os.fork()
if pid == 0:
    os._exit(7)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7
assert subprocess.run([sys.executable, "-c", "print(6*7)"], capture_output=True,
                      text=True).stdout.strip() == "42"

notify_dir = tempfile.mkdtemp()
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
notify.bind(notify_dir + "/n")
os.environ["NOTIFY_SOCKET"] = notify_dir + "/n"

async def main():
    loop = asyncio.get_running_loop()
    hup = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.wait_for(hup.wait(), 5)
    async with metrics.MetricsServer(lambda: {"workers": {"0": {"records_in": 5}}}) as srv:
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        body = await asyncio.wait_for(r.read(), 5)
        w.close()
        await w.wait_closed()
    assert b'sluice_records_in_total{worker="0"} 5.0\n' in body, body
    assert systemd.ready("ok")

uvloop.run(main())
assert notify.recv(100) == b"READY=1\nSTATUS=ok"
print("OK")
'''


def _run_exercise(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "exercise.py"
    script.write_text(EXERCISE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env)


def test_dependencies_without_writable_executable_memory(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes as newer kernels enforce it (PR_SET_MDWE, Linux >= 6.3)."""
    proc = _run_exercise(tmp_path, "mdwe")
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_dependencies_under_systemd_252_write_execute_filter(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes as Debian 12's systemd enforces it: a seccomp filter."""
    import ctypes.util

    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp not installed (it comes with systemd on Debian)")
    proc = _run_exercise(tmp_path, "mdwe-seccomp")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def _expand_syscall_groups() -> dict[str, set[str]]:
    out = subprocess.run([ANALYZE, "syscall-filter"], capture_output=True, text=True,
                         timeout=30).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif not line.strip() or line.startswith("#"):
            current = None
        elif current is not None and not line.strip().startswith("#"):
            current.append(line.strip())

    def expand(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        result: set[str] = set()
        for item in groups.get(name, ()):
            if item.startswith("@"):
                if item not in seen:
                    result |= expand(item, seen | {name})
            else:
                result.add(item)
        return result

    return {name: expand(name) for name in groups}


@needs_analyze
def test_dependencies_under_the_system_call_filter(tmp_path: Path) -> None:
    """SystemCallFilter=@system-service ~@privileged, installed with libseccomp as systemd would."""
    import ctypes.util

    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp not installed (it comes with systemd on Debian)")
    groups = _expand_syscall_groups()
    filters = parse_unit(DROPIN)["Service"]["SystemCallFilter"]
    allowed: set[str] = set()
    for entry in filters:
        for name in entry.lstrip("~").split():
            members = groups[name] if name.startswith("@") else {name}
            if entry.startswith("~"):
                allowed -= members
            else:
                allowed |= members
    assert "memfd_create" in allowed and "setuid" not in allowed
    proc = _run_exercise(tmp_path, "seccomp", ",".join(sorted(allowed)))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
