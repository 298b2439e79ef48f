"""What a Kubernetes API request means: verb, API group/version, resource, subresource, namespace, name.

The rules are the API server's own (k8s.io/apiserver `RequestInfoFactory.NewRequestInfo`), so that a
policy written in RBAC terms ("delete secrets in prod") means what an RBAC rule would:

* `/api/v1/...` is the core group, `/apis/GROUP/VERSION/...` a named group; anything else is a
  non-resource request (`/version`, `/healthz`) whose verb is the lower-case method.
* The method gives the verb: GET/HEAD get, POST create, PUT update, PATCH patch, DELETE delete;
  a GET without a name is `list`, or `watch` with `?watch=true` (or the legacy `/watch/` prefix);
  a DELETE without a name is `deletecollection`.
* `namespaces/NS/RESOURCE/...` names a namespaced resource; `namespaces/NS/status|finalize` is the
  namespace's own subresource.

Unlike RBAC (where `kubectl exec` is `create` on `pods/exec`), the verb of the streaming
subresources is the subresource itself — exec, attach, portforward, proxy, log — because that is
what a rule means by "exec into pods"; `rbac_verb` keeps the API server's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

_VERBS = {"GET": "get", "HEAD": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
_NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})
STREAMING_SUBRESOURCES = frozenset({"exec", "attach", "portforward", "proxy", "log"})


@dataclass(frozen=True)
class RequestInfo:
    method: str
    path: str
    verb: str
    resource_request: bool
    rbac_verb: str = ""
    api_prefix: str = ""
    group: str = ""
    version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    query: dict[str, list[str]] = field(default_factory=dict)

    @property
    def objects(self) -> tuple[str, ...]:
        """What the request touches, as `resource[/name][/subresource]` (group-qualified outside the core)."""
        if not self.resource_request or not self.resource:
            return (self.path,)
        resource = f"{self.resource}.{self.group}" if self.group else self.resource
        named = f"{resource}/{self.name}" if self.name else resource
        return (f"{named}/{self.subresource}" if self.subresource else named,)

    @property
    def command(self) -> list[str]:
        """exec's `?command=` arguments, in order."""
        return self.query.get("command", [])

    def attributes(self) -> dict[str, str]:
        """The operation attributes policy matches on (absent fields are left out)."""
        out = {"method": self.method, "path": self.path, "verb": self.verb}
        for key in ("rbac_verb", "group", "version", "namespace", "resource", "subresource", "name"):
            value = getattr(self, key)
            if value:
                out[key] = value
        if self.group or self.version:
            out["api_version"] = f"{self.group}/{self.version}" if self.group else self.version
        if self.query.get("container"):
            out["container"] = self.query["container"][0]
        return out


def request_info(method: str, target: str) -> RequestInfo:
    """The meaning of `METHOD target` (target: path and query as sent)."""
    method = method.upper()
    parts_url = urlsplit(target)
    path = unquote(parts_url.path) or "/"
    query = parse_qs(parts_url.query, keep_blank_values=True)
    parts = [p for p in path.strip("/").split("/")] if path.strip("/") else []
    plain = RequestInfo(method=method, path=path, verb=method.lower(), resource_request=False, query=query)
    if len(parts) < 2 or parts[0] not in ("api", "apis"):
        return plain
    prefix, rest = parts[0], parts[1:]
    if prefix == "apis":
        if len(rest) < 2:
            return plain  # /apis/GROUP: discovery
        group, version, rest = rest[0], rest[1], rest[2:]
    else:
        group, version, rest = "", rest[0], rest[1:]
    if not rest:
        return RequestInfo(method=method, path=path, verb=method.lower(), resource_request=False,
                           api_prefix=prefix, group=group, version=version, query=query)
    verb = _VERBS.get(method, method.lower())
    if rest[0] == "watch":  # the deprecated /api/v1/watch/... form
        verb, rest = "watch", rest[1:]
    namespace = ""
    if rest and rest[0] == "namespaces":
        if len(rest) > 1:
            namespace = rest[1]
            if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
                rest = rest[2:]
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) >= 2 else ""
    subresource = rest[2] if len(rest) >= 3 else ""
    watch = query.get("watch", [""])[0].lower() in ("1", "true")
    if not name and verb == "get":
        verb = "watch" if watch else "list"
    elif verb == "get" and watch:
        verb = "watch"
    if not name and verb == "delete":
        verb = "deletecollection"
    rbac_verb = verb
    if subresource in STREAMING_SUBRESOURCES:
        verb = subresource
    return RequestInfo(method=method, path=path, verb=verb, resource_request=True, rbac_verb=rbac_verb,
                       api_prefix=prefix, group=group, version=version, namespace=namespace,
                       resource=resource, subresource=subresource, name=name, query=query)


__all__ = ["RequestInfo", "STREAMING_SUBRESOURCES", "request_info"]
