"""A small, typed wrapper over the API server's REST interface for the kinds the operator writes.

Why not the generated typed clients: the operator builds plain dicts (see builders) and applies them with
server-side apply, which the generated clients do not model; one generic path per kind keeps every call the same
shape (apply, list, delete, status patch) and returns plain JSON dicts. Transport, TLS and credentials
(kubeconfig or in-cluster) come from the official `kubernetes` package.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, urlencode

from tiergate.api.policy import API_VERSION, PLURAL

from .errors import ConfigError, KubeError

Obj = dict[str, Any]

# kind -> (apiVersion, plural)
RESOURCES: dict[str, tuple[str, str]] = {
    "Deployment": ("apps/v1", "deployments"),
    "Service": ("v1", "services"),
    "ConfigMap": ("v1", "configmaps"),
    "ServiceAccount": ("v1", "serviceaccounts"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
    "Role": ("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings"),
    "Pod": ("v1", "pods"),
    "Lease": ("coordination.k8s.io/v1", "leases"),
    "Event": ("v1", "events"),
    "RoutingPolicy": (API_VERSION, PLURAL),
    "HorizontalPodAutoscaler": ("autoscaling/v2", "horizontalpodautoscalers"),
    # KEDA's CRD: served only where KEDA is installed (watches.OPTIONAL_KINDS).
    "ScaledObject": ("keda.sh/v1alpha1", "scaledobjects"),
}
# A hung API server must not hang a reconcile forever: (connect, read) seconds.
_TIMEOUT = (5.0, 30.0)
# Accept headers asking for objects' metadata only (Kubernetes' PartialObjectMetadata): a list or watch of every
# ConfigMap then carries names and resourceVersions, not the data (up to 1 MiB each).
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
METADATA_WATCH = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
# Methods that change state: each passes the write guard first (leader election, see leader.py).
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def resource_path(kind: str, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
    try:
        api_version, plural = RESOURCES[kind]
    except KeyError:
        raise KubeError(f"unsupported kind {kind}") from None
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = base + (f"/namespaces/{quote(namespace)}" if namespace else "") + f"/{plural}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


def load_api_client(kubeconfig: str | None = None, pool_size: int = 32, identity: str | None = None) -> Any:
    """kubeconfig path given: that file. Otherwise in-cluster credentials inside a pod, else KUBECONFIG/~/.kube.

    pool_size: HTTP connections kept to the API server; at least the number of concurrent requests (reconcile
    workers x parallel applies), or urllib3 discards and reopens TLS connections under load.
    identity: this replica's name, sent in the User-Agent (`tiergate-operator/IDENTITY`) so that the API server's
    audit log tells which replica made each request; the part before the slash, which the API server uses as
    the field manager of non-apply writes, stays `tiergate-operator` whatever the replica."""
    from kubernetes import client, config

    configuration = client.Configuration()
    source = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            try:
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
                source = "in-cluster service account"
            except config.ConfigException:
                config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except Exception as e:  # the loader raises ConfigException, OSError, TypeError... for unusable files
        raise ConfigError(
            f"cannot load Kubernetes credentials from {source}: {e} "
            "(pass --kubeconfig, set KUBECONFIG, or run in a pod)"
        ) from e
    configuration.connection_pool_maxsize = pool_size
    api_client = client.ApiClient(configuration)
    api_client.user_agent = f"tiergate-operator/{identity}" if identity else "tiergate-operator"
    return api_client


class Kube:
    """Blocking calls (run them in a worker thread from async code). Thread-safe: urllib3's pool is.

    write_guard: called before every request that changes state, in the calling thread, right before it is sent;
    it raises (NotLeader) to refuse. The leader elector's check goes here, so that no write path of the
    reconciler (applies, deletes, status, Events) can bypass it. timeout: (connect, read) seconds per request."""

    def __init__(
        self,
        api_client: Any,
        *,
        write_guard: Callable[[], None] | None = None,
        timeout: tuple[float, float] = _TIMEOUT,
    ) -> None:
        self._api = api_client
        self._write_guard = write_guard
        self._timeout = timeout
        # Requests made, by "METHOD resource[/subresource]": logged at shutdown, read by the benchmark.
        self.calls: Counter[str] = Counter()
        self._calls_lock = threading.Lock()

    def _count(self, method: str, path: str) -> None:
        parts = path.split("?", 1)[0].strip("/").split("/")
        # /api/v1/namespaces/NS/KIND[/NAME[/SUB]] or /apis/GROUP/VERSION/namespaces/NS/KIND[...]
        rest = parts[parts.index("namespaces") + 2 :] if "namespaces" in parts else parts[-1:]
        what = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
        with self._calls_lock:
            self.calls[f"{method} {what}"] += 1

    def calls_summary(self) -> str:
        with self._calls_lock:
            return ", ".join(f"{k}={v}" for k, v in sorted(self.calls.items()))

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> tuple[int, Obj]:
        """`accept`: METADATA_LIST lists objects' metadata only."""
        if self._write_guard is not None and method in _WRITES:
            self._write_guard()  # raises before anything is sent
        self._count("APPLY" if content_type.startswith("application/apply-patch") else method, path)
        if query:
            path = f"{path}?{urlencode(query)}"
        headers = {"Accept": accept, "Content-Type": content_type}
        try:
            m, url, hdrs, data, _ = self._api.param_serialize(
                method, path, header_params=headers, body=body, auth_settings=["BearerToken"]
            )
            resp = self._api.call_api(m, url, header_params=hdrs, body=data, _request_timeout=self._timeout)
            raw = resp.read()
        except Exception as e:  # transport errors: connection refused, TLS, timeouts
            raise KubeError(f"{method} {path}: {e}", 0) from e
        try:
            payload: Obj = json.loads(raw) if raw else {}
        except ValueError:
            payload = {"message": raw[:200].decode(errors="replace")}
        return resp.status, payload

    def stream_lines(
        self, path: str, query: dict[str, str], read_timeout: float, accept: str = "application/json"
    ) -> Iterator[bytes]:
        """GET a watch stream; yields one JSON event per line until the server closes it. `accept`: METADATA_WATCH
        for events carrying objects' metadata only."""
        self._count("WATCH", path)
        url_path = f"{path}?{urlencode(query)}"
        m, url, hdrs, _, _ = self._api.param_serialize(
            "GET", url_path, header_params={"Accept": accept}, auth_settings=["BearerToken"]
        )
        resp = self._api.call_api(m, url, header_params=hdrs, _request_timeout=(self._timeout[0], read_timeout))
        raw = resp.response
        if resp.status >= 300:
            try:
                payload = json.loads(raw.data)
            except ValueError:
                payload = {"message": raw.data[:200].decode(errors="replace")}
            reason = str(payload.get("reason", ""))
            raise KubeError(f"watch {path}: {resp.status} {reason}: {payload.get('message')}", resp.status, reason)
        try:
            buf = b""
            for chunk in raw.stream(amt=65536, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield line
        finally:
            raw.release_conn()

    def _ok(self, method: str, path: str, **kw: Any) -> Obj:
        status, payload = self.request(method, path, **kw)
        if status >= 300:
            raise KubeError(
                f"{method} {path}: {status} {payload.get('reason', '')}: {payload.get('message', payload)}",
                status,
                str(payload.get("reason", "")),
            )
        return payload

    def apply(self, obj: Obj, field_manager: str, force: bool = True) -> Obj:
        """Server-side apply. force=True: a controller owns its fields outright (Kubernetes' guidance for
        controllers); fields it leaves out (replicas under an autoscaler) stay with whoever owns them."""
        md = obj["metadata"]
        path = resource_path(obj["kind"], md.get("namespace"), md["name"])
        query = {"fieldManager": field_manager, "force": "true" if force else "false"}
        return self._ok("PATCH", path, body=obj, query=query, content_type="application/apply-patch+yaml")

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        """None on 404: absence is an answer, not an error."""
        status, payload = self.request("GET", resource_path(kind, namespace, name))
        if status == 404:
            return None
        if status >= 300:
            raise KubeError(f"GET {kind} {namespace}/{name}: {status} {payload.get('message')}", status)
        return payload

    def list(self, kind: str, namespace: str | None, label_selector: str | None = None) -> list[Obj]:
        query = {"labelSelector": label_selector} if label_selector else None
        items: list[Obj] = self._ok("GET", resource_path(kind, namespace), query=query).get("items", [])
        return items

    def create(self, obj: Obj) -> Obj:
        md = obj["metadata"]
        return self._ok("POST", resource_path(obj["kind"], md.get("namespace")), body=obj)

    def replace(self, obj: Obj) -> Obj:
        md = obj["metadata"]
        return self._ok("PUT", resource_path(obj["kind"], md.get("namespace"), md["name"]), body=obj)

    def delete(self, kind: str, namespace: str | None, name: str, uid: str | None = None) -> bool:
        """False when already gone. With `uid`, deletes only that incarnation (never a same-named newcomer)."""
        body: Obj = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        status, payload = self.request("DELETE", resource_path(kind, namespace, name), body=body)
        if status == 404:
            return False
        if status >= 300:
            raise KubeError(f"DELETE {kind} {namespace}/{name}: {status} {payload.get('message')}", status)
        return True

    def patch_status(self, kind: str, namespace: str, name: str, status: Obj) -> Obj:
        """Merge-patch the status subresource (lists in it are replaced whole, which is what we want)."""
        path = resource_path(kind, namespace, name, "status")
        return self._ok("PATCH", path, body={"status": status}, content_type="application/merge-patch+json")
