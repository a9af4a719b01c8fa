"""The binary frame: a fixed header, a small JSON metadata block, then raw tensor bytes.

Layout (little-endian), 48 bytes:

    magic 4s | version B | kind B | dtype B | rank B | flags H | reserved H
    message_id Q | meta_length I | shape 4I | payload_length Q

The decoder checks every field against limits before it buffers or allocates anything, so a
frame from the network can be refused with a typed error but never crash the process.
"""

from __future__ import annotations

import ctypes
import enum
import math
import struct
from typing import Any, NamedTuple

import orjson
import torch

MAGIC = b"MPIP"
VERSION = 1
HEADER = struct.Struct("<4sBBBBHHQI4IQ")
MAX_RANK = 4
MAX_META_BYTES = 1 << 20
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30
# What json.dumps took too: integer keys (written as strings) and numpy's scalars
META_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


class Kind(enum.IntEnum):
    """What a frame carries."""

    HELLO = 1  # proof of the join token, first frame of every connection
    WELCOME = 2  # the peer accepted our HELLO
    REGISTER = 3  # a worker describes itself to the gateway
    ASSIGN = 4  # the gateway gives a worker its model, layers and next hop
    READY = 5  # a worker has loaded its assignment
    BATCH = 6  # token ids (first stage) or hidden states, with the batch layout
    TOKENS = 7  # sampled token ids from the last stage
    RELEASE = 8  # KV slots no longer in use
    HEARTBEAT = 9
    ERROR = 10
    ECHO = 11  # transport benchmark: sent back unchanged
    STATUS = 12  # a worker's live figures
    FEED = 13  # the token loop: a step's sampled token ids, from the last stage to the first


class DType(enum.IntEnum):
    """Tensor element types on the wire."""

    NONE = 0
    FLOAT32 = 1
    FLOAT16 = 2
    BFLOAT16 = 3
    INT64 = 4
    INT32 = 5
    UINT8 = 6


TORCH_DTYPES: dict[DType, torch.dtype] = {
    DType.FLOAT32: torch.float32,
    DType.FLOAT16: torch.float16,
    DType.BFLOAT16: torch.bfloat16,
    DType.INT64: torch.int64,
    DType.INT32: torch.int32,
    DType.UINT8: torch.uint8,
}
WIRE_DTYPES = {value: key for key, value in TORCH_DTYPES.items()}
ITEM_SIZES = {DType.NONE: 0} | {key: value.itemsize for key, value in TORCH_DTYPES.items()}
# Wire values to members: a dict lookup, where calling the enum costs a microsecond a frame.
KINDS = {kind.value: kind for kind in Kind}
DTYPES = {dtype.value: dtype for dtype in DType}


class FrameError(Exception):
    """A frame that cannot be accepted; `code` names the reason for the peer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Raw(NamedTuple):
    """A tensor's bytes as they travel, with their dtype and shape, and no torch tensor.

    A received frame holds its tensor this way, and a stage sends its pinned output buffer this
    way: making or inspecting a torch tensor is tens of microseconds on a hop's path, where its
    code runs cold once a token (docs/transport.md), and a hop between stages needs the bytes
    only (a memoryview copy into the next step's pinned inputs, or a list of token ids)."""

    dtype: DType
    shape: tuple[int, ...]
    data: memoryview  # format "B": exactly the tensor's bytes, C order

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def tolist(self) -> list[int]:
        """The values of int64 token ids, as torch's `tolist` gives them."""
        if self.dtype != DType.INT64 or len(self.shape) != 1:
            raise ValueError("only int64 ids [n] are read as a list")
        return self.data.cast("q").tolist()

    def to_torch(self) -> torch.Tensor:
        """A torch tensor on the same bytes (no copy)."""
        dtype = TORCH_DTYPES[self.dtype]
        if not self.data:
            return torch.empty(self.shape, dtype=dtype)
        tensor = torch.frombuffer(self.data, dtype=dtype)
        if len(self.shape) > 1:  # frombuffer's tensor already has a rank-1 frame's shape
            tensor = tensor.view(*self.shape)  # unpacked: a third faster than a tuple
        return tensor


class Frame:
    """One message: a kind, an id, a metadata dict, and a tensor or none.

    `tensor` may be given as a torch tensor or as a `Raw`. A received frame holds a `Raw`
    (`frame.raw`); `frame.tensor` makes the torch tensor on first use, on the same bytes."""

    __slots__ = ("kind", "message_id", "meta", "raw", "_tensor")

    def __init__(
        self,
        kind: Kind,
        message_id: int = 0,
        meta: dict[str, Any] | None = None,
        tensor: torch.Tensor | Raw | None = None,
    ) -> None:
        self.kind, self.message_id = kind, message_id
        self.meta: dict[str, Any] = {} if meta is None else meta
        self.raw: Raw | None = tensor if isinstance(tensor, Raw) else None
        self._tensor: torch.Tensor | None = None if isinstance(tensor, Raw) else tensor

    def __repr__(self) -> str:
        shape = None if self.payload is None else list(self.shape_and_dtype()[0])
        return f"Frame({self.kind.name}, {self.message_id}, {self.meta!r}, shape={shape})"

    @property
    def tensor(self) -> torch.Tensor | None:
        if self._tensor is None and self.raw is not None:
            self._tensor = self.raw.to_torch()
        return self._tensor

    @property
    def payload(self) -> torch.Tensor | Raw | None:
        """The tensor as it would travel on: the bytes that came, else the torch tensor."""
        return self.raw if self.raw is not None else self._tensor

    def shape_and_dtype(self) -> tuple[tuple[int, ...], torch.dtype]:
        """The tensor's shape and torch dtype, read without making it (a frame with one)."""
        if self.raw is not None:
            return self.raw.shape, TORCH_DTYPES[self.raw.dtype]
        assert self._tensor is not None
        return tuple(self._tensor.shape), self._tensor.dtype

    def head_and_tensor(self) -> tuple[bytes, torch.Tensor | Raw | None]:
        """The header plus metadata bytes, and the tensor as it travels (contiguous, on the CPU)."""
        # orjson: a decode step's metadata in under a microsecond, where json.dumps took 9 us
        # on the project's VM (on the path of every hop between stages)
        meta = orjson.dumps(self.meta, option=META_OPTIONS) if self.meta else b""
        raw = self.raw
        if raw is not None:
            header = _header(
                self.kind, raw.dtype, raw.shape, self.message_id, len(meta), len(raw.data)
            )
            return header + meta, raw
        if self._tensor is None:
            return _header(self.kind, DType.NONE, (), self.message_id, len(meta), 0) + meta, None
        tensor = self._tensor
        # Checked first: detach() and the device's name cost more than the checks.
        if tensor.requires_grad:
            tensor = tensor.detach()
        if not tensor.is_cpu:
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        dtype = WIRE_DTYPES.get(tensor.dtype)
        if dtype is None:
            raise ValueError(f"dtype {tensor.dtype} cannot travel")
        shape = tuple(tensor.shape)
        header = _header(self.kind, dtype, shape, self.message_id, len(meta), tensor.nbytes)
        return header + meta, tensor

    def encode(self) -> bytes:
        """The whole frame as one bytes object (copies the tensor; small frames and tests)."""
        head, tensor = self.head_and_tensor()
        return head if tensor is None else head + tensor_bytes(tensor)


def tensor_view(tensor: torch.Tensor | Raw) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (the view keeps the tensor alive)."""
    if isinstance(tensor, Raw):
        return tensor.data
    # bfloat16 has no numpy type: view the raw bytes instead.
    return memoryview(tensor.view(torch.uint8).numpy()).cast("B")


def tensor_bytes(tensor: torch.Tensor | Raw) -> bytes | memoryview:
    """The bytes of a contiguous CPU tensor, to be copied by the caller's concatenation: read
    from its address, in a third of the time that tensor_view's torch and numpy views take."""
    if isinstance(tensor, Raw):
        return tensor.data
    size = tensor.nbytes
    return ctypes.string_at(tensor.data_ptr(), size) if size else b""


def _header(
    kind: Kind, dtype: DType, shape: tuple[int, ...], message_id: int, meta_length: int, size: int
) -> bytes:
    if len(shape) > MAX_RANK:
        raise ValueError(f"rank {len(shape)} > {MAX_RANK}")
    dims = list(shape) + [0] * (MAX_RANK - len(shape))
    return HEADER.pack(
        MAGIC, VERSION, kind, dtype, len(shape), 0, 0, message_id, meta_length, *dims, size
    )


class _Header(NamedTuple):  # a tuple: built for every frame, in a third of a dataclass's time
    kind: Kind
    dtype: DType
    shape: tuple[int, ...]
    message_id: int
    meta_length: int
    payload_length: int

    @property
    def body_length(self) -> int:
        return self.meta_length + self.payload_length


def parse_header(data: bytes | memoryview, max_payload: int) -> _Header:
    """Validate a header; raise FrameError naming the first field that is wrong."""
    magic, version, kind, dtype, rank, _flags, _reserved, message_id, meta_length, *rest = (
        HEADER.unpack_from(data)
    )
    dims, payload_length = rest[:MAX_RANK], rest[MAX_RANK]
    if magic != MAGIC:
        raise FrameError("bad_magic", f"bad magic {magic!r}")
    if version != VERSION:
        raise FrameError("bad_version", f"unsupported version {version}")
    if kind not in KINDS:
        raise FrameError("bad_kind", f"unknown frame kind {kind}")
    if dtype not in DTYPES:
        raise FrameError("bad_dtype", f"unknown dtype {dtype}")
    if rank > MAX_RANK:
        raise FrameError("bad_rank", f"rank {rank} > {MAX_RANK}")
    if any(dims[rank:]):
        raise FrameError("bad_shape", "dimensions beyond the rank must be zero")
    if meta_length > MAX_META_BYTES:
        raise FrameError("too_large", f"metadata of {meta_length} bytes > {MAX_META_BYTES}")
    if payload_length > max_payload:
        raise FrameError("too_large", f"payload of {payload_length} bytes > {max_payload}")
    shape = tuple(dims[:rank])
    dtype = DTYPES[dtype]
    # math.prod: exact for any shape (Python ints), and ~40x cheaper than np.prod per frame.
    expected = math.prod(shape) * ITEM_SIZES[dtype] if rank else 0
    if dtype == DType.NONE and (rank or payload_length):
        raise FrameError("bad_shape", "a frame without dtype carries no tensor")
    if dtype != DType.NONE and not rank:
        raise FrameError("bad_shape", "a tensor has at least one dimension")
    if expected != payload_length:
        raise FrameError(
            "bad_length", f"shape {shape} needs {expected} bytes, got {payload_length}"
        )
    return _Header(KINDS[kind], dtype, shape, message_id, meta_length, payload_length)


def _decode_body(header: _Header, body: memoryview) -> Frame:
    meta: dict[str, Any] = {}
    if header.meta_length:
        try:
            meta = orjson.loads(body[: header.meta_length])  # no copy; 2 us where json took 7
        except orjson.JSONDecodeError as error:
            raise FrameError("bad_meta", f"metadata is not JSON: {error}") from None
        if not isinstance(meta, dict):
            raise FrameError("bad_meta", "metadata must be a JSON object")
    if header.dtype == DType.NONE:
        return Frame(header.kind, header.message_id, meta)
    raw = Raw(header.dtype, header.shape, body[header.meta_length :])  # a torch tensor on use
    return Frame(header.kind, header.message_id, meta, raw)


class FrameDecoder:
    """Reassembles frames from the chunks of one stream (chunks split and merge frames)."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._header: _Header | None = None
        self._body: bytearray | None = None
        self._filled = 0

    def feed(self, data: bytes) -> list[Frame]:
        """Take the next chunk; return the frames it completes. Raises FrameError."""
        frames: list[Frame] = []
        view = memoryview(data)
        while view:
            if self._header is None and not self._buffer and len(view) >= HEADER.size:
                # A header at the start of the chunk (the usual case): no reassembly buffer.
                header = parse_header(view, self.max_payload)
                end = HEADER.size + header.body_length
                if len(view) >= end:  # and the whole frame: one copy, into its own body
                    body = memoryview(bytearray(view[HEADER.size : end]))
                    frames.append(_decode_body(header, body))
                    view = view[end:]
                    continue
                self._start_body(header)
                view = view[HEADER.size :]
            if self._header is None:
                take = min(HEADER.size - len(self._buffer), len(view))
                self._buffer += view[:take]
                view = view[take:]
                if len(self._buffer) < HEADER.size:
                    break
                self._start_body(parse_header(self._buffer, self.max_payload))
                self._buffer.clear()
            assert self._body is not None
            take = min(len(self._body) - self._filled, len(view))
            self._body[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == len(self._body):
                frames.append(_decode_body(self._header, memoryview(self._body)))
                self._header, self._body = None, None
        return frames

    def missing(self) -> int:
        """Bytes still to come of the frame begun (0 between frames; a header cut short: the
        rest of the header)."""
        if self._body is not None:
            return len(self._body) - self._filled
        return HEADER.size - len(self._buffer) if self._buffer else 0

    def _start_body(self, header: _Header) -> None:
        self._header = header
        # Allocated once, at its validated size, and filled in place.
        self._body = bytearray(header.body_length)
        self._filled = 0

    def finish(self) -> None:
        """The stream ended: raise FrameError if a frame was cut short."""
        if self._buffer or self._header is not None:
            raise FrameError("truncated", "stream ended inside a frame")


def error_frame(code: str, message: str, message_id: int = 0) -> Frame:
    """The frame that answers a refused one."""
    return Frame(Kind.ERROR, message_id, {"code": code, "message": message})
