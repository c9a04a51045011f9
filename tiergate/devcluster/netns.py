"""A network namespace that owns a cluster's fake pod range, so fake pods can be reached for real.

kwok hands out pod IPs from the cluster's pod CIDR but nothing listens there. This namespace makes every address
of that range local (a `local` route on its loopback), and the host routes the range into it over a veth pair. A
test
server started with `ip netns exec NAME ...` can then bind to a pod's IP, and a router in the host namespace
reaches it at the address the EndpointSlice lists. A pod CIDR inside 127.0.0.0/8 would be simpler but the
EndpointSlice controller rejects loopback addresses.

Every cluster gets its own /20 slice of POD_CIDR (4094 pod IPs), so several clusters can run on one host at once
(two terminals, parallel test sessions); each slice has its own /30 of link-local addresses for the veth pair.
Names carry the owning process id, so a namespace left by a killed run is recognised and removed by the next.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import subprocess
from dataclasses import dataclass

from .errors import StartError

POD_CIDR = "198.18.0.0/16"
SLICE_PREFIX = 20
# Link-local /30s for the veth ends, one per slice: only ever used as the next hop, never as a traffic target.
_LINK_NET = ipaddress.IPv4Network("169.254.218.0/24")
_PREFIX = "tgpods-"


@dataclass(frozen=True)
class PodNetwork:
    name: str
    host_if: str
    cidr: str = POD_CIDR

    def cmd(self, argv: list[str]) -> list[str]:
        """Prefix a command so that it runs inside the namespace (and may bind pod IPs)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def host_address(self) -> str:
        """The host end's address of the veth pair: where a process on the host listens to be reached from inside
        the namespace (a relay at a pod IP forwards there: `tiergate.devcluster.relay`)."""
        out = _ip("-4", "-o", "addr", "show", "dev", self.host_if).stdout
        m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
        if m is None:
            raise StartError(f"{self.host_if} has no IPv4 address")
        return m.group(1)

    def host_local_address(self, ip: str) -> None:
        """Make one address of this slice local to the host namespace instead (a /32 `local` route, which wins
        over the route into the namespace), so that a process on the host binds it. For what must run beside the
        API server yet be reached at an address an EndpointSlice accepts: an extension API server (the API server
        refuses loopback endpoints), or a router "pod" that Prometheus discovers by its pod IP."""
        if ipaddress.ip_address(ip) not in ipaddress.ip_network(self.cidr):
            raise StartError(f"{ip} is not in this cluster's pod slice {self.cidr}")
        _ip("route", "replace", "local", f"{ip}/32", "dev", "lo", "table", "local")

    def drop_host_local_address(self, ip: str) -> None:
        _ip("route", "del", "local", f"{ip}/32", "dev", "lo", "table", "local", check=False)


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


def _routed_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for line in _ip("route", "show").stdout.splitlines():
        word = line.split()[0] if line.strip() else ""
        try:
            nets.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue  # "default" and the like
    return [n for n in nets if isinstance(n, ipaddress.IPv4Network)]


def free_slices() -> list[tuple[int, ipaddress.IPv4Network]]:
    """The slices of POD_CIDR that no route on this host overlaps yet, with their index."""
    taken = _routed_networks()
    slices = ipaddress.IPv4Network(POD_CIDR).subnets(new_prefix=SLICE_PREFIX)
    return [(i, s) for i, s in enumerate(slices) if not any(s.overlaps(t) for t in taken)]


def create(owner_pid: int | None = None, tag: str = "") -> PodNetwork:
    """Make a namespace owning a free slice of the pod range. `tag` (up to 3 lowercase letters) lets one process
    own several namespaces, e.g. a unit test's beside the session cluster's."""
    ok, why = available()
    if not ok:
        raise StartError(why)
    if not re.fullmatch(r"[a-z]{0,3}", tag):
        raise ValueError(f"tag must be 0-3 lowercase letters, got {tag!r}")
    reap_stale()
    pid = owner_pid or os.getpid()
    name = f"{_PREFIX}{pid}{tag}"
    remove(name)
    # Another process may take the same slice between our look and our `route add`: try the next one then.
    for index, net in free_slices():
        try:
            return _create_in_slice(name, pid, tag, index, net)
        except StartError:
            remove(name, str(net))
            if net not in [s for _, s in free_slices()]:
                continue
            raise
    raise StartError(f"no free /{SLICE_PREFIX} slice of {POD_CIDR} left on this host (too many dev clusters?)")


def _drop_stale_host_addresses(net: ipaddress.IPv4Network) -> None:
    """Host addresses (PodNetwork.host_address) inside a slice nobody holds were left by a killed run; they would
    hijack the new owner's pod IPs."""
    for line in _ip("route", "show", "table", "local").stdout.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "local":
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(words[1].split("/")[0]) in net:
                    _ip("route", "del", "local", words[1], "table", "local", check=False)


def _create_in_slice(name: str, pid: int, tag: str, index: int, net: ipaddress.IPv4Network) -> PodNetwork:
    cidr = str(net)
    _drop_stale_host_addresses(net)
    host_if, ns_if = f"tgh{pid}{tag}", f"tgn{pid}{tag}"  # interface names are limited to 15 characters
    link = list(_LINK_NET.subnets(new_prefix=30))[index]
    host_addr, ns_addr = (str(a) for a in list(link.hosts())[:2])
    _ip("netns", "add", name)
    _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
    _ip("link", "set", ns_if, "netns", name)
    _ip("addr", "add", f"{host_addr}/30", "dev", host_if)
    _ip("link", "set", host_if, "up")
    _ip("-n", name, "addr", "add", f"{ns_addr}/30", "dev", ns_if)
    _ip("-n", name, "link", "set", ns_if, "up")
    _ip("-n", name, "link", "set", "lo", "up")
    _ip("-n", name, "route", "add", "local", cidr, "dev", "lo")
    _ip("route", "add", cidr, "via", ns_addr, "dev", host_if)
    return PodNetwork(name=name, host_if=host_if, cidr=cidr)
