"""Small server interceptors. None does blocking I/O in intercept_service:
each wraps the handler, and its work runs in the call's worker thread."""

import grpc


def wrap_unary(handler: grpc.RpcMethodHandler, behavior) -> grpc.RpcMethodHandler:
    """A unary-unary handler like `handler` whose behavior is `behavior`."""
    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
