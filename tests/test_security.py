"""Security (README "Security"): the control plane is off the client port, client API
keys with limits, the cluster token and mTLS peer allow-list on internal servers,
binds beyond loopback refused without them, the client port's message limit, and
expert digests that keep a server with other weights out."""

from __future__ import annotations

import datetime
import ipaddress
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import HOST, admin_address, channel, expert_servers, gateway, stop
from expert_server.config import ExpertServerConfig
from gateway.config import GatewayConfig
from gateway.launcher import spawn_expert_server, spawn_gateway, wait_ready
from moe_common.auth import ApiKeys
from moe_common.serving import pick_free_port
from moe_common.tls import TlsConfig
from moe_protos.moe.expert.v1 import expert_pb2, expert_pb2_grpc
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc

REQUEST = gateway_pb2.GenerateRequest(prompts=["Who may call?"], parameters=gateway_pb2.GenerationParameters(max_new_tokens=2))


def bearer(key: str):
    return [("authorization", f"Bearer {key}")]


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


# ---------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------


def test_api_keys_match_limit_and_reload(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# clients\nalpha-key\n\nbeta-key\n")
    keys = ApiKeys(path, rate_per_s=2.0, max_concurrent=1)
    assert keys.match(None) is None and keys.match("") is None and keys.match("alpha") is None
    alpha, beta = keys.match("alpha-key"), keys.match("beta-key")
    assert alpha is not None and beta is not None and alpha != beta
    # Concurrency: one in flight per key; keys do not share limits.
    assert keys.acquire(alpha) is None
    assert "in flight" in keys.acquire(alpha)
    assert keys.acquire(beta) is None
    keys.release(alpha)
    # Rate: a burst of 2 (one second's worth), then refused until the bucket refills.
    assert keys.acquire(alpha) is None  # the second token of the burst
    keys.release(alpha)
    assert "rate" in keys.acquire(alpha)
    # Reload: beta revoked, gamma added; an unreadable file keeps the keys.
    path.write_text("alpha-key\ngamma-key\n")
    assert keys.reload() == 2
    assert keys.match("beta-key") is None and keys.match("gamma-key") is not None
    path.unlink()
    assert keys.reload() == 2 and keys.match("gamma-key") is not None


def test_internal_servers_refuse_unauthenticated_binds_beyond_loopback(tmp_path):
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    with pytest.raises(ValueError, match="--cluster-token-file"):
        ExpertServerConfig(model="tiny", host="0.0.0.0")
    ExpertServerConfig(model="tiny", host="0.0.0.0", tls=TlsConfig(insecure=True))
    ExpertServerConfig(model="tiny", host="0.0.0.0", tls=TlsConfig(cluster_token_file=token))
    ExpertServerConfig(model="tiny", host="127.0.0.1")
    with pytest.raises(ValueError, match="admin port"):
        GatewayConfig(model="tiny", expert_servers=["127.0.0.1:1"], admin_host="0.0.0.0")
    # The client port may face clients: only the admin port is held to it.
    GatewayConfig(model="tiny", expert_servers=["127.0.0.1:1"], host="0.0.0.0")
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ValueError, match="shorter than 16"):
        TlsConfig(cluster_token_file=short).cluster_token
    with pytest.raises(ValueError, match="cannot read"):
        TlsConfig(cluster_token_file=tmp_path / "absent").interceptors()


# ---------------------------------------------------------------------------
# The gateway: control plane, API keys, message limits
# ---------------------------------------------------------------------------


def test_client_port_has_no_control_plane(tiny):
    """AddExpertServer / RemoveExpertServer on the client port are UNIMPLEMENTED and
    change nothing; on the admin port they work. With --client-status public the client
    port's GetStatus names no internal address."""
    with expert_servers(tiny, 3) as (addresses, _), \
            gateway(tiny, addresses[:2], ["--client-status", "public"]) as gw:
        client = gateway_pb2_grpc.MembershipServiceStub(channel(gw))
        for call in (lambda: client.RemoveExpertServer(gateway_pb2.RemoveExpertServerRequest(address=addresses[0]),
                                                       timeout=10),
                     lambda: client.AddExpertServer(gateway_pb2.AddExpertServerRequest(address=addresses[2]),
                                                    timeout=10)):
            assert code_of(call)[0] == grpc.StatusCode.UNIMPLEMENTED
        admin_status = gateway_pb2_grpc.GatewayServiceStub(channel(admin_address(gw))).GetStatus(
            gateway_pb2.GetStatusRequest())
        assert [s.address for s in admin_status.servers] == addresses[:2]  # membership unchanged
        public = gateway_pb2_grpc.GatewayServiceStub(channel(gw)).GetStatus(gateway_pb2.GetStatusRequest())
        assert len(public.servers) == 2 and all(not s.address for s in public.servers) and public.healthy
        assert not public.model_source
        # The operator's path: the admin port changes membership.
        admin = gateway_pb2_grpc.MembershipServiceStub(channel(admin_address(gw)))
        change = admin.RemoveExpertServer(gateway_pb2.RemoveExpertServerRequest(address=addresses[1]), timeout=60)
        assert list(change.servers) == addresses[:1]


def test_api_keys_native_oip_health_reload_and_limits(tiny, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("first-key-0123456789\n")
    port, admin_port = pick_free_port(HOST), pick_free_port(HOST)
    address = f"{HOST}:{port}"
    with expert_servers(tiny, 1) as (servers, _):
        proc = spawn_gateway(tiny.path, HOST, port, servers, ["--admin-port", str(admin_port), "--api-keys-file", str(keys),
                                                              "--api-key-max-concurrent", "4"])
        try:
            wait_ready(proc, address, 120)  # health answers without a key
            stub = gateway_pb2_grpc.GatewayServiceStub(channel(address))
            missing = code_of(lambda: stub.Generate(REQUEST, timeout=30))
            wrong = code_of(lambda: stub.Generate(REQUEST, timeout=30, metadata=bearer("first-key-0123456788")))
            not_bearer = code_of(lambda: stub.Generate(REQUEST, timeout=30,
                                                       metadata=[("authorization", "first-key-0123456789")]))
            assert missing[0] == wrong[0] == not_bearer[0] == grpc.StatusCode.UNAUTHENTICATED
            assert missing[1] == wrong[1] == not_bearer[1]  # no hint which part was wrong
            assert code_of(lambda: stub.GetStatus(gateway_pb2.GetStatusRequest(), timeout=10))[0] == \
                grpc.StatusCode.UNAUTHENTICATED
            assert stub.Generate(REQUEST, timeout=60, metadata=bearer("first-key-0123456789")).generations[0].token_ids
            streamed = list(stub.GenerateStream(REQUEST, timeout=60, metadata=bearer("first-key-0123456789")))
            assert streamed[-1].HasField("timings")

            # Open Inference Protocol through tritonclient (its own process: its generated
            # protos clash with ours in one process): headers= carries the key.
            probe = subprocess.run([sys.executable, str(Path(__file__).with_name("tritonclient_probe.py")), address,
                                    "--key", "first-key-0123456789"], capture_output=True, text=True, timeout=120)
            assert probe.returncode == 0, probe.stderr[-2000:]
            got = json.loads(probe.stdout.strip().splitlines()[-1])
            assert "UNAUTHENTICATED" in got["wrong_key_ready"] and "UNAUTHENTICATED" in got["no_key_infer"]
            assert got["ready"] is True and got["text_output_shape"] == [1]

            # A 100 MB message: RESOURCE_EXHAUSTED (beyond the client port's limit), and the gateway serves on.
            huge = gateway_pb2.GenerateRequest(prompts=["x" * (100 * 1000 * 1000)])
            code, details = code_of(lambda: stub.Generate(huge, timeout=60, metadata=bearer("first-key-0123456789")))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details, details
            assert stub.Generate(REQUEST, timeout=60, metadata=bearer("first-key-0123456789")).generations

            # SIGHUP reloads the file: the new key works, the revoked one stops working.
            keys.write_text("second-key-0123456789\n")
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while True:
                try:
                    stub.Generate(REQUEST, timeout=60, metadata=bearer("second-key-0123456789"))
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() < deadline
                    time.sleep(0.1)
            assert code_of(lambda: stub.Generate(REQUEST, timeout=30, metadata=bearer("first-key-0123456789")))[0] == \
                grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(channel(address)).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            stop(proc)


def test_api_key_rate_limit_is_resource_exhausted(tiny, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("one-key-0123456789\nother-key-0123456789\n")
    with expert_servers(tiny, 1) as (servers, _), \
            gateway(tiny, servers, ["--api-keys-file", str(keys), "--api-key-rate-per-s", "0.001"]) as gw:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel(gw))
        assert stub.Generate(REQUEST, timeout=60, metadata=bearer("one-key-0123456789")).generations
        code, details = code_of(lambda: stub.Generate(REQUEST, timeout=30, metadata=bearer("one-key-0123456789")))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate" in details
        # Limits are per key: the other key still has its burst.
        assert stub.Generate(REQUEST, timeout=60, metadata=bearer("other-key-0123456789")).generations


# ---------------------------------------------------------------------------
# The cluster plane: token, allow-list, rogue servers
# ---------------------------------------------------------------------------


def test_cluster_token_is_required_on_internal_calls(tiny, tmp_path):
    token, other = tmp_path / "token", tmp_path / "other"
    token.write_text("cluster-token-0123456789\n")
    other.write_text("another-token-0123456789\n")
    with expert_servers(tiny, 1, ["--cluster-token-file", str(token)]) as (servers, _), \
            gateway(tiny, servers, ["--cluster-token-file", str(token)]) as gw:
        # The gateway sends the token: it serves.
        assert gateway_pb2_grpc.GatewayServiceStub(channel(gw)).Generate(REQUEST, timeout=60).generations
        # Without it (or with another) the expert server refuses every call but health.
        expert = expert_pb2_grpc.ExpertServiceStub(channel(servers[0]))
        for metadata in (None, [("x-moe-cluster-token", "another-token-0123456789")]):
            for call in (lambda: expert.GetInfo(expert_pb2.GetInfoRequest(), timeout=10, metadata=metadata),
                         lambda: expert.SetReplicas(expert_pb2.SetReplicasRequest(), timeout=10, metadata=metadata),
                         lambda: list(expert.FetchExpert(expert_pb2.FetchExpertRequest(), timeout=10,
                                                         metadata=metadata))):
                assert code_of(call)[0] == grpc.StatusCode.UNAUTHENTICATED
        assert health_pb2_grpc.HealthStub(channel(servers[0])).Check(health_pb2.HealthCheckRequest(), timeout=5).status \
            == health_pb2.HealthCheckResponse.SERVING
        # The admin port wants the token too.
        admin = gateway_pb2_grpc.MembershipServiceStub(channel(admin_address(gw)))
        assert code_of(lambda: admin.RemoveExpertServer(gateway_pb2.RemoveExpertServerRequest(address=servers[0]),
                                                        timeout=10))[0] == grpc.StatusCode.UNAUTHENTICATED
        # A server with the wrong token cannot join: its registration is refused...
        port = pick_free_port(HOST)
        proc = spawn_expert_server(tiny.path, HOST, port, ["--cluster-token-file", str(other),
                                                           "--register-with", admin_address(gw)])
        try:
            assert proc.wait(timeout=120) == 1
        finally:
            stop(proc)
        # ...and an operator adding it (with the right token) finds the gateway cannot call it.
        with expert_servers(tiny, 1, ["--cluster-token-file", str(other)]) as (rogue, _):
            with TlsConfig(cluster_token_file=token).channel(admin_address(gw)) as ch:
                code, details = code_of(lambda: gateway_pb2_grpc.MembershipServiceStub(ch).AddExpertServer(
                    gateway_pb2.AddExpertServerRequest(address=rogue[0]), timeout=60))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "credentials" in details, details
            with TlsConfig(cluster_token_file=token).channel(admin_address(gw)) as ch:
                status = gateway_pb2_grpc.GatewayServiceStub(ch).GetStatus(gateway_pb2.GetStatusRequest())
            assert [s.address for s in status.servers] == servers


def make_pki(directory, names):
    """A CA and, per name, a certificate it signs with SANs name, localhost and 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def subject(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(subject("moe test CA")).issuer_name(subject("moe test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files = {}
    for who in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(subject(who)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName(who), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                    critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        (directory / f"{who}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{who}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        files[who] = TlsConfig(directory / f"{who}.pem", directory / f"{who}.key", directory / "ca.pem")
    return files


def test_mtls_allow_list_refuses_other_certificates(tiny, tmp_path):
    """Both certificates are signed by the cluster's CA; only the allowed identity may call."""
    pki = make_pki(tmp_path, ["expert.moe", "gateway.moe", "rogue.moe"])
    server = pki["expert.moe"]
    args = [*TlsConfig(server.cert, server.key, server.ca, True, allowed_peers=frozenset({"gateway.moe"})).args()]
    port = pick_free_port(HOST)
    address = f"{HOST}:{port}"
    proc = spawn_expert_server(tiny.path, HOST, port, args)
    try:
        wait_ready(proc, address, 120, tls=pki["rogue.moe"])  # health is open to any certificate of the CA
        with pki["gateway.moe"].channel(address) as ch:
            assert expert_pb2_grpc.ExpertServiceStub(ch).GetInfo(expert_pb2.GetInfoRequest(), timeout=10).model_id
        with pki["rogue.moe"].channel(address) as ch:
            code, _ = code_of(lambda: expert_pb2_grpc.ExpertServiceStub(ch).GetInfo(expert_pb2.GetInfoRequest(),
                                                                                     timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        stop(proc)


def test_server_with_other_expert_weights_is_refused_at_join(tiny, tmp_path):
    """Same model identity (config.json and routers), different expert weights: the
    digests differ, so the join is refused with FAILED_PRECONDITION, and a gateway
    started over such a server does not start."""
    from moe_common.model_source import ModelSource, model_identity
    from test_membership import _variant

    def other_experts(name, tensor):
        if ".experts." in name:
            tensor.mul_(2.0)

    other = _variant(tiny, tmp_path / "other-experts", other_experts)
    assert model_identity(other) == tiny.model_id  # the identity check alone lets it in
    with expert_servers(ModelSource(str(other), other, tiny.model_id), 1) as (rogue, _), \
            expert_servers(tiny, 2) as (own, _), gateway(tiny, own[:1]) as gw:
        admin = gateway_pb2_grpc.MembershipServiceStub(channel(admin_address(gw)))
        code, details = code_of(lambda: admin.AddExpertServer(gateway_pb2.AddExpertServerRequest(address=rogue[0]),
                                                              timeout=60))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "differ from the gateway's checkpoint" in details
        status = gateway_pb2_grpc.GatewayServiceStub(channel(gw)).GetStatus(gateway_pb2.GetStatusRequest())
        assert [s.address for s in status.servers] == own[:1] and status.healthy
        # A server with the checkpoint's weights joins, digests checked.
        change = admin.AddExpertServer(gateway_pb2.AddExpertServerRequest(address=own[1]), timeout=60)
        assert list(change.servers) == own and change.experts_moved > 0
        # At start too: a gateway given the rogue server exits and names it.
        log_path = tmp_path / "gateway.log"
        with log_path.open("w") as log_file:
            proc = spawn_gateway(tiny.path, HOST, pick_free_port(HOST), rogue, log_file=log_file)
        try:
            assert proc.wait(timeout=120) != 0
        finally:
            stop(proc)
        assert f"expert server {rogue[0]} holds expert weights that differ" in log_path.read_text()


def test_set_replicas_fetches_only_from_announced_members(tiny, tmp_path):
    """A server that cannot read an expert from its checkpoint fetches it from the home
    address SetReplicas names only when the gateway announced that address as a member
    (AssignExperts.members): nobody can make it dial an arbitrary host."""
    import shutil

    from safetensors.torch import load_file, save_file

    from moe_common.model_source import resolve

    partial = tmp_path / "partial"
    shutil.copytree(tiny.path, partial)
    tensors = load_file(partial / "model.safetensors")
    prefix = "encoder.block.1.layer.1.mlp.experts.expert_0."  # expert 0 of sparse layer 0
    save_file({k: v for k, v in tensors.items() if not k.startswith(prefix)}, partial / "model.safetensors",
              metadata={"format": "pt"})
    source = resolve(str(partial))
    replica = expert_pb2.SetReplicasRequest(replicas=[expert_pb2.ExpertRef(layer=0, expert=0)], model_id=tiny.model_id)
    with expert_servers(tiny, 1, ["--experts", "0:0"]) as (home, _), \
            expert_servers(source, 1, ["--replica-memory", "1MB"]) as (server, _):
        stub = expert_pb2_grpc.ExpertServiceStub(channel(server[0]))
        replica.home_addresses[:] = home
        # Not announced: the address is not dialled, the replica is refused.
        reply = stub.SetReplicas(replica, timeout=60)
        assert not reply.ready and len(reply.failed) == 1 and "could not be loaded" in reply.failed[0].reason
        # Announced by the gateway's AssignExperts: fetched from it.
        stub.AssignExperts(expert_pb2.AssignExpertsRequest(model_id=tiny.model_id, members=[*home, *server]),
                           timeout=60)
        reply = stub.SetReplicas(replica, timeout=60)
        assert [(r.layer, r.expert) for r in reply.ready] == [(0, 0)] and not reply.failed
        # A later membership without it: no longer a source.
        stub.SetReplicas(expert_pb2.SetReplicasRequest(model_id=tiny.model_id), timeout=60)
        stub.AssignExperts(expert_pb2.AssignExpertsRequest(model_id=tiny.model_id, members=server), timeout=60)
        reply = stub.SetReplicas(replica, timeout=60)
        assert not reply.ready and len(reply.failed) == 1


def test_a_stack_with_a_cluster_token_passes_it_everywhere(tiny, tmp_path):
    """moe-serve's start_stack gives the token to every child: the gateway reaches expert
    servers and predictor with it (forecasts arrive), while a caller without it is refused
    by each of them."""
    from gateway.launcher import start_stack
    from moe_protos.moe.predictor.v1 import predictor_pb2, predictor_pb2_grpc

    token = tmp_path / "token"
    token.write_text("stack-token-0123456789\n")
    cluster = TlsConfig(cluster_token_file=token)
    with start_stack(str(tiny.path), 1, tls=cluster) as stack:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel(stack.gateway_address))  # clients need no token
        assert stub.Generate(REQUEST, timeout=60).generations
        with cluster.channel(stack.admin_address) as ch:
            status = gateway_pb2_grpc.GatewayServiceStub(ch).GetStatus(gateway_pb2.GetStatusRequest())
        assert status.healthy and status.predictor.forecasts_failed == 0
        assert status.predictor.forecasts_ok + status.predictor.forecasts_late > 0
        predictor = predictor_pb2_grpc.PredictorServiceStub(channel(stack.predictor_address))
        assert code_of(lambda: predictor.GetStatus(predictor_pb2.GetStatusRequest(), timeout=10))[0] == \
            grpc.StatusCode.UNAUTHENTICATED
        with cluster.channel(stack.predictor_address) as ch:
            predictor_pb2_grpc.PredictorServiceStub(ch).GetStatus(predictor_pb2.GetStatusRequest(), timeout=10)
        expert = expert_pb2_grpc.ExpertServiceStub(channel(stack.expert_addresses[0]))
        assert code_of(lambda: expert.GetInfo(expert_pb2.GetInfoRequest(), timeout=10))[0] == \
            grpc.StatusCode.UNAUTHENTICATED
