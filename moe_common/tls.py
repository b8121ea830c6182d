"""Optional TLS, and mutual TLS, for every gRPC server and channel of the project.

One TlsConfig per process, from certificate files:
  cert, key   this process's certificate chain and private key (PEM). A server presents
              them; a client presents them too when the other side asks for a client
              certificate (mutual TLS).
  ca          the CA certificate(s) that sign the peers (PEM): clients verify servers
              with it; servers verify client certificates with it when require_client_cert.
Without cert and key everything stays plaintext, as the loopback default.

The same object carries the rest of the cluster plane's credentials (moe_common/auth.py):
  cluster_token_file  a shared secret every internal call sends and every internal
                      server requires (x-moe-cluster-token metadata);
  allowed_peers       with mutual TLS, the certificate SANs or CNs an internal server
                      accepts calls from;
  insecure            allow binding an internal server beyond loopback without either.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import grpc

from moe_common import auth


@dataclass(frozen=True)
class TlsConfig:
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False  # servers: mutual TLS, clients must present a cert signed by `ca`
    cluster_token_file: Path | None = None  # internal calls send, internal servers require, this token
    allowed_peers: frozenset[str] = field(default_factory=frozenset)  # mTLS SANs/CNs internal servers accept
    insecure: bool = False  # internal servers may bind beyond loopback without token or mTLS

    def __post_init__(self):
        if self.allowed_peers and not self.require_client_cert:
            raise ValueError("--allowed-peers checks client certificates: it needs --tls-require-client-cert")
        if (self.cert is None) != (self.key is None):
            raise ValueError("give --tls-cert and --tls-key together")
        if self.require_client_cert and (self.ca is None or self.cert is None):
            raise ValueError("--tls-require-client-cert needs --tls-cert, --tls-key and --tls-ca")
        for path in (self.cert, self.key, self.ca):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file {path} does not exist")

    @cached_property
    def cluster_token(self) -> str | None:
        return auth.read_token(self.cluster_token_file) if self.cluster_token_file is not None else None

    @property
    def authenticates_callers(self) -> bool:
        """Whether internal servers of this process check who calls them."""
        return self.cluster_token_file is not None or self.require_client_cert

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        """The server interceptors that enforce the cluster credentials (none when unset)."""
        if self.cluster_token_file is None and not self.allowed_peers:
            return []
        return [auth.ClusterInterceptor(self.cluster_token, self.allowed_peers)]

    def check_bind(self, host: str, what: str) -> None:
        auth.check_bind(host, self.authenticates_callers, self.insecure, what)

    @property
    def serving(self) -> bool:
        """Whether servers of this process use TLS."""
        return self.cert is not None

    @property
    def connecting(self) -> bool:
        """Whether channels of this process use TLS (they verify servers with `ca`)."""
        return self.ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
            root_certificates=Path(self.ca).read_bytes() if self.require_client_cert else None,
            require_client_auth=self.require_client_cert,
        )

    def channel(self, address: str, options=None) -> grpc.Channel:
        """A channel to `address`: TLS when a CA is configured, plaintext otherwise."""
        if not self.connecting:
            channel = grpc.insecure_channel(address, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(self.ca).read_bytes(),
                private_key=Path(self.key).read_bytes() if self.key else None,
                certificate_chain=Path(self.cert).read_bytes() if self.cert else None,
            )
            channel = grpc.secure_channel(address, credentials, options=options)
        if self.cluster_token_file is not None:
            channel = grpc.intercept_channel(channel, auth.TokenClientInterceptor(self.cluster_token))
        return channel

    def args(self) -> list[str]:
        """The flags that give a child process the same configuration."""
        out = []
        for flag, value in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if value is not None:
                out += [flag, str(value)]
        if self.require_client_cert:
            out.append("--tls-require-client-cert")
        if self.cluster_token_file is not None:
            out += ["--cluster-token-file", str(self.cluster_token_file)]
        if self.allowed_peers:
            out += ["--allowed-peers", ",".join(sorted(self.allowed_peers))]
        return out + (["--insecure"] if self.insecure else [])


PLAINTEXT = TlsConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("TLS (optional; plaintext without these)")
    g.add_argument("--tls-cert", type=Path, default=None, help="this process's certificate chain (PEM)")
    g.add_argument("--tls-key", type=Path, default=None, help="this process's private key (PEM)")
    g.add_argument("--tls-ca", type=Path, default=None, help="CA that signs the other services' certificates (PEM)")
    g.add_argument("--tls-require-client-cert", action="store_true",
                   help="servers accept only clients with a certificate signed by --tls-ca (mutual TLS)")
    g = parser.add_argument_group("cluster authentication (internal calls: expert servers, predictor, gateway admin)")
    g.add_argument("--cluster-token-file", type=Path, default=None,
                   help="file holding a shared token (one line, >= 16 characters) that every internal call "
                        "sends and every internal server requires")
    g.add_argument("--allowed-peers", default="",
                   help="with --tls-require-client-cert: comma-separated certificate SANs or CNs that may call "
                        "this process's internal server (e.g. gateway,expert-server)")
    g.add_argument("--insecure", action="store_true",
                   help="let internal servers bind beyond loopback with neither a cluster token nor mutual TLS")


def from_args(a: argparse.Namespace) -> TlsConfig:
    peers = frozenset(p.strip() for p in a.allowed_peers.split(",") if p.strip())
    return TlsConfig(a.tls_cert, a.tls_key, a.tls_ca, a.tls_require_client_cert, a.cluster_token_file, peers,
                     a.insecure)
