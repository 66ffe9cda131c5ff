"""What a single-node run listens on: loopback only, except Ray's token-authenticated servers.

The end-to-end tests start real runs (a torchrun SFT stage, a main_ppo GRPO step) with the
environment the pipeline gives them, poll the listening sockets of the run's whole process tree
while it runs, and fail on any socket reachable from another machine that is not Ray's GCS or
raylet (both refuse a request without the cluster's token: checked with a raw gRPC call).
docs/security.md lists the sockets and why each is where it is.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conrec_verl.runtime.cpu_env import cpu_env, loopback_env, torchrun_cmd
from conrec_verl.runtime.loopback import loopback_address

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "recipes" / "conrec" / "config"

#: processes whose non-loopback sockets are allowed: Ray's gRPC servers with token authentication
RAY_AUTHENTICATED = ("gcs_server", "raylet")


# -- what a process tree listens on ---------------------------------------------------------------
def listening_sockets(root_pid: int) -> set[tuple[str, str, int]]:
    """``{(process name, ip, port)}`` of every listening TCP socket and bound UDP socket of the
    process ``root_pid`` and its descendants (processes that ended meanwhile are skipped)."""
    found: set[tuple[str, str, int]] = set()
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            name = proc.name()
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
                    found.add((name, c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return found


def is_loopback(ip: str) -> bool:
    ip = ip.split("%")[0]
    if ip.startswith("::ffff:"):  # an IPv4 address on a dual-stack socket
        ip = ip[len("::ffff:"):]
    return ipaddress.ip_address(ip).is_loopback


def exposed(sockets, allowed=RAY_AUTHENTICATED) -> list[tuple[str, str, int]]:
    """The sockets another machine could reach, less those of ``allowed`` processes."""
    return sorted(s for s in sockets if not is_loopback(s[1]) and s[0] not in allowed)


def poll_while_running(proc: subprocess.Popen, timeout: float, on_poll=None) -> set:
    """Every socket seen in ``proc``'s tree, sampled every 0.3 s until it exits."""
    seen: set = set()
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"run did not finish in {timeout:.0f} s")
        now = listening_sockets(proc.pid)
        seen |= now
        if on_poll is not None:
            on_poll(now)
        time.sleep(0.3)
    return seen


# -- the checker can fail ---------------------------------------------------------------------------
def test_checker_flags_a_socket_on_every_interface():
    code = ("import socket, sys, time; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(1); "
            "t = socket.socket(); t.bind(('127.0.0.1', 0)); t.listen(1); print('ok', flush=True); time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ok"
        socks = listening_sockets(child.pid)
        assert len(socks) == 2
        bad = exposed(socks)
        assert len(bad) == 1 and bad[0][1] == "0.0.0.0"
        assert exposed({("gcs_server", "::", 1)}) == [] and exposed({("ray::Foo", "::", 1)}) != []
    finally:
        child.kill()
        child.wait()


# -- the settings ------------------------------------------------------------------------------------
def test_loopback_env_binds_ray_and_gloo_to_loopback_and_keeps_token_auth(monkeypatch):
    for var in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "GLOO_SOCKET_IFNAME"):
        monkeypatch.delenv(var, raising=False)
    env = cpu_env()
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and env["GLOO_SOCKET_IFNAME"] in ("lo", "lo0")
    assert "RAY_AUTH_MODE" not in env  # token auth stays Ray's default
    # a cluster address: the driver must stay reachable, so Ray's node IP is left alone
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in loopback_env()
    # the user's value wins
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    assert loopback_env()["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"


def test_torchrun_cmd_is_single_node_on_loopback():
    cmd = torchrun_cmd(2)
    assert cmd[:3] == [sys.executable, "-m", "conrec_verl.runtime.torchrun"]
    assert {"--standalone", "--nnodes=1", "--local-addr=127.0.0.1", "--nproc_per_node=2"} <= set(cmd)


def test_loopback_address():
    assert loopback_address("localhost") == "127.0.0.1"
    assert loopback_address("127.0.0.1") == "127.0.0.1" and loopback_address("[::1]") == "::1"
    assert loopback_address("10.1.2.3") is None and loopback_address("node-7") is None


_STORE_PROBE = r"""
import datetime, json, os, sys, psutil
import torch.distributed as dist
from conrec_verl.runtime.loopback import install_loopback_tcpstore
install_loopback_tcpstore()
install_loopback_tcpstore()  # idempotent
for name in ("torch.distributed.rendezvous", "torch.distributed.elastic.rendezvous.c10d_rendezvous_backend"):
    assert sys.modules[name].TCPStore is dist.TCPStore, name
out = {}
for host in ("127.0.0.1", "localhost"):
    for libuv in (True, False):
        server = dist.TCPStore(host, 0, 1, True, timeout=datetime.timedelta(seconds=10), use_libuv=libuv)
        client = dist.TCPStore(host, server.port, 1, False, timeout=datetime.timedelta(seconds=10))
        client.set("k", "v")
        assert server.get("k") == b"v" and isinstance(server, dist.TCPStore)
        ips = [c.laddr.ip for c in psutil.Process().net_connections("inet")
               if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port]
        out[f"{host}/{libuv}"] = ips
        del client, server
print(json.dumps(out))
"""


def test_tcpstore_master_on_a_loopback_host_listens_on_loopback_only():
    """torch 2.13's TCPStore listens on every interface whatever its host; patched, a master
    store whose clients use a loopback host listens there only, and still serves them."""
    import json

    proc = subprocess.run([sys.executable, "-c", _STORE_PROBE], capture_output=True, text=True, timeout=120,
                          cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(found) == 4
    for key, ips in found.items():
        assert ips == ["127.0.0.1"], f"{key}: store listens on {ips}"


# -- real runs ------------------------------------------------------------------------------------
def _run_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "GLOO_SOCKET_IFNAME")}
    env.update(cpu_env())
    return env


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    from conrec_verl.model_builder import save_tiny_model
    from conrec_verl.smoke import write_smoke_dataset

    root = tmp_path_factory.mktemp("sec_smoke")
    write_smoke_dataset(root / "data", sid_sizes=(16, 16, 16))
    save_tiny_model(root / "model", (16, 16, 16))
    return root


@pytest.mark.slow
def test_sft_stage_listens_on_loopback_only(smoke_dir, tmp_path):
    """The pipeline's SFT launcher: torchrun's stores and gloo on loopback (stock torchrun: two
    stores on ``::``)."""
    import pandas as pd

    rows = [{"messages": [{"role": "user", "content": "recommend <a_1><b_2><c_3>"},
                          {"role": "assistant", "content": f"<a_{i % 16}><b_{3 * i % 16}><c_{5 * i % 16}>"}]}
            for i in range(64)]
    pd.DataFrame(rows).to_parquet(tmp_path / "sft.parquet")
    cmd = [*torchrun_cmd(1), "-m", "verl.trainer.sft_trainer", "--config-path", str(CONFIG_DIR),
           "--config-name", "sft_cpu_tiny", f"model.path={smoke_dir / 'model'}",
           f"data.train_files={tmp_path / 'sft.parquet'}", "trainer.total_training_steps=2",
           f"trainer.default_local_dir={tmp_path / 'ckpt'}"]
    log = open(tmp_path / "sft.log", "w")
    proc = subprocess.Popen(cmd, env=_run_env(), cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
    seen = poll_while_running(proc, timeout=300)
    log.close()
    out = (tmp_path / "sft.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    assert sum(name == "pt_elastic" for name, _, _ in seen) >= 2, f"torchrun's stores not seen: {sorted(seen)}"
    assert exposed(seen, allowed=()) == [], f"reachable from other machines: {exposed(seen, allowed=())}"


def _gcs_call(address: str, token: str | None):
    """One GCS request (``GetAllNodeInfo``) with or without the cluster's token; the gRPC status."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


def _ray_token() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip()


@pytest.mark.slow
def test_grpo_run_listens_on_loopback_or_ray_token_auth(smoke_dir, tmp_path):
    """One GRPO step of stock main_ppo with cpu_env(): the transfer queue, Ray's agents, the FSDP
    process-group store and gloo on loopback; Ray's GCS refuses a client without the token."""
    import grpc

    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(CONFIG_DIR),
           "--config-name", "smoke_cpu", f"smoke_dir={smoke_dir}", "trainer.total_training_steps=1",
           "trainer.save_freq=-1", "trainer.test_freq=-1", "trainer.val_before_train=false",
           f"trainer.default_local_dir={tmp_path / 'ckpt'}"]
    auth: dict = {}

    def check_auth(now):
        gcs = [port for name, _, port in now if name == "gcs_server"]
        if gcs and "without" not in auth and any(n.startswith("ray::TransferQueue") for n, _, _ in now):
            address = f"127.0.0.1:{gcs[0]}"
            auth["without"] = _gcs_call(address, None)
            auth["with"] = _gcs_call(address, _ray_token())

    log = open(tmp_path / "grpo.log", "w")
    proc = subprocess.Popen(cmd, env=_run_env(), cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
    seen = poll_while_running(proc, timeout=420, on_poll=check_auth)
    log.close()
    out = (tmp_path / "grpo.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "step:1 " in out
    names = {name for name, _, _ in seen}
    # the run was sampled while its servers were up
    assert {"gcs_server", "raylet", "ray::TransferQueueController", "ray::SimpleStorageUnit"} <= names, sorted(names)
    assert exposed(seen) == [], f"reachable from other machines: {exposed(seen)}"
    # Ray's token authentication is on: a stranger is refused, the token holder is served
    assert auth.get("without") == grpc.StatusCode.UNAUTHENTICATED, auth
    assert auth.get("with") == grpc.StatusCode.OK, auth


def test_preflight_refuses_a_cluster_address_with_the_loopback_setting(monkeypatch):
    from omegaconf import OmegaConf

    from conrec_verl.runtime.preflight import ConfigError, check_ray_address

    cfg = OmegaConf.create({"ray_kwargs": {"ray_init": {"address": "10.0.0.1:6379"}}})
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with pytest.raises(ConfigError, match="RAY_ADDRESS"):
        check_ray_address(cfg)
    check_ray_address(OmegaConf.create({"ray_kwargs": {"ray_init": {"num_cpus": 4}}}))  # single node: fine
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    check_ray_address(cfg)
