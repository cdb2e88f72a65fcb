"""Authentication and authorization, before anything else a call does.

For every call outside the open services (health and reflection by default,
setting unauthenticated_services) it checks, in this order, and refuses at
the first failure:
1. the credentials (UNAUTHENTICATED): before the request is even decoded,
   so a bad caller learns nothing about its request's validity;
2. the scope the method requires, from orgbilling.server.auth.scopes (PERMISSION_DENIED,
   MISSING_SCOPE; a method with no declared scope is refused to everyone);
3. the organizations the request names, for a credential limited to some
   (PERMISSION_DENIED, ORG_NOT_PERMITTED).
The admitted Caller is then available to inner layers (the rate limiter,
the servicers) as call.caller and server.auth.caller.caller_var.
"""

import logging

from orgbilling.server.auth.authenticator import Authenticator
from orgbilling.server.auth.caller import Caller, caller_var
from orgbilling.server.auth.orgs import org_ids_in
from orgbilling.server.auth.scopes import FILTERED_BY_CALLER_ORGS, required_scope
from orgbilling.server.errors import missing_scope, org_not_permitted, scope_not_declared
from orgbilling.server.interceptors import Call, Interceptor, Method

log = logging.getLogger(__name__)


class AuthInterceptor(Interceptor):
    def __init__(self, authenticator: Authenticator, *, open_services: frozenset[str]):
        self._authenticator = authenticator
        self._open_services = open_services

    def applies_to(self, method: Method) -> bool:
        return method.service not in self._open_services

    def intercept(self, call: Call):
        caller = self._authenticator.authenticate(call.metadata, call.context.auth_context())
        _authorize(call, caller)
        call.caller = caller
        caller_var.set(caller)
        return None


def _authorize(call: Call, caller: Caller) -> None:
    """Raises the refusal when `caller` may not make `call`."""
    method = call.method.path
    scope = required_scope(method)
    if scope is None:
        log.error("%s has no scope in server/auth/scopes.py: refused to everyone", method)
        raise scope_not_declared(method)
    if scope and scope not in caller.scopes:
        raise missing_scope(method, scope)
    if caller.org_ids is None or scope == "" or method in FILTERED_BY_CALLER_ORGS:
        return
    # Decoding the request now, after the caller is known: it may be refused as malformed.
    request = call.request
    org_ids = org_ids_in(request) if request is not None else set()
    if not org_ids:
        raise org_not_permitted(None)
    for org_id in sorted(org_ids):
        if not caller.may_act_on(org_id):
            raise org_not_permitted(org_id)
