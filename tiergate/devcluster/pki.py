"""Certificates and keys for a throw-away control plane, made with the openssl command line.

openssl is on every Debian machine; using it keeps this package free of a crypto dependency. Keys are RSA
2048 (kube-apiserver's service-account signer needs RSA or ECDSA; RSA is the common case and fast enough:
the whole PKI takes well under a second).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import StartError

SERVICE_CIDR = "198.19.0.0/16"
# The first address of the service range is the `kubernetes` Service; clients in pods verify it.
FIRST_SERVICE_IP = "198.19.0.1"


@dataclass(frozen=True)
class Pki:
    dir: Path

    @property
    def ca_crt(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    def crt(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    @property
    def front_proxy_ca_crt(self) -> Path:
        return self.dir / f"{FRONT_PROXY_CA}.crt"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StartError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def _issue(pki: Pki, name: str, subject: str, ext: str, ca: str = "ca") -> None:
    d = pki.dir
    _openssl("genrsa", "-out", pki.key(name).name, "2048", cwd=d)
    _openssl("req", "-new", "-key", pki.key(name).name, "-subj", subject, "-out", f"{name}.csr", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.crt",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "365",
        "-sha256",
        "-extfile",
        f"{name}.ext",
        "-out",
        pki.crt(name).name,
        cwd=d,
    )


# Client identities. The control-plane components use the users RBAC's bootstrap policy binds
# (system:kube-controller-manager, system:kube-scheduler); everything else is an admin in system:masters.
CLIENTS = {
    "admin": "/O=system:masters/CN=tiergate-admin",
    "controller-manager": "/CN=system:kube-controller-manager",
    "scheduler": "/CN=system:kube-scheduler",
}


# The aggregation layer: the API server proxies to extension API servers (prometheus-adapter's metrics APIs) with a
# client certificate of this name, signed by a CA of its own, so that no ordinary client certificate can pose as the
# proxy and assert a user in request headers.
FRONT_PROXY_CA = "front-proxy-ca"
FRONT_PROXY_CLIENT = "front-proxy-client"


def _make_ca(d: Path, name: str, subject: str) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        "-days",
        "365",
        "-subj",
        subject,
        cwd=d,
    )


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    pki = Pki(d)
    _make_ca(d, "ca", "/CN=tiergate-dev-ca")
    _make_ca(d, FRONT_PROXY_CA, "/CN=tiergate-dev-front-proxy-ca")
    sans = ",".join(
        [
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
            "IP:127.0.0.1",
            f"IP:{FIRST_SERVICE_IP}",
        ]
    )
    _issue(
        pki,
        "apiserver",
        "/CN=kube-apiserver",
        f"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName={sans}\n",
    )
    client_ext = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    for name, subject in CLIENTS.items():
        _issue(pki, name, subject, client_ext)
    _issue(pki, FRONT_PROXY_CLIENT, f"/CN={FRONT_PROXY_CLIENT}", client_ext, ca=FRONT_PROXY_CA)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
    return pki


def kubeconfig(pki: Pki, server: str, user: str) -> str:
    """A kubeconfig with file references (not inline data), readable by kubectl, helm and client libraries."""
    return f"""apiVersion: v1
kind: Config
clusters:
- name: tiergate-dev
  cluster:
    server: {server}
    certificate-authority: {pki.ca_crt}
users:
- name: {user}
  user:
    client-certificate: {pki.crt(user)}
    client-key: {pki.key(user)}
contexts:
- name: tiergate-dev
  context:
    cluster: tiergate-dev
    user: {user}
current-context: tiergate-dev
"""


def make_serving_dir(d: Path, common_name: str, sans: str = "DNS:localhost,IP:127.0.0.1") -> Pki:
    """A CA of its own (`ca.crt`) and a serving certificate it signed (`tls.crt`, `tls.key`) in `d`: the layout a
    Kubernetes TLS Secret mounted as a folder has, which servers such as KEDA's operator read from a --cert-dir."""
    d.mkdir(parents=True, exist_ok=True)
    out = Pki(d)
    _make_ca(d, "ca", f"/CN={common_name}-ca")
    _issue(
        out,
        "tls",
        f"/CN={common_name}",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName={sans}\n",
    )
    return out
