from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ALLOW: _ClassVar[Action]
    REVIEW: _ClassVar[Action]
    CHALLENGE: _ClassVar[Action]
    BLOCK: _ClassVar[Action]

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    OK: _ClassVar[Status]
    DEGRADED: _ClassVar[Status]

class Label(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_UNSPECIFIED: _ClassVar[Label]
    GENUINE: _ClassVar[Label]
    FRAUD: _ClassVar[Label]

class HoldKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOLD_KIND_UNSPECIFIED: _ClassVar[HoldKind]
    HOLD_USER: _ClassVar[HoldKind]
    HOLD_DEVICE: _ClassVar[HoldKind]
    HOLD_IP: _ClassVar[HoldKind]
ACTION_UNSPECIFIED: Action
ALLOW: Action
REVIEW: Action
CHALLENGE: Action
BLOCK: Action
STATUS_UNSPECIFIED: Status
OK: Status
DEGRADED: Status
LABEL_UNSPECIFIED: Label
GENUINE: Label
FRAUD: Label
HOLD_KIND_UNSPECIFIED: HoldKind
HOLD_USER: HoldKind
HOLD_DEVICE: HoldKind
HOLD_IP: HoldKind

class Event(_message.Message):
    __slots__ = ("event_id", "user_id", "ts", "event_type", "item_id", "category", "amount", "device_id", "ip", "country", "session_id")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    user_id: str
    ts: int
    event_type: str
    item_id: str
    category: str
    amount: float
    device_id: str
    ip: str
    country: str
    session_id: str
    def __init__(self, event_id: _Optional[str] = ..., user_id: _Optional[str] = ..., ts: _Optional[int] = ..., event_type: _Optional[str] = ..., item_id: _Optional[str] = ..., category: _Optional[str] = ..., amount: _Optional[float] = ..., device_id: _Optional[str] = ..., ip: _Optional[str] = ..., country: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: Event
    def __init__(self, event: _Optional[_Union[Event, _Mapping]] = ...) -> None: ...

class ScoreBatchRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class ScoreBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreResponse, _Mapping]]] = ...) -> None: ...

class Reason(_message.Message):
    __slots__ = ("code", "message", "weight", "event_ids")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EVENT_IDS_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    weight: float
    event_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., weight: _Optional[float] = ..., event_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("event_id", "risk", "action", "reasons", "model_version", "status", "status_detail", "sequence", "rules")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_DETAIL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    risk: float
    action: Action
    reasons: _containers.RepeatedCompositeFieldContainer[Reason]
    model_version: str
    status: Status
    status_detail: str
    sequence: int
    rules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, event_id: _Optional[str] = ..., risk: _Optional[float] = ..., action: _Optional[_Union[Action, str]] = ..., reasons: _Optional[_Iterable[_Union[Reason, _Mapping]]] = ..., model_version: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ..., status_detail: _Optional[str] = ..., sequence: _Optional[int] = ..., rules: _Optional[_Iterable[str]] = ...) -> None: ...

class IngestSummary(_message.Message):
    __slots__ = ("accepted", "rejected", "errors", "not_applied", "not_applied_event_ids")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    NOT_APPLIED_FIELD_NUMBER: _ClassVar[int]
    NOT_APPLIED_EVENT_IDS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: int
    errors: _containers.RepeatedScalarFieldContainer[str]
    not_applied: int
    not_applied_event_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., errors: _Optional[_Iterable[str]] = ..., not_applied: _Optional[int] = ..., not_applied_event_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class UserStateRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class RecentEvent(_message.Message):
    __slots__ = ("event_id", "event_type", "ts")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    event_type: str
    ts: int
    def __init__(self, event_id: _Optional[str] = ..., event_type: _Optional[str] = ..., ts: _Optional[int] = ...) -> None: ...

class UserState(_message.Message):
    __slots__ = ("user_key", "n_events", "last_ts", "model_version", "recent", "context", "holds")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    USER_KEY_FIELD_NUMBER: _ClassVar[int]
    N_EVENTS_FIELD_NUMBER: _ClassVar[int]
    LAST_TS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    user_key: str
    n_events: int
    last_ts: int
    model_version: str
    recent: _containers.RepeatedCompositeFieldContainer[RecentEvent]
    context: _containers.ScalarMap[str, float]
    holds: _containers.RepeatedCompositeFieldContainer[Hold]
    def __init__(self, user_key: _Optional[str] = ..., n_events: _Optional[int] = ..., last_ts: _Optional[int] = ..., model_version: _Optional[str] = ..., recent: _Optional[_Iterable[_Union[RecentEvent, _Mapping]]] = ..., context: _Optional[_Mapping[str, float]] = ..., holds: _Optional[_Iterable[_Union[Hold, _Mapping]]] = ...) -> None: ...

class OutcomeRequest(_message.Message):
    __slots__ = ("event_id", "label", "family", "user_id")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    label: Label
    family: str
    user_id: str
    def __init__(self, event_id: _Optional[str] = ..., label: _Optional[_Union[Label, str]] = ..., family: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class OutcomeAck(_message.Message):
    __slots__ = ("scored", "risk", "model_version")
    SCORED_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    scored: bool
    risk: float
    model_version: str
    def __init__(self, scored: bool = ..., risk: _Optional[float] = ..., model_version: _Optional[str] = ...) -> None: ...

class SetHoldRequest(_message.Message):
    __slots__ = ("kind", "id", "action", "reason", "who", "ttl_s")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WHO_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    kind: HoldKind
    id: str
    action: Action
    reason: str
    who: str
    ttl_s: int
    def __init__(self, kind: _Optional[_Union[HoldKind, str]] = ..., id: _Optional[str] = ..., action: _Optional[_Union[Action, str]] = ..., reason: _Optional[str] = ..., who: _Optional[str] = ..., ttl_s: _Optional[int] = ...) -> None: ...

class Hold(_message.Message):
    __slots__ = ("kind", "key", "action", "reason", "who", "created_ms", "expires_ms")
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WHO_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_MS_FIELD_NUMBER: _ClassVar[int]
    kind: HoldKind
    key: str
    action: Action
    reason: str
    who: str
    created_ms: int
    expires_ms: int
    def __init__(self, kind: _Optional[_Union[HoldKind, str]] = ..., key: _Optional[str] = ..., action: _Optional[_Union[Action, str]] = ..., reason: _Optional[str] = ..., who: _Optional[str] = ..., created_ms: _Optional[int] = ..., expires_ms: _Optional[int] = ...) -> None: ...

class ReleaseHoldRequest(_message.Message):
    __slots__ = ("kind", "id", "key", "who", "reason")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    WHO_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: HoldKind
    id: str
    key: str
    who: str
    reason: str
    def __init__(self, kind: _Optional[_Union[HoldKind, str]] = ..., id: _Optional[str] = ..., key: _Optional[str] = ..., who: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseHoldAck(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: bool = ...) -> None: ...

class ListHoldsRequest(_message.Message):
    __slots__ = ("kind", "limit")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    kind: HoldKind
    limit: int
    def __init__(self, kind: _Optional[_Union[HoldKind, str]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListHoldsResponse(_message.Message):
    __slots__ = ("holds",)
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    holds: _containers.RepeatedCompositeFieldContainer[Hold]
    def __init__(self, holds: _Optional[_Iterable[_Union[Hold, _Mapping]]] = ...) -> None: ...
