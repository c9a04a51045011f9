"""A network namespace that owns the whole fake pod range, so fake pods can be reached for real.

kwok hands out pod IPs from POD_CIDR but nothing listens there. This namespace makes every address of the
range local (a `local` route on its loopback), and the host routes the range into it over a veth pair. A test
server started with `ip netns exec NAME ...` can then bind to a pod's IP, and a router in the host namespace
reaches it at the address the EndpointSlice lists. A pod CIDR inside 127.0.0.0/8 would be simpler but the
EndpointSlice controller rejects loopback addresses.

Names carry the owning process id, so a namespace left by a killed run is recognised and removed by the next.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

from .errors import StartError

POD_CIDR = "198.18.0.0/16"
# Link-local addresses for the two veth ends: only ever used as the next hop, never as a traffic target.
_HOST_ADDR = "169.254.218.1"
_NS_ADDR = "169.254.218.2"
_PREFIX = "tgpods-"


@dataclass(frozen=True)
class PodNetwork:
    name: str
    host_if: str
    cidr: str = POD_CIDR

    def cmd(self, argv: list[str]) -> list[str]:
        """Prefix a command so that it runs inside the namespace (and may bind pod IPs)."""
        return ["ip", "netns", "exec", self.name, *argv]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise StartError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def available() -> tuple[bool, str]:
    """Whether this process can create network namespaces (root and iproute2), and if not, why."""
    if os.geteuid() != 0:
        return False, "creating the pod network namespace needs root"
    try:
        subprocess.run(["ip", "-V"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return False, "iproute2 (`ip`) is not installed"
    return True, ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove(name: str, cidr: str = POD_CIDR) -> None:
    """Remove a namespace, its veth pair and the host route; quietly skips what is already gone."""
    host_if = "tgh" + name[len(_PREFIX) :]
    _ip("route", "del", cidr, "dev", host_if, check=False)
    _ip("link", "del", host_if, check=False)  # deleting one end of a veth pair removes both
    _ip("netns", "del", name, check=False)


def reap_stale() -> list[str]:
    """Remove namespaces left by runs whose process is gone (killed with SIGKILL, a crashed CI job)."""
    proc = _ip("netns", "list", check=False)
    removed = []
    for line in proc.stdout.splitlines():
        m = re.match(rf"^({_PREFIX}(\d+)[a-z]*)\b", line.strip())
        if m and not _pid_alive(int(m.group(2))):
            # The host route goes with the veth device; any CIDR is fine to name here.
            remove(m.group(1))
            removed.append(m.group(1))
    return removed


def create(owner_pid: int | None = None, cidr: str = POD_CIDR, tag: str = "") -> PodNetwork:
    """Make the namespace for `cidr`. `tag` (a few lowercase letters) lets one process own several namespaces,
    e.g. a unit test's beside the session cluster's."""
    ok, why = available()
    if not ok:
        raise StartError(why)
    if not re.fullmatch(r"[a-z]{0,3}", tag):
        raise ValueError(f"tag must be 0-3 lowercase letters, got {tag!r}")
    reap_stale()
    pid = owner_pid or os.getpid()
    name = f"{_PREFIX}{pid}{tag}"
    host_if, ns_if = f"tgh{pid}{tag}", f"tgn{pid}{tag}"  # interface names are limited to 15 characters
    remove(name, cidr)
    existing = _ip("route", "show", "exact", cidr).stdout.strip()
    if existing:
        raise StartError(f"another route for {cidr} exists on this host (another dev cluster running?): {existing}")
    try:
        _ip("netns", "add", name)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", name)
        _ip("addr", "add", f"{_HOST_ADDR}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", name, "addr", "add", f"{_NS_ADDR}/30", "dev", ns_if)
        _ip("-n", name, "link", "set", ns_if, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "route", "add", "local", cidr, "dev", "lo")
        _ip("route", "add", cidr, "via", _NS_ADDR, "dev", host_if)
    except StartError:
        remove(name, cidr)
        raise
    return PodNetwork(name=name, host_if=host_if, cidr=cidr)
