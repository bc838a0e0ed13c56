"""scoopy: structured cooperation for Python services on PostgreSQL."""

from .context import ContextKey, CooperationContext
from .cooperation import Cooperation, RunHandle
from .deadlines import (
    ABSOLUTE_DEADLINE,
    HAPPY_PATH_DEADLINE,
    ROLLBACK_DEADLINE,
    Deadline,
    deadline,
)
from .errors import (
    DatabaseUnavailableError,
    HierarchyTooDeepError,
    InvalidNameError,
    PayloadError,
    RecursionLimitError,
    SagaDefinitionError,
    SchemaVersionError,
    ScoopyError,
    UnhandledTopicError,
    WaitTimeout,
)
from .failure import (
    CancellationRequested,
    ChildRollbackFailed,
    ChildRolledBack,
    CooperationError,
    CooperationFailure,
    DeadlineMissed,
    Frame,
    GaveUp,
    ParentSaidSo,
    RetriesExhausted,
    RollbackFailed,
    RollbackRequested,
)
from .message import Message, Topic
from .periodic import CatchUp, Schedule
from .results import Event, Outcome, RunInfo, RunSummary, SubscriptionInfo, Waiting
from .saga import NextStep, Rate, RetryPolicy, Saga, Step
from .scope import Scope, current_scope
from .strategy import EventLoopStrategy, RunView, TimeWindow
from .vocab import Connection

__all__ = [
    "ABSOLUTE_DEADLINE",
    "HAPPY_PATH_DEADLINE",
    "ROLLBACK_DEADLINE",
    "CancellationRequested",
    "CatchUp",
    "ChildRollbackFailed",
    "ChildRolledBack",
    "Connection",
    "ContextKey",
    "Cooperation",
    "CooperationContext",
    "CooperationError",
    "CooperationFailure",
    "DatabaseUnavailableError",
    "Deadline",
    "DeadlineMissed",
    "Event",
    "EventLoopStrategy",
    "Frame",
    "GaveUp",
    "HierarchyTooDeepError",
    "InvalidNameError",
    "Message",
    "NextStep",
    "Outcome",
    "ParentSaidSo",
    "PayloadError",
    "Rate",
    "RecursionLimitError",
    "RetriesExhausted",
    "RetryPolicy",
    "RollbackFailed",
    "RollbackRequested",
    "RunHandle",
    "RunInfo",
    "RunSummary",
    "RunView",
    "Saga",
    "SagaDefinitionError",
    "Schedule",
    "SchemaVersionError",
    "ScoopyError",
    "Scope",
    "Step",
    "SubscriptionInfo",
    "TimeWindow",
    "Topic",
    "UnhandledTopicError",
    "WaitTimeout",
    "Waiting",
    "current_scope",
    "deadline",
]
