"""Where the Kubernetes API is and how to prove who we are.

Two sources, as kubectl has them:

* in a pod: ``KUBERNETES_SERVICE_HOST``/``_PORT``, the ServiceAccount token,
  CA bundle and namespace under ``/var/run/secrets/kubernetes.io/serviceaccount``.
  The kubelet rotates that token (bound tokens live about an hour), so it is
  read from the file again whenever the API answers 401, never cached for good.
* outside: a kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``) with a bearer
  token or a client certificate. Exec credential plugins are not supported;
  the error says so rather than failing later with a 401.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rankwarden.errors import KubernetesError

__all__ = ["KubeConfig", "SERVICE_ACCOUNT_DIR"]

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class KubeConfig:
    server: str
    namespace: str = "default"
    token: str | None = None
    #: Re-read on every 401 (rotated ServiceAccount tokens).
    token_file: str | None = None
    ca_file: str | None = None
    ca_data: str | None = None
    client_cert_data: bytes | None = None
    client_key_data: bytes | None = None
    insecure: bool = False

    # -- sources ---------------------------------------------------------------------

    @classmethod
    def load(cls, namespace: str | None = None) -> "KubeConfig":
        """In-cluster when running in a pod, else the kubeconfig."""
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config = cls.in_cluster()
        else:
            config = cls.from_kubeconfig()
        if namespace:
            config = replace(config, namespace=namespace)
        return config

    @classmethod
    def in_cluster(cls, directory: Path = SERVICE_ACCOUNT_DIR) -> "KubeConfig":
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubernetesError("not in a pod: KUBERNETES_SERVICE_HOST is not set")
        token_file = directory / "token"
        if not token_file.is_file():
            raise KubernetesError(
                f"no ServiceAccount token at {token_file}: the coordinator's pod needs "
                "automountServiceAccountToken (see k8s/base/coordinator.yaml)"
            )
        try:
            namespace = (directory / "namespace").read_text().strip()
        except OSError:
            namespace = "default"
        host = f"[{host}]" if ":" in host else host
        return cls(
            server=f"https://{host}:{port}",
            namespace=namespace,
            token_file=str(token_file),
            ca_file=str(directory / "ca.crt"),
        )

    @classmethod
    def from_kubeconfig(cls, path: str | os.PathLike[str] | None = None, context: str | None = None) -> "KubeConfig":
        import yaml

        if path is None:
            path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or Path.home() / ".kube" / "config"
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise KubernetesError(f"cannot read kubeconfig {path}: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise KubernetesError(f"kubeconfig {path} is not valid YAML: {exc}") from exc
        context_name = context or doc.get("current-context")
        ctx = _named(doc, "contexts", context_name, path).get("context", {})
        cluster = _named(doc, "clusters", ctx.get("cluster"), path).get("cluster", {})
        user = _named(doc, "users", ctx.get("user"), path).get("user", {}) if ctx.get("user") else {}
        if "exec" in user or "auth-provider" in user:
            raise KubernetesError(
                f"kubeconfig {path} user {ctx.get('user')!r} uses a credential plugin, which rankwarden "
                "does not run; use a token or client certificate (or run in-cluster)"
            )
        base = path.parent

        def file_or_data(file_key: str, data_key: str) -> bytes | None:
            if user.get(data_key):
                return base64.b64decode(user[data_key])
            if user.get(file_key):
                return (base / user[file_key]).read_bytes()
            return None

        ca_data = None
        if cluster.get("certificate-authority-data"):
            ca_data = base64.b64decode(cluster["certificate-authority-data"]).decode()
        ca_file = str(base / cluster["certificate-authority"]) if cluster.get("certificate-authority") else None
        if not cluster.get("server"):
            raise KubernetesError(f"kubeconfig {path}: cluster {ctx.get('cluster')!r} has no server")
        return cls(
            server=cluster["server"].rstrip("/"),
            namespace=ctx.get("namespace") or "default",
            token=user.get("token"),
            token_file=str(base / user["tokenFile"]) if user.get("tokenFile") else None,
            ca_file=ca_file,
            ca_data=ca_data,
            client_cert_data=file_or_data("client-certificate", "client-certificate-data"),
            client_key_data=file_or_data("client-key", "client-key-data"),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
        )

    # -- use -----------------------------------------------------------------------------

    def read_token(self) -> str | None:
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise KubernetesError(f"cannot read token {self.token_file}: {exc.strerror or exc}") from exc
        return self.token

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https://"):
            return False
        if self.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif self.ca_file or self.ca_data:
            context = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)
        else:
            context = ssl.create_default_context()
        if self.client_cert_data and self.client_key_data:
            # ssl loads a certificate chain only from files: a private temp dir, gone at once.
            with tempfile.TemporaryDirectory(prefix="rankwarden-kube-") as tmp:
                cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
                cert.write_bytes(self.client_cert_data)
                fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(self.client_key_data)
                context.load_cert_chain(cert, key)
        return context


def _named(doc: dict[str, Any], section: str, name: str | None, path: Path) -> dict[str, Any]:
    for entry in doc.get(section) or []:
        if entry.get("name") == name:
            return entry
    raise KubernetesError(f"kubeconfig {path}: no {section[:-1]} named {name!r}")
