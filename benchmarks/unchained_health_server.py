"""`orgbilling serve` whose health service is added to grpc.aio as the bare
server adds it (benchmarks.bare_server), outside the interceptor chain:
no request ID, no error mapping, no draining, access log or deadline on a
health call. Every other service goes through the chain as in the real
server.

    python -m benchmarks.unchained_health_server serve    # as `orgbilling serve`

What the chain costs a no-op, the rest of the server unchanged: `python -m
benchmarks.profile --unchained-health` next to `--scenario noop` and
`--bare` (benchmarks/README.md, "The no-op: the chain on and off").
"""

from grpc_health.v1 import health_pb2

from orgbilling.server.cli import main
from orgbilling.server.interceptors import ChainedServices

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

_add_generic = ChainedServices.add_generic_rpc_handlers
_add_registered = ChainedServices.add_registered_method_handlers


def _is_health(handler) -> bool:
    service_name = getattr(handler, "service_name", None)
    return service_name is not None and service_name() == HEALTH_SERVICE


def add_generic_rpc_handlers(services: ChainedServices, handlers) -> None:
    health = tuple(h for h in handlers if _is_health(h))
    if health:
        services._server.add_generic_rpc_handlers(health)
    _add_generic(services, tuple(h for h in handlers if h not in health))


def add_registered_method_handlers(services: ChainedServices, service_name: str,
                                   method_handlers: dict) -> None:
    if service_name == HEALTH_SERVICE:
        services._server.add_registered_method_handlers(service_name, method_handlers)
    else:
        _add_registered(services, service_name, method_handlers)


if __name__ == "__main__":
    ChainedServices.add_generic_rpc_handlers = add_generic_rpc_handlers
    ChainedServices.add_registered_method_handlers = add_registered_method_handlers
    main()
