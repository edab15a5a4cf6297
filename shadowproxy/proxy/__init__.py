"""The request path: handler, mirroring, config generations, upstream pools, routing, breaker, overload."""
