"""Reconcile one HolySheepConfig key: level-triggered, so it only ever looks at current state.

GET the CR; parse and render it; check the Secrets it names (metadata only); server-side
apply what is missing or drifted; prune what is labelled for this CR but no longer desired;
write status. An invalid spec changes nothing but status and an Event.

Status never claims what the controller could not see: the shipped RBAC grants no access to
Secrets, so their existence is usually unknown (403), and status says exactly that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controller import naming, status
from controller.kube import (
    AUTHORIZATIONPOLICIES,
    ENVOYFILTERS,
    EVENTS,
    GENERATED,
    HOLYSHEEPCONFIGS,
    SECRETS,
    Forbidden,
    Kube,
    KubeError,
    NotFound,
    Resource,
)
from controller.render import RenderOptions, render_config
from protos.spec import ConfigError, HolySheepConfig, parse_document

log = logging.getLogger(__name__)

SECRET_RETRY_SECONDS = 30.0


class NotLeader(Exception):
    """Raised before any write when this replica does not hold the lease."""


@dataclass
class Result:
    requeue_after: float | None = None


@dataclass
class SecretCheck:
    """What the controller could see of the Secrets a CR names (metadata only, by name)."""

    keys: dict[str, list[str]] = field(default_factory=dict)  # Secret name -> data keys the CR uses
    missing: list[str] = field(default_factory=list)  # 404
    unverified: list[str] = field(default_factory=list)  # 403: existence unknown

    def found(self, secret: str) -> bool | None:
        """True/False when seen, None when the controller may not look."""
        return None if secret in self.unverified else secret not in self.missing

    def describe(self, names: list[str]) -> str:
        """Names and keys only: a status message never carries a value."""
        return ", ".join(f"{n} (key {', '.join(self.keys[n]) or '-'})" for n in names)


def owner_reference(cr: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": cr["apiVersion"],
        "kind": cr["kind"],
        "name": cr["metadata"]["name"],
        "uid": cr["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _drift(desired: dict[str, Any], live: dict[str, Any] | None) -> str | None:
    """Why `desired` must be applied over `live`, or None when it is already in place."""
    if live is None:
        return "missing"
    fields = [k for k in desired if k not in ("apiVersion", "kind", "metadata") and desired[k] != live.get(k)]
    meta, live_meta = desired["metadata"], live.get("metadata", {})
    for k in ("labels", "ownerReferences"):
        wanted = meta.get(k)
        have: Any = live_meta.get(k) or ({} if k == "labels" else [])
        if k == "labels" and wanted and any(have.get(lk) != lv for lk, lv in wanted.items()):
            fields.append("metadata.labels")
        if k == "ownerReferences" and wanted and not all(ref in have for ref in wanted):
            fields.append("metadata.ownerReferences")
    return f"drift in {', '.join(fields)}" if fields else None


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        options: RenderOptions,
        may_write: Callable[[], bool] = lambda: True,
        identity: str = "holysheep-mesh",
    ) -> None:
        self.kube = kube
        self.options = options
        self.may_write = may_write
        self.identity = identity

    def _guard(self) -> None:
        if not self.may_write():
            raise NotLeader

    def reconcile(self, key: str, trigger: str = "event") -> Result:
        namespace, name = key.split("/", 1)
        try:
            cr = self.kube.get(HOLYSHEEPCONFIGS, namespace, name)
        except NotFound:
            self._cleanup(namespace, name)
            return Result()
        if cr["metadata"].get("deletionTimestamp"):
            return Result()  # owner references let the garbage collector finish the job
        generation = int(cr["metadata"].get("generation", 0))
        try:
            cfg = parse_document(cr)
            desired = render_config(cfg, self.options)
        except ConfigError as exc:
            self._invalid(cr, generation, str(exc))
            return Result()
        secrets = self._check_secrets(cfg)
        self._apply_and_prune(cr, cfg, desired, trigger, generation)
        self._write_ready(cr, cfg, generation, secrets)
        return Result(requeue_after=SECRET_RETRY_SECONDS if secrets.missing else None)

    # Steps ---------------------------------------------------------------------------------

    def _check_secrets(self, cfg: HolySheepConfig) -> SecretCheck:
        check = SecretCheck()
        for p in cfg.providers:
            if p.auth.secret_name:
                keys = check.keys.setdefault(p.auth.secret_name, [])
                if p.auth.key and p.auth.key not in keys:
                    keys.append(p.auth.key)
        for secret in sorted(check.keys):
            try:
                self.kube.get(SECRETS, cfg.namespace, secret, metadata_only=True)
            except Forbidden:
                # The shipped install grants no access to Secrets at all (RBAC cannot grant
                # metadata without data), so existence is unknown: say so, do not block on it.
                log.info("secret existence not checked: forbidden", extra={"config": cfg.name, "secret": secret})
                check.unverified.append(secret)
            except NotFound:
                check.missing.append(secret)
        return check

    def _live(self, res: Resource, namespace: str, name: str) -> dict[tuple[str, str], dict[str, Any]]:
        """This config's live objects of one kind, by (namespace, name). Most live in the CR's
        namespace; AuthorizationPolicies in the ext_proc's (listed only there: its Role is all
        the controller may touch of them), a gateway's EnvoyFilter in the gateway's namespace
        (found cluster-wide by the config-namespace label, so a gateway that moved is pruned)."""
        where: list[tuple[str | None, str, str | None]] = [
            (self.options.extproc_namespace if res is AUTHORIZATIONPOLICIES else namespace, name, None)]
        if res is ENVOYFILTERS:
            where.append((None, name, namespace))
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for list_ns, config, config_ns in where:
            for item in self.kube.list(res, list_ns, naming.label_selector(config, config_ns)).get("items", []):
                # Another namespace's config of the same name labels its objects here too.
                if naming.config_namespace_of(item) == namespace:
                    found[(item["metadata"]["namespace"], item["metadata"]["name"])] = item
        return found

    def remote_keys(self, namespace: str | None = None) -> set[str]:
        """Configs (``<namespace>/<name>``, within ``namespace`` if given) that own objects in
        other namespaces. The resync reconciles them too: a config deleted while no controller
        ran leaves no key in the informer, and its policy and gateway filter have no owner the
        garbage collector would follow."""
        keys: set[str] = set()
        where = ((AUTHORIZATIONPOLICIES, self.options.extproc_namespace), (ENVOYFILTERS, None))
        for res, list_ns in where:
            try:
                items = self.kube.list(res, list_ns, naming.MANAGED_SELECTOR).get("items", [])
            except KubeError as exc:
                log.warning("cannot list generated objects", extra={"kind": res.kind, "error": str(exc)})
                continue
            for item in items:
                labels = item["metadata"].get("labels") or {}
                config_ns, config = labels.get(naming.CONFIG_NAMESPACE_LABEL), labels.get(naming.CONFIG_LABEL)
                if config_ns and config and namespace in (None, config_ns):
                    keys.add(f"{config_ns}/{config}")
        return keys

    def _apply_and_prune(
        self,
        cr: dict[str, Any],
        cfg: HolySheepConfig,
        desired: list[dict[str, Any]],
        trigger: str,
        generation: int,
    ) -> None:
        owner = owner_reference(cr)
        for obj in desired:
            if obj["metadata"]["namespace"] == cfg.namespace:  # references cannot cross namespaces
                obj["metadata"]["ownerReferences"] = [owner]
        for res in GENERATED:
            live = self._live(res, cfg.namespace, cfg.name)
            wanted = [o for o in desired if o["kind"] == res.kind]
            for obj in wanted:
                why = _drift(obj, live.get((obj["metadata"]["namespace"], obj["metadata"]["name"])))
                if why is None:
                    continue
                self._guard()
                self.kube.apply(obj, naming.FIELD_MANAGER)
                log.info(
                    "applied",
                    extra={
                        "config": f"{cfg.namespace}/{cfg.name}",
                        "kind": res.kind,
                        "namespace": obj["metadata"]["namespace"],
                        "object": obj["metadata"]["name"],
                        "reason": why,
                        "trigger": trigger,
                        "generation": generation,
                    },
                )
            keys = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in wanted}
            for key, stale in live.items():
                if key not in keys:
                    self._delete(res, stale, f"{cfg.namespace}/{cfg.name}", "no longer desired")

    def _delete(self, res: Resource, obj: dict[str, Any], config: str, why: str) -> None:
        self._guard()
        meta = obj["metadata"]
        try:
            self.kube.delete(res, meta["namespace"], meta["name"], meta.get("uid"))
        except NotFound:
            pass  # already gone: the outcome we wanted
        log.info(
            "pruned",
            extra={"config": config, "kind": res.kind, "namespace": meta["namespace"], "object": meta["name"],
                   "reason": why},
        )

    def _cleanup(self, namespace: str, name: str) -> None:
        # The garbage collector would also do this through the ownerReferences; doing it here
        # makes deletion prompt and independent of GC (and of foreground/orphan policies), and
        # it is the only cleanup of the objects in other namespaces. Users before what they use:
        # the EnvoyFilter goes before the AuthorizationPolicy that lets its proxies call.
        for res in reversed(GENERATED):
            for obj in self._live(res, namespace, name).values():
                self._delete(res, obj, f"{namespace}/{name}", "config deleted")

    def _write_status(self, cr: dict[str, Any], new: dict[str, Any]) -> None:
        old = cr.get("status") or {}
        new["conditions"] = status.merge_conditions(old.get("conditions"), new["conditions"])
        if status.same_status(old, new):
            return
        self._guard()
        meta = cr["metadata"]
        self.kube.patch_status(HOLYSHEEPCONFIGS, meta["namespace"], meta["name"], new)

    def _write_ready(
        self, cr: dict[str, Any], cfg: HolySheepConfig, generation: int, secrets: SecretCheck
    ) -> None:
        configured = f"{len(cfg.providers)} provider(s) configured"
        if secrets.missing:
            ready = status.condition(
                "Ready",
                False,
                "SecretNotFound",
                f"Secret(s) {', '.join(secrets.missing)} not found in namespace {cfg.namespace}; "
                "the mesh objects are applied and the data plane will pick the Secret up once it exists",
                generation,
            )
        elif secrets.unverified:
            ready = status.condition(
                "Ready",
                True,
                "ReconciledSecretsUnverified",
                f"{configured}; whether the Secret(s) exist is not known: see SecretsVerified",
                generation,
            )
        else:
            ready = status.condition("Ready", True, "Reconciled", configured, generation)
        invalid = status.condition("Invalid", False, "Valid", "spec is valid", generation)
        self._write_status(
            cr,
            {
                "observedGeneration": generation,
                "conditions": [ready, invalid, _secrets_condition(cfg, secrets, generation)],
                "providerNames": ",".join(p.name for p in cfg.providers),
                "providers": [_provider_status(p.name, p.host, p.auth.secret_name, secrets) for p in cfg.providers],
            },
        )

    def _invalid(self, cr: dict[str, Any], generation: int, message: str) -> None:
        old = cr.get("status") or {}
        before = {c.get("type"): c for c in old.get("conditions", [])}.get("Invalid", {})
        meta = cr["metadata"]
        log.warning(
            "invalid spec; generated objects left as they are",
            extra={
                "config": f"{meta['namespace']}/{meta['name']}",
                "generation": generation,
                "error": message,
            },
        )
        new_status = dict(old)
        new_status["conditions"] = [
            status.condition("Ready", False, "InvalidSpec", message, generation),
            status.condition("Invalid", True, "InvalidSpec", message, generation),
            # Others (SecretsVerified) describe the last good config, which stays in force.
            *(c for c in old.get("conditions", []) if c.get("type") not in ("Ready", "Invalid")),
        ]
        # observedGeneration tells users this generation was seen (and refused).
        new_status["observedGeneration"] = generation
        repeated = (
            before.get("status") == "True"
            and before.get("message") == message
            and before.get("observedGeneration") == generation
        )
        self._write_status(cr, new_status)
        if not repeated:
            self._event(cr, "Warning", "InvalidSpec", message)

    def _event(self, cr: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self._guard()
        meta = cr["metadata"]
        ts = status.now()
        self.kube.create(
            EVENTS,
            meta["namespace"],
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                "involvedObject": {
                    "apiVersion": cr["apiVersion"],
                    "kind": cr["kind"],
                    "name": meta["name"],
                    "namespace": meta["namespace"],
                    "uid": meta.get("uid"),
                    "resourceVersion": meta.get("resourceVersion"),
                },
                "type": type_,
                "reason": reason,
                "message": message[:1024],
                "source": {"component": naming.FIELD_MANAGER},
                "reportingComponent": naming.FIELD_MANAGER,
                "reportingInstance": self.identity,
                "firstTimestamp": ts,
                "lastTimestamp": ts,
                "count": 1,
            },
        )


def _provider_status(name: str, host: str, secret: str | None, secrets: SecretCheck) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "host": host}
    if secret:
        entry["secretName"] = secret
        found = secrets.found(secret)
        if found is not None:  # absent when unknown: never a guess
            entry["secretFound"] = found
    return entry


def _secrets_condition(cfg: HolySheepConfig, secrets: SecretCheck, generation: int) -> dict[str, Any]:
    where = f"in namespace {cfg.namespace}"
    if not secrets.keys:
        return status.condition("SecretsVerified", True, "NoneReferenced", "no provider names a Secret", generation)
    if secrets.missing:
        message = f"not found {where}: {secrets.describe(secrets.missing)}"
        if secrets.unverified:
            message += f"; not readable (forbidden): {secrets.describe(secrets.unverified)}"
        return status.condition("SecretsVerified", False, "NotFound", message, generation)
    if secrets.unverified:
        return status.condition(
            "SecretsVerified",
            None,
            "Forbidden",
            f"the controller may not read Secrets {where} (RBAC), so it cannot tell whether these exist: "
            f"{secrets.describe(secrets.unverified)}",
            generation,
        )
    found = f"found {where}: {secrets.describe(sorted(secrets.keys))}"
    return status.condition("SecretsVerified", True, "Found", found, generation)
