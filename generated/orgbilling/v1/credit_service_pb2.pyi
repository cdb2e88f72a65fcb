import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from orgbilling.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CheckCreditsRequest(_message.Message):
    __slots__ = ("org_id", "user_id", "amount_millicredits")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    user_id: str
    amount_millicredits: int
    def __init__(self, org_id: _Optional[str] = ..., user_id: _Optional[str] = ..., amount_millicredits: _Optional[int] = ...) -> None: ...

class CheckCreditsResponse(_message.Message):
    __slots__ = ("sufficient", "allocation_remaining_millicredits", "pool_spendable_millicredits")
    SUFFICIENT_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_REMAINING_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    POOL_SPENDABLE_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    sufficient: bool
    allocation_remaining_millicredits: int
    pool_spendable_millicredits: int
    def __init__(self, sufficient: _Optional[bool] = ..., allocation_remaining_millicredits: _Optional[int] = ..., pool_spendable_millicredits: _Optional[int] = ...) -> None: ...

class DeductCreditsRequest(_message.Message):
    __slots__ = ("org_id", "user_id", "amount_millicredits", "service_type", "service_name", "idempotency_key", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    user_id: str
    amount_millicredits: int
    service_type: str
    service_name: str
    idempotency_key: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, org_id: _Optional[str] = ..., user_id: _Optional[str] = ..., amount_millicredits: _Optional[int] = ..., service_type: _Optional[str] = ..., service_name: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DeductCreditsResponse(_message.Message):
    __slots__ = ("deduction_id", "allocation_remaining_millicredits", "pool_spendable_millicredits", "replayed")
    DEDUCTION_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_REMAINING_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    POOL_SPENDABLE_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    deduction_id: str
    allocation_remaining_millicredits: int
    pool_spendable_millicredits: int
    replayed: bool
    def __init__(self, deduction_id: _Optional[str] = ..., allocation_remaining_millicredits: _Optional[int] = ..., pool_spendable_millicredits: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class DeductCreditsBatchRequest(_message.Message):
    __slots__ = ("deductions", "all_or_nothing")
    DEDUCTIONS_FIELD_NUMBER: _ClassVar[int]
    ALL_OR_NOTHING_FIELD_NUMBER: _ClassVar[int]
    deductions: _containers.RepeatedCompositeFieldContainer[DeductCreditsRequest]
    all_or_nothing: bool
    def __init__(self, deductions: _Optional[_Iterable[_Union[DeductCreditsRequest, _Mapping]]] = ..., all_or_nothing: _Optional[bool] = ...) -> None: ...

class DeductCreditsBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DeductCreditsBatchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[DeductCreditsBatchResult, _Mapping]]] = ...) -> None: ...

class DeductCreditsBatchResult(_message.Message):
    __slots__ = ("deduction", "error")
    DEDUCTION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    deduction: DeductCreditsResponse
    error: DeductCreditsBatchError
    def __init__(self, deduction: _Optional[_Union[DeductCreditsResponse, _Mapping]] = ..., error: _Optional[_Union[DeductCreditsBatchError, _Mapping]] = ...) -> None: ...

class DeductCreditsBatchError(_message.Message):
    __slots__ = ("code", "reason", "message", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    message: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ReserveCreditsRequest(_message.Message):
    __slots__ = ("org_id", "user_id", "amount_millicredits", "ttl", "service_type", "service_name", "idempotency_key", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    user_id: str
    amount_millicredits: int
    ttl: _duration_pb2.Duration
    service_type: str
    service_name: str
    idempotency_key: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, org_id: _Optional[str] = ..., user_id: _Optional[str] = ..., amount_millicredits: _Optional[int] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., service_type: _Optional[str] = ..., service_name: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ReserveCreditsResponse(_message.Message):
    __slots__ = ("reservation_id", "expire_time", "allocation_remaining_millicredits", "pool_spendable_millicredits", "replayed")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_REMAINING_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    POOL_SPENDABLE_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    expire_time: _timestamp_pb2.Timestamp
    allocation_remaining_millicredits: int
    pool_spendable_millicredits: int
    replayed: bool
    def __init__(self, reservation_id: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., allocation_remaining_millicredits: _Optional[int] = ..., pool_spendable_millicredits: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class CommitReservationRequest(_message.Message):
    __slots__ = ("org_id", "reservation_id", "amount_millicredits", "metadata", "idempotency_key")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    reservation_id: str
    amount_millicredits: int
    metadata: _containers.ScalarMap[str, str]
    idempotency_key: str
    def __init__(self, org_id: _Optional[str] = ..., reservation_id: _Optional[str] = ..., amount_millicredits: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class CommitReservationResponse(_message.Message):
    __slots__ = ("deduction_id", "allocation_remaining_millicredits", "pool_spendable_millicredits", "replayed")
    DEDUCTION_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_REMAINING_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    POOL_SPENDABLE_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    deduction_id: str
    allocation_remaining_millicredits: int
    pool_spendable_millicredits: int
    replayed: bool
    def __init__(self, deduction_id: _Optional[str] = ..., allocation_remaining_millicredits: _Optional[int] = ..., pool_spendable_millicredits: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class ReleaseReservationRequest(_message.Message):
    __slots__ = ("org_id", "reservation_id", "idempotency_key")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    reservation_id: str
    idempotency_key: str
    def __init__(self, org_id: _Optional[str] = ..., reservation_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class ReleaseReservationResponse(_message.Message):
    __slots__ = ("allocation_remaining_millicredits", "pool_spendable_millicredits", "replayed")
    ALLOCATION_REMAINING_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    POOL_SPENDABLE_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    allocation_remaining_millicredits: int
    pool_spendable_millicredits: int
    replayed: bool
    def __init__(self, allocation_remaining_millicredits: _Optional[int] = ..., pool_spendable_millicredits: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class GetReservationRequest(_message.Message):
    __slots__ = ("org_id", "reservation_id")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    reservation_id: str
    def __init__(self, org_id: _Optional[str] = ..., reservation_id: _Optional[str] = ...) -> None: ...

class GetReservationResponse(_message.Message):
    __slots__ = ("reservation",)
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    reservation: _types_pb2.Reservation
    def __init__(self, reservation: _Optional[_Union[_types_pb2.Reservation, _Mapping]] = ...) -> None: ...

class ListReservationsRequest(_message.Message):
    __slots__ = ("org_id", "state", "page_size", "page_token")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    state: _types_pb2.ReservationState
    page_size: int
    page_token: str
    def __init__(self, org_id: _Optional[str] = ..., state: _Optional[_Union[_types_pb2.ReservationState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListReservationsResponse(_message.Message):
    __slots__ = ("reservations", "next_page_token")
    RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    reservations: _containers.RepeatedCompositeFieldContainer[_types_pb2.Reservation]
    next_page_token: str
    def __init__(self, reservations: _Optional[_Iterable[_Union[_types_pb2.Reservation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RefundCreditsRequest(_message.Message):
    __slots__ = ("org_id", "deduction_id", "amount_millicredits", "reason", "idempotency_key")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    DEDUCTION_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    deduction_id: str
    amount_millicredits: int
    reason: str
    idempotency_key: str
    def __init__(self, org_id: _Optional[str] = ..., deduction_id: _Optional[str] = ..., amount_millicredits: _Optional[int] = ..., reason: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class RefundCreditsResponse(_message.Message):
    __slots__ = ("refund_id", "allocation_remaining_millicredits", "pool_spendable_millicredits", "replayed")
    REFUND_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_REMAINING_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    POOL_SPENDABLE_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    refund_id: str
    allocation_remaining_millicredits: int
    pool_spendable_millicredits: int
    replayed: bool
    def __init__(self, refund_id: _Optional[str] = ..., allocation_remaining_millicredits: _Optional[int] = ..., pool_spendable_millicredits: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...
