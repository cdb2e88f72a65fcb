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
