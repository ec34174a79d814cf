"""The control messages between a front-end and an executor: typed structures and their one codec.

Every message is a :class:`msgspec.Struct` tagged by ``op``; a frame is a MessagePack array of
them (:class:`Codec`, used by :class:`~service.ipc.transport.Channel`). Decoding checks every
field's type, so a malformed frame is an error at the edge, never a ``KeyError`` deep in a handler.

Front-end → executor (:data:`ToExecutor`): :class:`Hello`, :class:`Run`, :class:`Cancel`,
:class:`Reload`, :class:`TableAck`, :class:`BuildPattern`, :class:`DriftAction`.

Executor → front-end (:data:`ToFrontend`): :class:`Table` (unsolicited, and the answer to
``hello``), and the answers to requests by ``id``: :class:`Done`, :class:`Failed`,
:class:`Cancelled`, :class:`Reloaded`, :class:`PatternBuilt`, :class:`DriftReadings`.

Tensors never travel here: a :class:`Run` names where they lie in the front-end's shared-memory
arena (:data:`TensorRef`: byte offset from the region's start, shape, numpy dtype string).
"""

from __future__ import annotations

from typing import Any, Literal, Union

import msgspec
import numpy as np

TensorRef = tuple[int, tuple[int, ...], str]  # (byte offset in the region, shape, numpy dtype string, e.g. "<f4")
ModelState = Literal["loading", "ready", "failed"]


class Message(msgspec.Struct, tag_field="op", omit_defaults=True):
    """Base of every control message (``op`` is the tag)."""


# --- front-end → executor --------------------------------------------------------------------


class _Request(Message):
    """A request the executor answers, by ``id`` (unique among the sender's requests in flight)."""

    id: int


class _ModelRequest(_Request):
    """A request about one version of a model."""

    model: str
    version: str


class Hello(Message, tag="hello"):
    """A front-end connected: the executor answers with its :class:`Table`."""


class Run(_ModelRequest, tag="run"):
    """Compute ``task`` for the tensors at ``inputs`` (region ``at`` of arena ``shm``) into ``output``."""

    task: str
    timeout_s: float
    shm: str  # the arena file
    at: int  # byte offset of the request's region in the arena
    inputs: dict[str, TensorRef]
    output: TensorRef


class Cancel(_Request, tag="cancel"):
    """The front-end gave up request ``id``; it is answered :class:`Cancelled` (or with its result, if late)."""


class Reload(_Request, tag="reload"):
    """Reload the repository; answered :class:`Reloaded` once every front-end has the new table."""


class TableAck(Message, tag="table_ack"):
    """This front-end routes by the table of ``generation``."""

    generation: int


class BuildPattern(_ModelRequest, tag="pattern"):
    """The calibration of a missingness ``pattern`` (observed feature indices) of a model version."""

    pattern: tuple[int, ...]


class DriftAction(_ModelRequest, tag="drift"):
    """A drift action on a model version's monitor: ``update`` (``p``: p-values in request order; ``n`` and
    ``units``: calibration scores and patients behind each), ``readings`` or ``reset`` (one ``stream``, or all)."""

    action: Literal["update", "readings", "reset"]
    stream: str | None = None
    p: list[float] | None = None
    n: list[int] | None = None
    units: list[int] | None = None


ToExecutor = Union[Hello, Run, Cancel, Reload, TableAck, BuildPattern, DriftAction]


# --- executor → front-end --------------------------------------------------------------------


class _Reply(Message):
    """The answer to request ``id``."""

    id: int


class ModelRow(msgspec.Struct, omit_defaults=True):
    """One served model version as an executor's table lists it."""

    name: str
    version: str
    path: str
    state: ModelState
    mtime: float  # of its manifest: a front-end re-reads a manifest that changed
    reason: str | None = None
    load_seconds: float | None = None
    devices: list[str] = []
    backend: str | None = None
    execution: dict[str, str] = {}


class Table(Message, tag="table"):
    """What an executor serves. ``epoch`` names the executor's incarnation; ``generation`` counts its tables."""

    epoch: str
    generation: int
    device: str
    loaded: bool  # its first load has finished
    models: list[ModelRow]


class Done(_Reply, tag="done"):
    """Request ``id``'s result is in its region of the arena."""


class Failed(_Reply, tag="error"):
    """Request ``id`` failed: the HTTP ``status``, a short ``reason`` and the ``message`` for the client."""

    status: int
    reason: str
    message: str
    headers: dict[str, str] = {}


class Cancelled(_Reply, tag="cancelled"):
    """Request ``id`` was cancelled before it finished."""


class Reloaded(_Reply, tag="reloaded"):
    """The repository reloaded: what changed, per model."""

    changes: dict[str, str]


class PatternBuilt(_Reply, tag="pattern_built"):
    """A pattern's calibration (:class:`models.artifacts.manifest.Calibration`, as its fields)."""

    calibration: dict[str, Any]


class DriftReadings(_Reply, tag="drift_readings"):
    """The readings a :class:`DriftAction` returned (:func:`service.core.drift.reading_dict`)."""

    readings: list[dict[str, Any]]


ToFrontend = Union[Table, Done, Failed, Cancelled, Reloaded, PatternBuilt, DriftReadings]
Answer = Union[Done, Failed, Cancelled, Reloaded, PatternBuilt, DriftReadings]  # what a request ``id`` gets back


def _encode_numpy(obj: object) -> object:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"cannot encode {type(obj).__name__} in a control message")


class Codec:
    """Frames of messages ↔ bytes (MessagePack). ``incoming`` is the union this side receives."""

    def __init__(self, incoming: Any) -> None:  # noqa: ANN401 - a Union type
        self._encoder = msgspec.msgpack.Encoder(enc_hook=_encode_numpy)
        self._decoder = msgspec.msgpack.Decoder(list[incoming])

    def encode(self, messages: list[Message]) -> bytes:
        return self._encoder.encode(messages)

    def decode(self, frame: bytes) -> list:
        """The messages of ``frame``; :class:`msgspec.ValidationError` / :class:`msgspec.DecodeError` when malformed."""
        return self._decoder.decode(frame)
