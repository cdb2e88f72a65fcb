import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from orgbilling.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BillingEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BILLING_EVENT_TYPE_UNSPECIFIED: _ClassVar[BillingEventType]
    BILLING_EVENT_TYPE_SUBSCRIPTION_CREATED: _ClassVar[BillingEventType]
    BILLING_EVENT_TYPE_SUBSCRIPTION_UPGRADED: _ClassVar[BillingEventType]
    BILLING_EVENT_TYPE_SUBSCRIPTION_DOWNGRADED: _ClassVar[BillingEventType]
    BILLING_EVENT_TYPE_SUBSCRIPTION_CHANGED: _ClassVar[BillingEventType]
    BILLING_EVENT_TYPE_SUBSCRIPTION_CANCELED: _ClassVar[BillingEventType]
    BILLING_EVENT_TYPE_CREDITS_ADDED: _ClassVar[BillingEventType]
    BILLING_EVENT_TYPE_ALLOCATION_CHANGED: _ClassVar[BillingEventType]
    BILLING_EVENT_TYPE_ALLOCATION_REVOKED: _ClassVar[BillingEventType]
    BILLING_EVENT_TYPE_PERIOD_RESET: _ClassVar[BillingEventType]
    BILLING_EVENT_TYPE_INVOICE_CREATED: _ClassVar[BillingEventType]
    BILLING_EVENT_TYPE_INVOICE_PAID: _ClassVar[BillingEventType]
    BILLING_EVENT_TYPE_INVOICE_PAYMENT_FAILED: _ClassVar[BillingEventType]
    BILLING_EVENT_TYPE_INVOICE_VOIDED: _ClassVar[BillingEventType]
    BILLING_EVENT_TYPE_REFUND: _ClassVar[BillingEventType]
    BILLING_EVENT_TYPE_OVERAGE_CHANGED: _ClassVar[BillingEventType]
    BILLING_EVENT_TYPE_SUBSCRIPTION_RENEWED: _ClassVar[BillingEventType]
    BILLING_EVENT_TYPE_REFRESH_CHANGED: _ClassVar[BillingEventType]
BILLING_EVENT_TYPE_UNSPECIFIED: BillingEventType
BILLING_EVENT_TYPE_SUBSCRIPTION_CREATED: BillingEventType
BILLING_EVENT_TYPE_SUBSCRIPTION_UPGRADED: BillingEventType
BILLING_EVENT_TYPE_SUBSCRIPTION_DOWNGRADED: BillingEventType
BILLING_EVENT_TYPE_SUBSCRIPTION_CHANGED: BillingEventType
BILLING_EVENT_TYPE_SUBSCRIPTION_CANCELED: BillingEventType
BILLING_EVENT_TYPE_CREDITS_ADDED: BillingEventType
BILLING_EVENT_TYPE_ALLOCATION_CHANGED: BillingEventType
BILLING_EVENT_TYPE_ALLOCATION_REVOKED: BillingEventType
BILLING_EVENT_TYPE_PERIOD_RESET: BillingEventType
BILLING_EVENT_TYPE_INVOICE_CREATED: BillingEventType
BILLING_EVENT_TYPE_INVOICE_PAID: BillingEventType
BILLING_EVENT_TYPE_INVOICE_PAYMENT_FAILED: BillingEventType
BILLING_EVENT_TYPE_INVOICE_VOIDED: BillingEventType
BILLING_EVENT_TYPE_REFUND: BillingEventType
BILLING_EVENT_TYPE_OVERAGE_CHANGED: BillingEventType
BILLING_EVENT_TYPE_SUBSCRIPTION_RENEWED: BillingEventType
BILLING_EVENT_TYPE_REFRESH_CHANGED: BillingEventType

class TimeRange(_message.Message):
    __slots__ = ("start_time", "end_time")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Money(_message.Message):
    __slots__ = ("currency", "amount_cents")
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_CENTS_FIELD_NUMBER: _ClassVar[int]
    currency: str
    amount_cents: int
    def __init__(self, currency: _Optional[str] = ..., amount_cents: _Optional[int] = ...) -> None: ...

class ServiceUsage(_message.Message):
    __slots__ = ("service_type", "service_name", "used_millicredits", "request_count")
    SERVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    USED_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    service_type: str
    service_name: str
    used_millicredits: int
    request_count: int
    def __init__(self, service_type: _Optional[str] = ..., service_name: _Optional[str] = ..., used_millicredits: _Optional[int] = ..., request_count: _Optional[int] = ...) -> None: ...

class UserUsage(_message.Message):
    __slots__ = ("user_id", "used_millicredits", "request_count", "services_used", "last_use_time")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    USED_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    SERVICES_USED_FIELD_NUMBER: _ClassVar[int]
    LAST_USE_TIME_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    used_millicredits: int
    request_count: int
    services_used: int
    last_use_time: _timestamp_pb2.Timestamp
    def __init__(self, user_id: _Optional[str] = ..., used_millicredits: _Optional[int] = ..., request_count: _Optional[int] = ..., services_used: _Optional[int] = ..., last_use_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DailyUsage(_message.Message):
    __slots__ = ("day_start_time", "used_millicredits", "request_count")
    DAY_START_TIME_FIELD_NUMBER: _ClassVar[int]
    USED_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    day_start_time: _timestamp_pb2.Timestamp
    used_millicredits: int
    request_count: int
    def __init__(self, day_start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., used_millicredits: _Optional[int] = ..., request_count: _Optional[int] = ...) -> None: ...

class UsageTotals(_message.Message):
    __slots__ = ("used_millicredits", "request_count", "active_users")
    USED_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_USERS_FIELD_NUMBER: _ClassVar[int]
    used_millicredits: int
    request_count: int
    active_users: int
    def __init__(self, used_millicredits: _Optional[int] = ..., request_count: _Optional[int] = ..., active_users: _Optional[int] = ...) -> None: ...

class GetUsageSummaryRequest(_message.Message):
    __slots__ = ("org_id", "time_range", "top_users")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_RANGE_FIELD_NUMBER: _ClassVar[int]
    TOP_USERS_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    time_range: TimeRange
    top_users: int
    def __init__(self, org_id: _Optional[str] = ..., time_range: _Optional[_Union[TimeRange, _Mapping]] = ..., top_users: _Optional[int] = ...) -> None: ...

class GetUsageSummaryResponse(_message.Message):
    __slots__ = ("time_range", "totals", "by_service_type", "by_service_name", "top_users", "daily")
    TIME_RANGE_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    BY_SERVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    BY_SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    TOP_USERS_FIELD_NUMBER: _ClassVar[int]
    DAILY_FIELD_NUMBER: _ClassVar[int]
    time_range: TimeRange
    totals: UsageTotals
    by_service_type: _containers.RepeatedCompositeFieldContainer[ServiceUsage]
    by_service_name: _containers.RepeatedCompositeFieldContainer[ServiceUsage]
    top_users: _containers.RepeatedCompositeFieldContainer[UserUsage]
    daily: _containers.RepeatedCompositeFieldContainer[DailyUsage]
    def __init__(self, time_range: _Optional[_Union[TimeRange, _Mapping]] = ..., totals: _Optional[_Union[UsageTotals, _Mapping]] = ..., by_service_type: _Optional[_Iterable[_Union[ServiceUsage, _Mapping]]] = ..., by_service_name: _Optional[_Iterable[_Union[ServiceUsage, _Mapping]]] = ..., top_users: _Optional[_Iterable[_Union[UserUsage, _Mapping]]] = ..., daily: _Optional[_Iterable[_Union[DailyUsage, _Mapping]]] = ...) -> None: ...

class GetOrgBillingRequest(_message.Message):
    __slots__ = ("org_id",)
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    def __init__(self, org_id: _Optional[str] = ...) -> None: ...

class GetOrgBillingResponse(_message.Message):
    __slots__ = ("subscription", "pool", "allocation_count", "last_30_days")
    SUBSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_30_DAYS_FIELD_NUMBER: _ClassVar[int]
    subscription: _types_pb2.Subscription
    pool: _types_pb2.CreditPool
    allocation_count: int
    last_30_days: UsageTotals
    def __init__(self, subscription: _Optional[_Union[_types_pb2.Subscription, _Mapping]] = ..., pool: _Optional[_Union[_types_pb2.CreditPool, _Mapping]] = ..., allocation_count: _Optional[int] = ..., last_30_days: _Optional[_Union[UsageTotals, _Mapping]] = ...) -> None: ...

class ListAllocationUsageRequest(_message.Message):
    __slots__ = ("org_id", "page_size", "page_token")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    page_size: int
    page_token: str
    def __init__(self, org_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAllocationUsageResponse(_message.Message):
    __slots__ = ("allocations", "next_page_token")
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    allocations: _containers.RepeatedCompositeFieldContainer[_types_pb2.Allocation]
    next_page_token: str
    def __init__(self, allocations: _Optional[_Iterable[_Union[_types_pb2.Allocation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetUserBillingRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class UserOrgBilling(_message.Message):
    __slots__ = ("allocation", "plan", "price", "last_30_days")
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    LAST_30_DAYS_FIELD_NUMBER: _ClassVar[int]
    allocation: _types_pb2.Allocation
    plan: _types_pb2.Plan
    price: Money
    last_30_days: UsageTotals
    def __init__(self, allocation: _Optional[_Union[_types_pb2.Allocation, _Mapping]] = ..., plan: _Optional[_Union[_types_pb2.Plan, str]] = ..., price: _Optional[_Union[Money, _Mapping]] = ..., last_30_days: _Optional[_Union[UsageTotals, _Mapping]] = ...) -> None: ...

class GetUserBillingResponse(_message.Message):
    __slots__ = ("organizations", "used_millicredits_30_days", "request_count_30_days", "active_organizations_30_days")
    ORGANIZATIONS_FIELD_NUMBER: _ClassVar[int]
    USED_MILLICREDITS_30_DAYS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_30_DAYS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_ORGANIZATIONS_30_DAYS_FIELD_NUMBER: _ClassVar[int]
    organizations: _containers.RepeatedCompositeFieldContainer[UserOrgBilling]
    used_millicredits_30_days: int
    request_count_30_days: int
    active_organizations_30_days: int
    def __init__(self, organizations: _Optional[_Iterable[_Union[UserOrgBilling, _Mapping]]] = ..., used_millicredits_30_days: _Optional[int] = ..., request_count_30_days: _Optional[int] = ..., active_organizations_30_days: _Optional[int] = ...) -> None: ...

class GetSystemBillingRequest(_message.Message):
    __slots__ = ("top_orgs",)
    TOP_ORGS_FIELD_NUMBER: _ClassVar[int]
    top_orgs: int
    def __init__(self, top_orgs: _Optional[int] = ...) -> None: ...

class PlanSubscriptions(_message.Message):
    __slots__ = ("plan", "status", "subscription_count", "mrr")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    MRR_FIELD_NUMBER: _ClassVar[int]
    plan: _types_pb2.Plan
    status: _types_pb2.SubscriptionStatus
    subscription_count: int
    mrr: _containers.RepeatedCompositeFieldContainer[Money]
    def __init__(self, plan: _Optional[_Union[_types_pb2.Plan, str]] = ..., status: _Optional[_Union[_types_pb2.SubscriptionStatus, str]] = ..., subscription_count: _Optional[int] = ..., mrr: _Optional[_Iterable[_Union[Money, _Mapping]]] = ...) -> None: ...

class OrgUsage(_message.Message):
    __slots__ = ("org_id", "used_millicredits", "request_count")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    USED_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    used_millicredits: int
    request_count: int
    def __init__(self, org_id: _Optional[str] = ..., used_millicredits: _Optional[int] = ..., request_count: _Optional[int] = ...) -> None: ...

class GetSystemBillingResponse(_message.Message):
    __slots__ = ("mrr", "arr", "active_subscriptions", "plans", "top_orgs", "organization_count")
    MRR_FIELD_NUMBER: _ClassVar[int]
    ARR_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SUBSCRIPTIONS_FIELD_NUMBER: _ClassVar[int]
    PLANS_FIELD_NUMBER: _ClassVar[int]
    TOP_ORGS_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_COUNT_FIELD_NUMBER: _ClassVar[int]
    mrr: _containers.RepeatedCompositeFieldContainer[Money]
    arr: _containers.RepeatedCompositeFieldContainer[Money]
    active_subscriptions: int
    plans: _containers.RepeatedCompositeFieldContainer[PlanSubscriptions]
    top_orgs: _containers.RepeatedCompositeFieldContainer[OrgUsage]
    organization_count: int
    def __init__(self, mrr: _Optional[_Iterable[_Union[Money, _Mapping]]] = ..., arr: _Optional[_Iterable[_Union[Money, _Mapping]]] = ..., active_subscriptions: _Optional[int] = ..., plans: _Optional[_Iterable[_Union[PlanSubscriptions, _Mapping]]] = ..., top_orgs: _Optional[_Iterable[_Union[OrgUsage, _Mapping]]] = ..., organization_count: _Optional[int] = ...) -> None: ...

class ListOrgSummariesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class OrgSummary(_message.Message):
    __slots__ = ("org_id", "plan", "status", "pool")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    plan: _types_pb2.Plan
    status: _types_pb2.SubscriptionStatus
    pool: _types_pb2.CreditPool
    def __init__(self, org_id: _Optional[str] = ..., plan: _Optional[_Union[_types_pb2.Plan, str]] = ..., status: _Optional[_Union[_types_pb2.SubscriptionStatus, str]] = ..., pool: _Optional[_Union[_types_pb2.CreditPool, _Mapping]] = ...) -> None: ...

class ListOrgSummariesResponse(_message.Message):
    __slots__ = ("organizations", "next_page_token")
    ORGANIZATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    organizations: _containers.RepeatedCompositeFieldContainer[OrgSummary]
    next_page_token: str
    def __init__(self, organizations: _Optional[_Iterable[_Union[OrgSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetOrgBillingMetricsRequest(_message.Message):
    __slots__ = ("org_id", "time_range")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_RANGE_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    time_range: TimeRange
    def __init__(self, org_id: _Optional[str] = ..., time_range: _Optional[_Union[TimeRange, _Mapping]] = ...) -> None: ...

class GetOrgBillingMetricsResponse(_message.Message):
    __slots__ = ("time_range", "invoice_count", "revenue_paid", "failed_payment_count", "used_millicredits", "request_count", "active_users")
    TIME_RANGE_FIELD_NUMBER: _ClassVar[int]
    INVOICE_COUNT_FIELD_NUMBER: _ClassVar[int]
    REVENUE_PAID_FIELD_NUMBER: _ClassVar[int]
    FAILED_PAYMENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    USED_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_USERS_FIELD_NUMBER: _ClassVar[int]
    time_range: TimeRange
    invoice_count: int
    revenue_paid: _containers.RepeatedCompositeFieldContainer[Money]
    failed_payment_count: int
    used_millicredits: int
    request_count: int
    active_users: int
    def __init__(self, time_range: _Optional[_Union[TimeRange, _Mapping]] = ..., invoice_count: _Optional[int] = ..., revenue_paid: _Optional[_Iterable[_Union[Money, _Mapping]]] = ..., failed_payment_count: _Optional[int] = ..., used_millicredits: _Optional[int] = ..., request_count: _Optional[int] = ..., active_users: _Optional[int] = ...) -> None: ...

class UsageRecord(_message.Message):
    __slots__ = ("deduction_id", "org_id", "user_id", "amount_millicredits", "service_type", "service_name", "request_id", "metadata", "create_time")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEDUCTION_ID_FIELD_NUMBER: _ClassVar[int]
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    deduction_id: str
    org_id: str
    user_id: str
    amount_millicredits: int
    service_type: str
    service_name: str
    request_id: str
    metadata: _containers.ScalarMap[str, str]
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, deduction_id: _Optional[str] = ..., org_id: _Optional[str] = ..., user_id: _Optional[str] = ..., amount_millicredits: _Optional[int] = ..., service_type: _Optional[str] = ..., service_name: _Optional[str] = ..., request_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListUsageRequest(_message.Message):
    __slots__ = ("org_id", "user_id", "service_type", "service_name", "time_range", "page_size", "page_token")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    TIME_RANGE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    user_id: str
    service_type: str
    service_name: str
    time_range: TimeRange
    page_size: int
    page_token: str
    def __init__(self, org_id: _Optional[str] = ..., user_id: _Optional[str] = ..., service_type: _Optional[str] = ..., service_name: _Optional[str] = ..., time_range: _Optional[_Union[TimeRange, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListUsageResponse(_message.Message):
    __slots__ = ("records", "next_page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[UsageRecord]
    next_page_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[UsageRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class BillingEvent(_message.Message):
    __slots__ = ("event_id", "org_id", "event_type", "credits_delta_millicredits", "credit_source", "user_id", "subscription_id", "payment_reference", "amount", "details", "request_id", "create_time")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    CREDITS_DELTA_MILLICREDITS_FIELD_NUMBER: _ClassVar[int]
    CREDIT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    org_id: str
    event_type: BillingEventType
    credits_delta_millicredits: int
    credit_source: _types_pb2.CreditSource
    user_id: str
    subscription_id: str
    payment_reference: str
    amount: Money
    details: _struct_pb2.Struct
    request_id: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[str] = ..., org_id: _Optional[str] = ..., event_type: _Optional[_Union[BillingEventType, str]] = ..., credits_delta_millicredits: _Optional[int] = ..., credit_source: _Optional[_Union[_types_pb2.CreditSource, str]] = ..., user_id: _Optional[str] = ..., subscription_id: _Optional[str] = ..., payment_reference: _Optional[str] = ..., amount: _Optional[_Union[Money, _Mapping]] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., request_id: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListBillingHistoryRequest(_message.Message):
    __slots__ = ("org_id", "event_type", "time_range", "page_size", "page_token")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TIME_RANGE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    event_type: BillingEventType
    time_range: TimeRange
    page_size: int
    page_token: str
    def __init__(self, org_id: _Optional[str] = ..., event_type: _Optional[_Union[BillingEventType, str]] = ..., time_range: _Optional[_Union[TimeRange, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListBillingHistoryResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[BillingEvent]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[BillingEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ExportUsageRequest(_message.Message):
    __slots__ = ("org_id", "time_range", "resume_token", "chunk_size")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_RANGE_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    time_range: TimeRange
    resume_token: str
    chunk_size: int
    def __init__(self, org_id: _Optional[str] = ..., time_range: _Optional[_Union[TimeRange, _Mapping]] = ..., resume_token: _Optional[str] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class ExportUsageResponse(_message.Message):
    __slots__ = ("records", "resume_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[UsageRecord]
    resume_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[UsageRecord, _Mapping]]] = ..., resume_token: _Optional[str] = ...) -> None: ...
