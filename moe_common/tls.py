"""Optional TLS, and mutual TLS, for every gRPC server and channel of the project.

One TlsConfig per process, from certificate files:
  cert, key   this process's certificate chain and private key (PEM). A server presents
              them; a client presents them too when the other side asks for a client
              certificate (mutual TLS).
  ca          the CA certificate(s) that sign the peers (PEM): clients verify servers
              with it; servers verify client certificates with it when require_client_cert.
Without cert and key everything stays plaintext, as the loopback default.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TlsConfig:
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False  # servers: mutual TLS, clients must present a cert signed by `ca`

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("give --tls-cert and --tls-key together")
        if self.require_client_cert and (self.ca is None or self.cert is None):
            raise ValueError("--tls-require-client-cert needs --tls-cert, --tls-key and --tls-ca")
        for path in (self.cert, self.key, self.ca):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file {path} does not exist")

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
            return grpc.insecure_channel(address, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca).read_bytes(),
            private_key=Path(self.key).read_bytes() if self.key else None,
            certificate_chain=Path(self.cert).read_bytes() if self.cert else None,
        )
        return grpc.secure_channel(address, credentials, options=options)

    def args(self) -> list[str]:
        """The flags that give a child process the same configuration."""
        out = []
        for flag, value in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if value is not None:
                out += [flag, str(value)]
        return out + (["--tls-require-client-cert"] if self.require_client_cert else [])


PLAINTEXT = TlsConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("TLS (optional; plaintext without these)")
    g.add_argument("--tls-cert", type=Path, default=None, help="this process's certificate chain (PEM)")
    g.add_argument("--tls-key", type=Path, default=None, help="this process's private key (PEM)")
    g.add_argument("--tls-ca", type=Path, default=None, help="CA that signs the other services' certificates (PEM)")
    g.add_argument("--tls-require-client-cert", action="store_true",
                   help="servers accept only clients with a certificate signed by --tls-ca (mutual TLS)")


def from_args(a: argparse.Namespace) -> TlsConfig:
    return TlsConfig(a.tls_cert, a.tls_key, a.tls_ca, a.tls_require_client_cert)
