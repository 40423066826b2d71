from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ActorStatus(_message.Message):
    __slots__ = ("actor_id", "state", "appended", "weight_version", "pid")
    ACTOR_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    APPENDED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    actor_id: str
    state: str
    appended: int
    weight_version: int
    pid: int
    def __init__(self, actor_id: _Optional[str] = ..., state: _Optional[str] = ..., appended: _Optional[int] = ..., weight_version: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("run_name", "state", "policy_version", "learner_step", "total_steps", "target_actors", "actors", "buffer_undelivered", "buffer_pending", "reward_mean", "success_rate", "staleness_mean", "tokens_per_second", "uptime_s")
    RUN_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LEARNER_STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TARGET_ACTORS_FIELD_NUMBER: _ClassVar[int]
    ACTORS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_UNDELIVERED_FIELD_NUMBER: _ClassVar[int]
    BUFFER_PENDING_FIELD_NUMBER: _ClassVar[int]
    REWARD_MEAN_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_MEAN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    run_name: str
    state: str
    policy_version: int
    learner_step: int
    total_steps: int
    target_actors: int
    actors: _containers.RepeatedCompositeFieldContainer[ActorStatus]
    buffer_undelivered: int
    buffer_pending: int
    reward_mean: float
    success_rate: float
    staleness_mean: float
    tokens_per_second: float
    uptime_s: float
    def __init__(self, run_name: _Optional[str] = ..., state: _Optional[str] = ..., policy_version: _Optional[int] = ..., learner_step: _Optional[int] = ..., total_steps: _Optional[int] = ..., target_actors: _Optional[int] = ..., actors: _Optional[_Iterable[_Union[ActorStatus, _Mapping]]] = ..., buffer_undelivered: _Optional[int] = ..., buffer_pending: _Optional[int] = ..., reward_mean: _Optional[float] = ..., success_rate: _Optional[float] = ..., staleness_mean: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., uptime_s: _Optional[float] = ...) -> None: ...

class ScaleRequest(_message.Message):
    __slots__ = ("actors",)
    ACTORS_FIELD_NUMBER: _ClassVar[int]
    actors: int
    def __init__(self, actors: _Optional[int] = ...) -> None: ...

class ScaleResponse(_message.Message):
    __slots__ = ("target", "previous")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    target: int
    previous: int
    def __init__(self, target: _Optional[int] = ..., previous: _Optional[int] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("drain",)
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    drain: bool
    def __init__(self, drain: _Optional[bool] = ...) -> None: ...

class ControlResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: str
    def __init__(self, state: _Optional[str] = ...) -> None: ...
