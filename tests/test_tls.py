"""TLS and mutual TLS between every service, with certificates this test makes."""

import datetime
import ipaddress
import subprocess
import sys

import grpc
import pytest

from gateway.launcher import start_stack
from moe_common.tls import TlsConfig
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import reference_ids


def make_pki(directory):
    """A CA, and one certificate for 127.0.0.1/localhost signed by it (server and client use)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("moe test CA")).issuer_name(name("moe test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    files = {}
    for who in ("service", "stranger"):
        key = ec.generate_private_key(ec.SECP256R1())
        signer_key, issuer = (ca_key, ca.subject) if who == "service" else (key, name("stranger"))
        cert = (x509.CertificateBuilder().subject_name(name(who)).issuer_name(issuer)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(signer_key, hashes.SHA256()))
        (directory / f"{who}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{who}.key").write_bytes(pem_key(key))
        files[who] = (directory / f"{who}.pem", directory / f"{who}.key")
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return directory / "ca.pem", files


def test_mutual_tls_everywhere(tiny, reference, tmp_path):
    ca, files = make_pki(tmp_path)
    cert, key = files["service"]
    mtls = TlsConfig(cert, key, ca, require_client_cert=True)
    request = gateway_pb2.GenerateRequest(prompts=["secret"], parameters=gateway_pb2.GenerationParameters(max_new_tokens=3))
    with start_stack(str(tiny.path), 2, tls=mtls) as stack:
        # Gateway, expert servers and predictor all talk mutual TLS: the stack came up and serves.
        with mtls.channel(stack.gateway_address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            assert [list(stub.Generate(request).generations[0].token_ids)] == reference_ids(reference, ["secret"], 3)
            status = stub.GetStatus(gateway_pb2.GetStatusRequest())
            # The predictor link works under mTLS: forecasts arrive, none failed.
            assert status.healthy and status.predictor.forecasts_failed == 0 and status.predictor.forecasts_ok > 0
        # Plaintext, no client certificate, or one from another CA: refused.
        for channel in (grpc.insecure_channel(stack.gateway_address),
                        TlsConfig(ca=ca).channel(stack.gateway_address),
                        TlsConfig(*files["stranger"], ca=ca).channel(stack.gateway_address)):
            with channel as ch, pytest.raises(grpc.RpcError) as err:
                gateway_pb2_grpc.GatewayServiceStub(ch).Generate(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # The health-check command speaks TLS too.
        check = [sys.executable, "-m", "moe_common.healthcheck", stack.expert_addresses[0]]
        assert subprocess.run([*check, "--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca)]).returncode == 0
        assert subprocess.run([*check, "--timeout", "2"], capture_output=True).returncode == 1


def test_tls_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="together"):
        TlsConfig(cert=tmp_path / "a.pem")
    with pytest.raises(ValueError, match="needs"):
        TlsConfig(require_client_cert=True)
    with pytest.raises(ValueError, match="does not exist"):
        TlsConfig(ca=tmp_path / "missing.pem")
