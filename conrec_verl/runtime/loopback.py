"""Keep the unauthenticated sockets of a single-node run on the loopback interface.

A run's Ray servers are token-authenticated (Ray >= 2.60 enables token auth for every local
``ray.init``); two kinds of sockets are not, and both listened on every interface:

- **torch's TCPStore server** (torchrun's rendezvous and agent stores during SFT, the process-group
  store of verl's FSDP workers during GRPO) binds ``::`` whatever ``host_name`` it is given -- torch
  2.13 has no bind-address option (measured: ``TCPStore("127.0.0.1", 0, is_master=True)`` listens
  on ``:::PORT``). Anyone who can reach the port can read and write the store (the rendezvous state,
  the addresses the ranks dial). :func:`install_loopback_tcpstore` makes a *master* store whose
  clients reach it on a loopback address listen on that address only, through TCPStore's own
  ``master_listen_fd`` argument (a socket we bind). Upstream: an ``addr``/bind option on
  ``torch.distributed.TCPStore`` (and torchrun's stores binding the rendezvous host).
- **verl's transfer queue** (ZMQ ROUTER sockets of ``TransferQueueController`` and
  ``SimpleStorageUnit``) binds Ray's node IP; :mod:`conrec_verl.runtime.cpu_env`'s
  :func:`~conrec_verl.runtime.cpu_env.loopback_env` makes that IP ``127.0.0.1``, and
  :func:`ray_on_loopback` does the same for a ``ray.init`` in a process that imported Ray already.

This module imports only torch (lazily) and Ray (lazily): the torchrun launcher
(:mod:`conrec_verl.runtime.torchrun`) installs it without importing verl.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import sys
from typing import Iterator

_PARAMS = ("host_name", "port", "world_size", "is_master", "timeout", "wait_for_workers", "multi_tenant",
           "master_listen_fd", "use_libuv")

#: modules that bind ``TCPStore`` by name at import (``from torch.distributed import TCPStore``)
_TCPSTORE_IMPORTERS = ("torch.distributed.rendezvous",
                       "torch.distributed.elastic.rendezvous.c10d_rendezvous_backend",
                       "torch.distributed.elastic.rendezvous.static_tcp_rendezvous")


def loopback_address(host: str) -> str | None:
    """The IP to bind for a store its clients reach at ``host``: ``host`` itself if it is a
    loopback IP, ``127.0.0.1`` for ``localhost``, otherwise None (leave the store alone)."""
    host = (host or "").strip().strip("[]")
    if host.lower() == "localhost":
        return "127.0.0.1"
    try:
        return host if ipaddress.ip_address(host).is_loopback else None
    except ValueError:
        return None


def _listen_socket(ip: str, port: int) -> socket.socket | None:
    """A listening socket on ``ip:port`` (port 0 = any), or None if the port is taken (a
    multi-tenant store reusing this process's server on that port)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            return None
        raise
    return sock


def install_loopback_tcpstore() -> None:
    """Replace ``torch.distributed.TCPStore`` (and the names bound to it by torch's rendezvous
    modules) with a subclass whose master store listens on loopback when its host is loopback
    (idempotent; a store on any other host is built unchanged)."""
    import importlib

    import torch.distributed as dist

    original = dist.TCPStore
    if getattr(original, "_conrec_loopback", False):
        return

    class TCPStore(original):
        _conrec_loopback = True

        def __init__(self, *args, **kwargs):
            for name, value in zip(_PARAMS, args):
                if name in kwargs:
                    raise TypeError(f"TCPStore() got multiple values for argument {name!r}")
                kwargs[name] = value
            ip = loopback_address(str(kwargs.get("host_name", "")))
            if kwargs.get("is_master") and kwargs.get("master_listen_fd") is None and ip is not None:
                sock = _listen_socket(ip, int(kwargs.get("port", 0) or 0))
                if sock is not None:
                    kwargs["port"] = sock.getsockname()[1]
                    kwargs["master_listen_fd"] = sock.detach()  # the store's server owns it now
            super().__init__(**kwargs)

    TCPStore.__doc__ = original.__doc__
    TCPStore.__module__ = original.__module__
    dist.TCPStore = TCPStore
    for name in _TCPSTORE_IMPORTERS:
        try:
            module = sys.modules.get(name) or importlib.import_module(name)
        except ImportError:  # pragma: no cover - a torch without that rendezvous
            continue
        if getattr(module, "TCPStore", None) is original:
            module.TCPStore = TCPStore


#: Ray reads this at import (``ray._private.ray_constants.ENABLE_RAY_CLUSTER``); "0" makes a local
#: ``ray.init`` use 127.0.0.1 as its node IP, as on macOS/Windows, so its agents, metrics
#: exporters and every server that binds the node IP (the transfer queue) listen on loopback.
#: (``ray.init(_node_ip_address="127.0.0.1")`` does not: Ray replaces a loopback address by the
#: machine's routable IP.) Upstream: a documented Ray option to bind a single-node cluster to loopback.
RAY_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def ray_on_loopback() -> Iterator[None]:
    """Start a local Ray inside this block to have it listen on 127.0.0.1 (token auth unchanged).

    A value of :data:`RAY_LOCAL_ONLY_ENV` already in the environment wins (e.g. ``1`` to reach
    the cluster from other machines)."""
    if os.environ.get(RAY_LOCAL_ONLY_ENV) is not None:
        yield
        return
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        os.environ.pop(RAY_LOCAL_ONLY_ENV, None)
