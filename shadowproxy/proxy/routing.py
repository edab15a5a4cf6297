"""Route matching: first route whose match block accepts the request wins. Pure."""

from __future__ import annotations

from shadowproxy.config.settings import RouteSettings


def _strip_port(host: str) -> str:
    if host.startswith("["):  # [::1]:8080
        return host[: host.find("]") + 1].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


def route_matches(route: RouteSettings, method: str, path: str, host: str) -> bool:
    match = route.match
    if match.methods and method not in match.methods:
        return False
    if match.host is not None and _strip_port(host) != match.host:
        return False
    if match.path is not None:
        return path == match.path
    prefix = match.path_prefix or "/"
    if not path.startswith(prefix):
        return False
    # "/predict" matches "/predict" and "/predict/x" but not "/predictions".
    return len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] in "/?"


class RouteTable:
    def __init__(self, routes: tuple[RouteSettings, ...]) -> None:
        self.routes = routes

    def match(self, method: str, path: str, host: str) -> RouteSettings | None:
        for route in self.routes:
            if route_matches(route, method, path, host):
                return route
        return None
