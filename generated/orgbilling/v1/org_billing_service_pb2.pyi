import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from orgbilling.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateSubscriptionRequest(_message.Message):
    __slots__ = ("org_id", "plan", "billing_cycle", "trial_days", "external_customer_id", "external_subscription_id", "idempotency_key")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    BILLING_CYCLE_FIELD_NUMBER: _ClassVar[int]
    TRIAL_DAYS_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    plan: _types_pb2.Plan
    billing_cycle: _types_pb2.BillingCycle
    trial_days: int
    external_customer_id: str
    external_subscription_id: str
    idempotency_key: str
    def __init__(self, org_id: _Optional[str] = ..., plan: _Optional[_Union[_types_pb2.Plan, str]] = ..., billing_cycle: _Optional[_Union[_types_pb2.BillingCycle, str]] = ..., trial_days: _Optional[int] = ..., external_customer_id: _Optional[str] = ..., external_subscription_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class CreateSubscriptionResponse(_message.Message):
    __slots__ = ("subscription", "replayed")
    SUBSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    subscription: _types_pb2.Subscription
    replayed: bool
    def __init__(self, subscription: _Optional[_Union[_types_pb2.Subscription, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class GetSubscriptionRequest(_message.Message):
    __slots__ = ("org_id",)
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    def __init__(self, org_id: _Optional[str] = ...) -> None: ...

class GetSubscriptionResponse(_message.Message):
    __slots__ = ("subscription",)
    SUBSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    subscription: _types_pb2.Subscription
    def __init__(self, subscription: _Optional[_Union[_types_pb2.Subscription, _Mapping]] = ...) -> None: ...

class ChangePlanRequest(_message.Message):
    __slots__ = ("org_id", "plan", "billing_cycle", "idempotency_key")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    BILLING_CYCLE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    plan: _types_pb2.Plan
    billing_cycle: _types_pb2.BillingCycle
    idempotency_key: str
    def __init__(self, org_id: _Optional[str] = ..., plan: _Optional[_Union[_types_pb2.Plan, str]] = ..., billing_cycle: _Optional[_Union[_types_pb2.BillingCycle, str]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class ChangePlanResponse(_message.Message):
    __slots__ = ("subscription", "change", "replayed")
    SUBSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    subscription: _types_pb2.Subscription
    change: _types_pb2.PlanChange
    replayed: bool
    def __init__(self, subscription: _Optional[_Union[_types_pb2.Subscription, _Mapping]] = ..., change: _Optional[_Union[_types_pb2.PlanChange, str]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class CancelSubscriptionRequest(_message.Message):
    __slots__ = ("org_id", "reason", "idempotency_key")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    reason: str
    idempotency_key: str
    def __init__(self, org_id: _Optional[str] = ..., reason: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class CancelSubscriptionResponse(_message.Message):
    __slots__ = ("subscription", "replayed")
    SUBSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    subscription: _types_pb2.Subscription
    replayed: bool
    def __init__(self, subscription: _Optional[_Union[_types_pb2.Subscription, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class GetCreditPoolRequest(_message.Message):
    __slots__ = ("org_id",)
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    def __init__(self, org_id: _Optional[str] = ...) -> None: ...

class GetCreditPoolResponse(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: _types_pb2.CreditPool
    def __init__(self, pool: _Optional[_Union[_types_pb2.CreditPool, _Mapping]] = ...) -> None: ...

class AddCreditsRequest(_message.Message):
    __slots__ = ("org_id", "source", "amount_millicredits", "payment_reference", "amount_paid_cents", "currency", "reason", "idempotency_key")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_PAID_CENTS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    source: _types_pb2.CreditSource
    amount_millicredits: int
    payment_reference: str
    amount_paid_cents: int
    currency: str
    reason: str
    idempotency_key: str
    def __init__(self, org_id: _Optional[str] = ..., source: _Optional[_Union[_types_pb2.CreditSource, str]] = ..., amount_millicredits: _Optional[int] = ..., payment_reference: _Optional[str] = ..., amount_paid_cents: _Optional[int] = ..., currency: _Optional[str] = ..., reason: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class AddCreditsResponse(_message.Message):
    __slots__ = ("pool", "event_id", "added_millicredits", "replayed")
    POOL_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ADDED_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    pool: _types_pb2.CreditPool
    event_id: str
    added_millicredits: int
    replayed: bool
    def __init__(self, pool: _Optional[_Union[_types_pb2.CreditPool, _Mapping]] = ..., event_id: _Optional[str] = ..., added_millicredits: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class SetOverageRequest(_message.Message):
    __slots__ = ("org_id", "overage_limit_millicredits", "overage_rate_millicents_per_credit", "idempotency_key")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_LIMIT_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_RATE_MILLICENTS_PER_CREDIT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    overage_limit_millicredits: int
    overage_rate_millicents_per_credit: int
    idempotency_key: str
    def __init__(self, org_id: _Optional[str] = ..., overage_limit_millicredits: _Optional[int] = ..., overage_rate_millicents_per_credit: _Optional[int] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class SetOverageResponse(_message.Message):
    __slots__ = ("pool", "event_id", "replayed")
    POOL_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    pool: _types_pb2.CreditPool
    event_id: str
    replayed: bool
    def __init__(self, pool: _Optional[_Union[_types_pb2.CreditPool, _Mapping]] = ..., event_id: _Optional[str] = ..., replayed: _Optional[bool] = ...) -> None: ...

class SetCreditRefreshRequest(_message.Message):
    __slots__ = ("org_id", "refresh_millicredits", "rollover_cap_millicredits", "idempotency_key")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    REFRESH_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    ROLLOVER_CAP_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    refresh_millicredits: int
    rollover_cap_millicredits: int
    idempotency_key: str
    def __init__(self, org_id: _Optional[str] = ..., refresh_millicredits: _Optional[int] = ..., rollover_cap_millicredits: _Optional[int] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class SetCreditRefreshResponse(_message.Message):
    __slots__ = ("pool", "event_id", "replayed")
    POOL_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    pool: _types_pb2.CreditPool
    event_id: str
    replayed: bool
    def __init__(self, pool: _Optional[_Union[_types_pb2.CreditPool, _Mapping]] = ..., event_id: _Optional[str] = ..., replayed: _Optional[bool] = ...) -> None: ...

class AllocateCreditsRequest(_message.Message):
    __slots__ = ("org_id", "user_id", "limit_millicredits", "reset_period", "idempotency_key")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    RESET_PERIOD_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    user_id: str
    limit_millicredits: int
    reset_period: _types_pb2.ResetPeriod
    idempotency_key: str
    def __init__(self, org_id: _Optional[str] = ..., user_id: _Optional[str] = ..., limit_millicredits: _Optional[int] = ..., reset_period: _Optional[_Union[_types_pb2.ResetPeriod, str]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class AllocateCreditsResponse(_message.Message):
    __slots__ = ("allocation", "pool", "replayed")
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    allocation: _types_pb2.Allocation
    pool: _types_pb2.CreditPool
    replayed: bool
    def __init__(self, allocation: _Optional[_Union[_types_pb2.Allocation, _Mapping]] = ..., pool: _Optional[_Union[_types_pb2.CreditPool, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class RevokeAllocationRequest(_message.Message):
    __slots__ = ("org_id", "user_id", "idempotency_key")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    user_id: str
    idempotency_key: str
    def __init__(self, org_id: _Optional[str] = ..., user_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class RevokeAllocationResponse(_message.Message):
    __slots__ = ("allocation", "pool", "replayed")
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    allocation: _types_pb2.Allocation
    pool: _types_pb2.CreditPool
    replayed: bool
    def __init__(self, allocation: _Optional[_Union[_types_pb2.Allocation, _Mapping]] = ..., pool: _Optional[_Union[_types_pb2.CreditPool, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class ListAllocationsRequest(_message.Message):
    __slots__ = ("org_id", "page_size", "page_token", "include_revoked")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REVOKED_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    page_size: int
    page_token: str
    include_revoked: bool
    def __init__(self, org_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., include_revoked: _Optional[bool] = ...) -> None: ...

class ListAllocationsResponse(_message.Message):
    __slots__ = ("allocations", "next_page_token")
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    allocations: _containers.RepeatedCompositeFieldContainer[_types_pb2.Allocation]
    next_page_token: str
    def __init__(self, allocations: _Optional[_Iterable[_Union[_types_pb2.Allocation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RecordInvoiceRequest(_message.Message):
    __slots__ = ("org_id", "external_invoice_id", "status", "amount_cents", "currency", "period_start_time", "period_end_time")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_INVOICE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_CENTS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_TIME_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_TIME_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    external_invoice_id: str
    status: _types_pb2.InvoiceStatus
    amount_cents: int
    currency: str
    period_start_time: _timestamp_pb2.Timestamp
    period_end_time: _timestamp_pb2.Timestamp
    def __init__(self, org_id: _Optional[str] = ..., external_invoice_id: _Optional[str] = ..., status: _Optional[_Union[_types_pb2.InvoiceStatus, str]] = ..., amount_cents: _Optional[int] = ..., currency: _Optional[str] = ..., period_start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., period_end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RecordInvoiceResponse(_message.Message):
    __slots__ = ("invoice", "subscription", "event_id", "replayed")
    INVOICE_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    invoice: _types_pb2.Invoice
    subscription: _types_pb2.Subscription
    event_id: str
    replayed: bool
    def __init__(self, invoice: _Optional[_Union[_types_pb2.Invoice, _Mapping]] = ..., subscription: _Optional[_Union[_types_pb2.Subscription, _Mapping]] = ..., event_id: _Optional[str] = ..., replayed: _Optional[bool] = ...) -> None: ...
