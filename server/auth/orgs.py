"""Which organizations a request acts on: every `org_id` field in it, at any
depth (DeductCreditsBatch carries one per deduction).

Which fields can hold an org_id is worked out once per message type from its
descriptor, so a call only reads those fields.
"""

import functools

from google.protobuf.descriptor import Descriptor, FieldDescriptor

ORG_ID_FIELD = "org_id"


def org_ids_in(message) -> set[str]:
    """Every non-empty org_id in the message."""
    found: set[str] = set()
    _collect(message, found)
    return found


def _collect(message, found: set[str]) -> None:
    for name, kind in _org_paths(message.DESCRIPTOR):
        value = getattr(message, name)
        if kind == "id":
            if value:
                found.add(value)
        elif kind == "ids":
            found.update(item for item in value if item)
        elif kind == "message":
            if message.HasField(name):
                _collect(value, found)
        else:  # "messages"
            for item in value:
                _collect(item, found)


@functools.cache
def _org_paths(descriptor: Descriptor) -> tuple[tuple[str, str], ...]:
    """(field name, kind) of the fields that are, or may contain, an org_id."""
    paths = []
    for field in descriptor.fields:
        repeated = field.is_repeated if hasattr(field, "is_repeated") else (
            field.label == FieldDescriptor.LABEL_REPEATED)
        if field.name == ORG_ID_FIELD and field.type == FieldDescriptor.TYPE_STRING:
            paths.append((field.name, "ids" if repeated else "id"))
        elif (field.type == FieldDescriptor.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry
              and _may_contain_org_id(field.message_type, frozenset())):
            paths.append((field.name, "messages" if repeated else "message"))
    return tuple(paths)


def _may_contain_org_id(descriptor: Descriptor, seen: frozenset[str]) -> bool:
    if descriptor.full_name in seen:
        return False
    seen = seen | {descriptor.full_name}
    for field in descriptor.fields:
        if field.name == ORG_ID_FIELD and field.type == FieldDescriptor.TYPE_STRING:
            return True
        if (field.type == FieldDescriptor.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry
                and _may_contain_org_id(field.message_type, seen)):
            return True
    return False
