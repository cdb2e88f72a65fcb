import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Plan(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLAN_UNSPECIFIED: _ClassVar[Plan]
    PLAN_PLATFORM: _ClassVar[Plan]
    PLAN_BYOK: _ClassVar[Plan]
    PLAN_HYBRID: _ClassVar[Plan]

class BillingCycle(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BILLING_CYCLE_UNSPECIFIED: _ClassVar[BillingCycle]
    BILLING_CYCLE_MONTHLY: _ClassVar[BillingCycle]
    BILLING_CYCLE_YEARLY: _ClassVar[BillingCycle]

class SubscriptionStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUBSCRIPTION_STATUS_UNSPECIFIED: _ClassVar[SubscriptionStatus]
    SUBSCRIPTION_STATUS_TRIALING: _ClassVar[SubscriptionStatus]
    SUBSCRIPTION_STATUS_ACTIVE: _ClassVar[SubscriptionStatus]
    SUBSCRIPTION_STATUS_PAST_DUE: _ClassVar[SubscriptionStatus]
    SUBSCRIPTION_STATUS_CANCELED: _ClassVar[SubscriptionStatus]

class ResetPeriod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESET_PERIOD_UNSPECIFIED: _ClassVar[ResetPeriod]
    RESET_PERIOD_DAILY: _ClassVar[ResetPeriod]
    RESET_PERIOD_WEEKLY: _ClassVar[ResetPeriod]
    RESET_PERIOD_MONTHLY: _ClassVar[ResetPeriod]
    RESET_PERIOD_NEVER: _ClassVar[ResetPeriod]

class CreditSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CREDIT_SOURCE_UNSPECIFIED: _ClassVar[CreditSource]
    CREDIT_SOURCE_PURCHASE: _ClassVar[CreditSource]
    CREDIT_SOURCE_GRANT: _ClassVar[CreditSource]
    CREDIT_SOURCE_ADJUSTMENT: _ClassVar[CreditSource]
    CREDIT_SOURCE_REFRESH: _ClassVar[CreditSource]
    CREDIT_SOURCE_LAPSE: _ClassVar[CreditSource]

class PlanChange(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLAN_CHANGE_UNSPECIFIED: _ClassVar[PlanChange]
    PLAN_CHANGE_UPGRADE: _ClassVar[PlanChange]
    PLAN_CHANGE_DOWNGRADE: _ClassVar[PlanChange]
    PLAN_CHANGE_LATERAL: _ClassVar[PlanChange]

class InvoiceStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INVOICE_STATUS_UNSPECIFIED: _ClassVar[InvoiceStatus]
    INVOICE_STATUS_CREATED: _ClassVar[InvoiceStatus]
    INVOICE_STATUS_PAID: _ClassVar[InvoiceStatus]
    INVOICE_STATUS_FAILED: _ClassVar[InvoiceStatus]
    INVOICE_STATUS_VOIDED: _ClassVar[InvoiceStatus]

class ReservationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESERVATION_STATE_UNSPECIFIED: _ClassVar[ReservationState]
    RESERVATION_STATE_OPEN: _ClassVar[ReservationState]
    RESERVATION_STATE_COMMITTED: _ClassVar[ReservationState]
    RESERVATION_STATE_RELEASED: _ClassVar[ReservationState]
    RESERVATION_STATE_EXPIRED: _ClassVar[ReservationState]
PLAN_UNSPECIFIED: Plan
PLAN_PLATFORM: Plan
PLAN_BYOK: Plan
PLAN_HYBRID: Plan
BILLING_CYCLE_UNSPECIFIED: BillingCycle
BILLING_CYCLE_MONTHLY: BillingCycle
BILLING_CYCLE_YEARLY: BillingCycle
SUBSCRIPTION_STATUS_UNSPECIFIED: SubscriptionStatus
SUBSCRIPTION_STATUS_TRIALING: SubscriptionStatus
SUBSCRIPTION_STATUS_ACTIVE: SubscriptionStatus
SUBSCRIPTION_STATUS_PAST_DUE: SubscriptionStatus
SUBSCRIPTION_STATUS_CANCELED: SubscriptionStatus
RESET_PERIOD_UNSPECIFIED: ResetPeriod
RESET_PERIOD_DAILY: ResetPeriod
RESET_PERIOD_WEEKLY: ResetPeriod
RESET_PERIOD_MONTHLY: ResetPeriod
RESET_PERIOD_NEVER: ResetPeriod
CREDIT_SOURCE_UNSPECIFIED: CreditSource
CREDIT_SOURCE_PURCHASE: CreditSource
CREDIT_SOURCE_GRANT: CreditSource
CREDIT_SOURCE_ADJUSTMENT: CreditSource
CREDIT_SOURCE_REFRESH: CreditSource
CREDIT_SOURCE_LAPSE: CreditSource
PLAN_CHANGE_UNSPECIFIED: PlanChange
PLAN_CHANGE_UPGRADE: PlanChange
PLAN_CHANGE_DOWNGRADE: PlanChange
PLAN_CHANGE_LATERAL: PlanChange
INVOICE_STATUS_UNSPECIFIED: InvoiceStatus
INVOICE_STATUS_CREATED: InvoiceStatus
INVOICE_STATUS_PAID: InvoiceStatus
INVOICE_STATUS_FAILED: InvoiceStatus
INVOICE_STATUS_VOIDED: InvoiceStatus
RESERVATION_STATE_UNSPECIFIED: ReservationState
RESERVATION_STATE_OPEN: ReservationState
RESERVATION_STATE_COMMITTED: ReservationState
RESERVATION_STATE_RELEASED: ReservationState
RESERVATION_STATE_EXPIRED: ReservationState

class Subscription(_message.Message):
    __slots__ = ("org_id", "subscription_id", "plan", "billing_cycle", "status", "price_cents", "currency", "current_period_start", "current_period_end", "trial_end", "external_customer_id", "external_subscription_id", "create_time", "cancel_time")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    BILLING_CYCLE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PRICE_CENTS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    CURRENT_PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    CURRENT_PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    TRIAL_END_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CANCEL_TIME_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    subscription_id: str
    plan: Plan
    billing_cycle: BillingCycle
    status: SubscriptionStatus
    price_cents: int
    currency: str
    current_period_start: _timestamp_pb2.Timestamp
    current_period_end: _timestamp_pb2.Timestamp
    trial_end: _timestamp_pb2.Timestamp
    external_customer_id: str
    external_subscription_id: str
    create_time: _timestamp_pb2.Timestamp
    cancel_time: _timestamp_pb2.Timestamp
    def __init__(self, org_id: _Optional[str] = ..., subscription_id: _Optional[str] = ..., plan: _Optional[_Union[Plan, str]] = ..., billing_cycle: _Optional[_Union[BillingCycle, str]] = ..., status: _Optional[_Union[SubscriptionStatus, str]] = ..., price_cents: _Optional[int] = ..., currency: _Optional[str] = ..., current_period_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., current_period_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., trial_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., external_customer_id: _Optional[str] = ..., external_subscription_id: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cancel_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreditPool(_message.Message):
    __slots__ = ("org_id", "total_millicredits", "allocated_millicredits", "used_millicredits", "reserved_millicredits", "spendable_millicredits", "unallocated_millicredits", "overage_limit_millicredits", "overage_rate_millicents_per_credit", "overage_used_millicredits", "refresh_millicredits", "refresh_overridden", "rollover_cap_millicredits", "refresh_unspent_millicredits", "next_refresh_time")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    USED_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    SPENDABLE_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    UNALLOCATED_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_LIMIT_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_RATE_MILLICENTS_PER_CREDIT_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_USED_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    REFRESH_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    REFRESH_OVERRIDDEN_FIELD_NUMBER: _ClassVar[int]
    ROLLOVER_CAP_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    REFRESH_UNSPENT_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    NEXT_REFRESH_TIME_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    total_millicredits: int
    allocated_millicredits: int
    used_millicredits: int
    reserved_millicredits: int
    spendable_millicredits: int
    unallocated_millicredits: int
    overage_limit_millicredits: int
    overage_rate_millicents_per_credit: int
    overage_used_millicredits: int
    refresh_millicredits: int
    refresh_overridden: bool
    rollover_cap_millicredits: int
    refresh_unspent_millicredits: int
    next_refresh_time: _timestamp_pb2.Timestamp
    def __init__(self, org_id: _Optional[str] = ..., total_millicredits: _Optional[int] = ..., allocated_millicredits: _Optional[int] = ..., used_millicredits: _Optional[int] = ..., reserved_millicredits: _Optional[int] = ..., spendable_millicredits: _Optional[int] = ..., unallocated_millicredits: _Optional[int] = ..., overage_limit_millicredits: _Optional[int] = ..., overage_rate_millicents_per_credit: _Optional[int] = ..., overage_used_millicredits: _Optional[int] = ..., refresh_millicredits: _Optional[int] = ..., refresh_overridden: _Optional[bool] = ..., rollover_cap_millicredits: _Optional[int] = ..., refresh_unspent_millicredits: _Optional[int] = ..., next_refresh_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Allocation(_message.Message):
    __slots__ = ("org_id", "user_id", "limit_millicredits", "used_millicredits", "reserved_millicredits", "remaining_millicredits", "reset_period", "next_reset_time", "revoked")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    USED_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    RESET_PERIOD_FIELD_NUMBER: _ClassVar[int]
    NEXT_RESET_TIME_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    user_id: str
    limit_millicredits: int
    used_millicredits: int
    reserved_millicredits: int
    remaining_millicredits: int
    reset_period: ResetPeriod
    next_reset_time: _timestamp_pb2.Timestamp
    revoked: bool
    def __init__(self, org_id: _Optional[str] = ..., user_id: _Optional[str] = ..., limit_millicredits: _Optional[int] = ..., used_millicredits: _Optional[int] = ..., reserved_millicredits: _Optional[int] = ..., remaining_millicredits: _Optional[int] = ..., reset_period: _Optional[_Union[ResetPeriod, str]] = ..., next_reset_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked: _Optional[bool] = ...) -> None: ...

class Invoice(_message.Message):
    __slots__ = ("org_id", "external_invoice_id", "status", "amount_cents", "currency", "period_start_time", "period_end_time", "create_time", "update_time")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_INVOICE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_CENTS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_TIME_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    external_invoice_id: str
    status: InvoiceStatus
    amount_cents: int
    currency: str
    period_start_time: _timestamp_pb2.Timestamp
    period_end_time: _timestamp_pb2.Timestamp
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, org_id: _Optional[str] = ..., external_invoice_id: _Optional[str] = ..., status: _Optional[_Union[InvoiceStatus, str]] = ..., amount_cents: _Optional[int] = ..., currency: _Optional[str] = ..., period_start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., period_end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Reservation(_message.Message):
    __slots__ = ("org_id", "reservation_id", "user_id", "amount_millicredits", "state", "service_type", "service_name", "metadata", "create_time", "expire_time", "resolve_time", "committed_millicredits", "deduction_id")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    RESOLVE_TIME_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    DEDUCTION_ID_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    reservation_id: str
    user_id: str
    amount_millicredits: int
    state: ReservationState
    service_type: str
    service_name: str
    metadata: _containers.ScalarMap[str, str]
    create_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    resolve_time: _timestamp_pb2.Timestamp
    committed_millicredits: int
    deduction_id: str
    def __init__(self, org_id: _Optional[str] = ..., reservation_id: _Optional[str] = ..., user_id: _Optional[str] = ..., amount_millicredits: _Optional[int] = ..., state: _Optional[_Union[ReservationState, str]] = ..., service_type: _Optional[str] = ..., service_name: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resolve_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., committed_millicredits: _Optional[int] = ..., deduction_id: _Optional[str] = ...) -> None: ...
