"""kopf registrations. Thin on purpose: the handler only tells the controller which policy to look at.

kopf watches the RoutingPolicies (children are watched by watches.py, filtered on the API server); all state kopf
would keep (progress, diff-base) lives in annotations under tiergate.io, and no handler here needs a finalizer, so
a policy can always be deleted, operator running or not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, cast

import kopf

from tiergate.api.policy import GROUP, PLURAL, VERSION

from .controller import Controller


class _NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf builds a diff base (a deep copy of the object) for every watch event, to detect changes for on.create /
    on.update handlers. We register none (every event only marks a policy dirty), so an empty essence keeps kopf's
    machinery working without the copies."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})


def configure_settings(settings: kopf.OperatorSettings) -> None:
    """kopf's own state under our API group; no peering (we elect a leader with a Lease); no cluster scanning."""
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = _NoDiffBase(prefix=GROUP)
    settings.peering.standalone = True
    # Without scanning kopf needs no cluster-wide list of CRDs or namespaces: least privilege.
    settings.scanning.disabled = True
    # kopf would post an Event per handler run; ours are posted by the controller with meaning.
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 320


def register(registry: kopf.OperatorRegistry, controller: Controller) -> None:
    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="policy")
    async def policy_event(
        type: str, name: str, namespace: str | None, meta: kopf.Meta, event: kopf.RawEvent, **_: Any
    ) -> None:
        # async: kopf runs sync handlers in a thread, and the controller's queue belongs to the event loop.
        # The raw body rides along: reconciles read it instead of GETting the policy again.
        if namespace:
            controller.policy_event(
                namespace, name, meta.get("generation"), deleted=type == "DELETED", body=cast(Any, event["object"])
            )


def login_handler(registry: kopf.OperatorRegistry, api_client: Any) -> None:
    """kopf connects with the same credentials as our own client (an explicit --kubeconfig included)."""

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        c = api_client.configuration
        header = c.get_api_key_with_prefix("BearerToken") or c.get_api_key_with_prefix("authorization")
        scheme, _sep, token = header.partition(" ") if header else ("", "", "")
        logging.getLogger(__name__).debug("kopf login to %s", c.host)
        return kopf.ConnectionInfo(
            server=c.host,
            ca_path=c.ssl_ca_cert,
            insecure=not c.verify_ssl,
            scheme=scheme or None,
            token=token or None,
            certificate_path=c.cert_file,
            private_key_path=c.key_file,
            priority=100,
        )
