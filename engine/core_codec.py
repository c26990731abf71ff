"""CoreCodec: the seam's typed messages as bytes, for the sockets between the front and a
core process. Each message is two frames, a one-byte tag naming its type and its msgpack
body (msgspec encodes the dataclasses of messages.py as they are, and decoding checks
every field's type, so a malformed frame is an error, never a half-built request).

Front -> core: EngineCoreRequest, FinishRequests, Shutdown.
Core -> front: CoreReady once (the handshake), then one EngineCoreOutputs per step, and
CoreFailed if a step raised (the core then exits)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeVar

import msgspec

from .messages import EngineCoreOutputs, EngineCoreRequest, FinishRequests


@dataclass(slots=True)
class Shutdown:
    """Front -> core: end every request and exit."""


@dataclass(slots=True)
class CoreReady:
    """Core -> front, once: the model is loaded and the KV pool allocated. What the core
    computed at start (the front reads the model's config from the same directory)."""

    pid: int
    max_model_len: int
    num_blocks: int
    block_size: int
    backend_name: str
    num_threads: int
    cpus: list[int]
    # Bytes of the model's weights as loaded (int8 ones counted as such); 0: not known.
    weight_bytes: int = 0


@dataclass(slots=True)
class CoreFailed:
    """Core -> front: a step raised; the core's state cannot be trusted and it exits."""

    message: str


ToCore = EngineCoreRequest | FinishRequests | Shutdown
FromCore = CoreReady | EngineCoreOutputs | CoreFailed

T = TypeVar("T")

_TO_CORE: Final[dict[type, bytes]] = {EngineCoreRequest: b"a", FinishRequests: b"f", Shutdown: b"s"}
_FROM_CORE: Final[dict[type, bytes]] = {CoreReady: b"r", EngineCoreOutputs: b"o", CoreFailed: b"x"}


class CoreCodec:
    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._to_core: dict[bytes, msgspec.msgpack.Decoder[ToCore]] = {
            tag: msgspec.msgpack.Decoder(kind) for kind, tag in _TO_CORE.items()
        }
        self._from_core: dict[bytes, msgspec.msgpack.Decoder[FromCore]] = {
            tag: msgspec.msgpack.Decoder(kind) for kind, tag in _FROM_CORE.items()
        }

    def encode(self, message: ToCore | FromCore) -> list[bytes]:
        tag = _TO_CORE.get(type(message)) or _FROM_CORE[type(message)]
        return [tag, self._encoder.encode(message)]

    def decode_to_core(self, frames: list[bytes]) -> ToCore:
        """A message for the core; ValueError (msgspec.DecodeError) if frames are not one."""
        return _decoder(self._to_core, frames).decode(frames[1])

    def decode_from_core(self, frames: list[bytes]) -> FromCore:
        return _decoder(self._from_core, frames).decode(frames[1])


def _decoder(
    decoders: dict[bytes, msgspec.msgpack.Decoder[T]], frames: list[bytes]
) -> msgspec.msgpack.Decoder[T]:
    if len(frames) != 2 or frames[0] not in decoders:
        raise ValueError(f"not a core message: {len(frames)} frame(s), tag {frames[:1]!r}")
    return decoders[frames[0]]
