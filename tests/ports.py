"""TCP ports for test daemons that must be told their port in advance (slurmctld, slurmd, launch.master_port),
reserved outside the kernel's ephemeral range and claimed per process: no pick-by-binding-port-0 race."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile
from pathlib import Path

_HELD_PORTS: dict[int, object] = {}  # port -> its open, flock-ed claim file: held for the life of this process


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999  # the Linux default
    return lo, hi


def _bindable(port: int) -> bool:
    """Nothing listens on the port now, on any address (no SO_REUSEADDR: TIME_WAIT leftovers count as taken)."""
    for family, addr in ((socket.AF_INET, ""), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 here
            continue
        try:
            s.bind((addr, port))
        except OSError as e:
            if family == socket.AF_INET or e.errno == errno.EADDRINUSE:
                return False
            # IPv6 present but unusable here (no :: address): the IPv4 answer stands
        finally:
            s.close()
    return True


def reserve_ports(n: int) -> list[int]:
    """n TCP ports for daemons and test jobs that must be told their port in advance (slurmctld, slurmd,
    launch.master_port), without the pick-by-binding-port-0-and-closing race: a port the kernel handed out and
    got back can be handed to any concurrent port-0 bind (another xdist worker's TCPStore, a gloo pair) before
    our daemon binds it (EADDRINUSE).

    - Only ports OUTSIDE the kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range) are candidates:
      port-0 binds are only ever given ports inside it, so no concurrent test can be handed one of ours.
    - Each candidate is bindable right now (nothing else uses it) and claimed with a flock on a per-port file, held
      until this process exits: another pytest run (or xdist worker) on this machine skips it, and this process
      never hands the same port out twice.
    - Candidates start at an offset derived from the pid, so concurrent runs rarely even try the same ports.
    Ports below 10000 are left alone (many services have fixed ports there). The (empty) claim files stay in
    $TMPDIR/unidiff-test-ports-<uid> and are reused; a claim ends with its process, whatever way it exits."""
    lo, hi = _ephemeral_range()
    pool = [p for p in range(10000, 65536) if not lo <= p <= hi]
    claims = Path(tempfile.gettempdir()) / f"unidiff-test-ports-{os.getuid()}"
    claims.mkdir(exist_ok=True)
    ports: list[int] = []
    start = os.getpid() * 97 % max(len(pool), 1)
    for i in range(len(pool)):
        port = pool[(start + i) % len(pool)]
        if port in _HELD_PORTS:
            continue
        f = open(claims / str(port), "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # claimed by another live process
            f.close()
            continue
        if not _bindable(port):
            f.close()
            continue
        _HELD_PORTS[port] = f
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"found {len(ports)} of {n} free TCP ports in 10000-65535 outside the ephemeral range "
                       f"{lo}-{hi} (/proc/sys/net/ipv4/ip_local_port_range): narrow that range to leave ports for "
                       "fixed-port test daemons")
