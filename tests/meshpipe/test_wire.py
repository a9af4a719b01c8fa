"""The frame codec without sockets: frames survive any split or merge of the stream's chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meshpipe.wire import (
    HEADER,
    DType,
    Frame,
    FrameDecoder,
    FrameError,
    Kind,
    Raw,
    tensor_bytes,
    tensor_view,
)

FRAMES = [
    Frame(Kind.ECHO, 1, {}, torch.arange(576, dtype=torch.float32).view(1, 576)),
    Frame(Kind.HEARTBEAT, 2, {"ping": True}),
    Frame(Kind.BATCH, 3, {"spans": [[0, 0, 2]]}, torch.ones(2, 3, dtype=torch.bfloat16)),
    Frame(Kind.ERROR, 4),
    Frame(Kind.TOKENS, 5, {}, torch.tensor([7], dtype=torch.int64)),
]
STREAM = b"".join(frame.encode() for frame in FRAMES)


def assert_same(decoded: list[Frame]) -> None:
    assert len(decoded) == len(FRAMES)
    for frame, sent in zip(decoded, FRAMES, strict=True):
        assert (frame.kind, frame.message_id, frame.meta) == (sent.kind, sent.message_id, sent.meta)
        if sent.tensor is None:
            assert frame.tensor is None
        else:
            assert frame.tensor is not None and frame.tensor.dtype == sent.tensor.dtype
            assert torch.equal(frame.tensor, sent.tensor)


def test_frames_merged_in_one_chunk() -> None:
    decoder = FrameDecoder()
    assert_same(decoder.feed(STREAM))
    decoder.finish()


@pytest.mark.parametrize("chunk", [1, 7, HEADER.size, HEADER.size + 1, 1000, 2351])
def test_frames_split_into_chunks(chunk: int) -> None:
    decoder = FrameDecoder()
    decoded = []
    for start in range(0, len(STREAM), chunk):
        decoded += decoder.feed(STREAM[start : start + chunk])
    assert_same(decoded)
    decoder.finish()


def test_a_split_at_every_offset() -> None:
    for cut in range(1, len(STREAM)):
        decoder = FrameDecoder()
        assert_same(decoder.feed(STREAM[:cut]) + decoder.feed(STREAM[cut:]))


def test_received_tensors_are_writable_and_independent_of_the_chunk() -> None:
    chunk = bytearray(FRAMES[0].encode())
    (frame,) = FrameDecoder().feed(bytes(chunk))
    assert frame.tensor is not None
    frame.tensor.add_(1)  # its own memory: no warning, no effect on the chunk
    assert float(frame.tensor[0, 0]) == 1.0


def test_a_stream_that_ends_inside_a_frame_is_truncated() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(STREAM[:-3]) != []
    with pytest.raises(FrameError) as error:
        decoder.finish()
    assert error.value.code == "truncated"


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(12, dtype=torch.bfloat16).view(3, 4),
        torch.arange(24, dtype=torch.float32).view(4, 6)[1:3],  # an offset into its storage
        torch.arange(12, dtype=torch.int64).view(3, 4).t(),  # not contiguous
        torch.empty(0, 8),
    ],
)
def test_a_small_frames_copied_bytes_are_the_viewed_ones(tensor: torch.Tensor) -> None:
    head, sent = Frame(Kind.ECHO, 5, {"a": 1}, tensor).head_and_tensor()
    assert sent is not None
    if sent.numel():  # a memoryview cannot be cast from an empty 2-D array
        assert tensor_bytes(sent) == tensor_view(sent).tobytes()
    (frame,) = FrameDecoder().feed(head + tensor_bytes(sent))
    assert frame.tensor is not None and torch.equal(frame.tensor, tensor)


@pytest.mark.parametrize(
    "meta",
    [b"{oops", b'{"a":NaN}', b'{"a":1e999}', b'{"a":"\xff"}', b"[1, 2]", b'"text"'],
)
def test_metadata_that_is_not_a_json_object_is_refused(meta: bytes) -> None:
    frame = HEADER.pack(b"MPIP", 1, Kind.BATCH, 0, 0, 0, 0, 9, len(meta), 0, 0, 0, 0, 0) + meta
    with pytest.raises(FrameError) as error:
        FrameDecoder().feed(frame)
    assert error.value.code == "bad_meta"


def test_metadata_is_written_as_json_writes_it() -> None:
    """Integer keys become strings and numpy's scalars numbers, as with json.dumps."""
    meta = {1: "one", "half": np.float64(0.5), "count": np.int64(3), "nested": {"t": (1, 2)}}
    (frame,) = FrameDecoder().feed(Frame(Kind.STATUS, 1, meta).encode())
    assert frame.meta == {"1": "one", "half": 0.5, "count": 3, "nested": {"t": [1, 2]}}


def test_a_received_tensor_stays_bytes_until_it_is_used() -> None:
    """A received frame holds its tensor as a Raw: read and sent on without a torch tensor
    (a hop between stages), and made one, on the same bytes, when something asks for it."""
    sent = torch.arange(8, dtype=torch.bfloat16).view(2, 4)
    (frame,) = FrameDecoder().feed(Frame(Kind.BATCH, 3, {"spans": []}, sent).encode())
    assert frame.raw is not None and frame._tensor is None
    assert frame.shape_and_dtype() == ((2, 4), torch.bfloat16)
    assert frame.payload is frame.raw and frame.raw.nbytes == sent.nbytes
    forwarded = Frame(Kind.BATCH, 3, frame.meta, frame.payload).encode()
    assert forwarded == Frame(Kind.BATCH, 3, {"spans": []}, sent).encode()
    assert frame._tensor is None  # sent on as it came
    tensor = frame.tensor
    assert tensor is not None and torch.equal(tensor, sent) and frame.tensor is tensor
    frame.raw.data[:2] = bytes(2)  # one memory: the torch tensor sees the bytes change
    assert float(tensor[0, 0]) == 0.0 and float(tensor[0, 1]) == 1.0


def test_raw_ids_read_as_torch_reads_them() -> None:
    ids = torch.tensor([0, 7, 128255, 2**40], dtype=torch.int64)
    (frame,) = FrameDecoder().feed(Frame(Kind.FEED, 1, {}, ids).encode())
    assert frame.raw is not None and frame.raw.tolist() == ids.tolist()
    hidden = Raw(DType.BFLOAT16, (1, 2), memoryview(bytearray(4)))
    with pytest.raises(ValueError):
        hidden.tolist()  # only token ids are read as a list


def test_a_frame_sent_from_raw_bytes_is_the_tensors_frame() -> None:
    """A stage sends its pinned result buffer's bytes (worker/steps.py): the same frame as the
    tensor's, and an empty tensor keeps its shape."""
    buffer = torch.zeros(64, dtype=torch.uint8)
    hidden = buffer[:16].view(torch.bfloat16).view(2, 4)
    hidden.copy_(torch.randn(2, 4))
    raw = Raw(DType.BFLOAT16, (2, 4), tensor_view(buffer)[:16])
    meta = {"spans": [[0, 5, 1], [1, 9, 1]]}
    assert Frame(Kind.BATCH, 9, meta, raw).encode() == Frame(Kind.BATCH, 9, meta, hidden).encode()
    empty = Raw(DType.FLOAT32, (0, 8), memoryview(b""))
    (frame,) = FrameDecoder().feed(Frame(Kind.ECHO, 2, {}, empty).encode())
    assert frame.tensor is not None and frame.tensor.shape == (0, 8)
