"""D2D links between split-learning segments (paper Sec. III-C.1: smashed data and gradients).

A link counts the bytes its wire format carries. The network transport (gRPC between lab
devices, deploy/remote.py) really serializes every tensor (`serialize_tensor`). The simulation's
`InProcessLink` does not copy: it hands the tensor on (detached, on the receiving node's device,
in the hop's smashed-data dtype) and counts `wire_bytes`, the length `serialize_tensor` would
give, from the tensor's dtype, shape and layout. Both take the header's size from
`header_bytes`, so the count and the wire cannot drift (tests/test_link.py checks every dtype
and shape the chain sends). Round-tripping every hop through host bytes made a split step on a
GPU 2.25x-8x slower than the unsplit model (issue 14's H200 measurement).

A hop keeps the tensor's memory layout: a dense tensor whose dimensions lie in memory in another
order than its shape (a prefix-free ViT's tokens straight from the patch convolution are
[B, N, D] with strides (N*D, 1, N)) is sent in memory order with its dim order, and arrives with
the same strides. The unsplit model keeps that layout through every block; a hop that made it
contiguous would let later reductions (average pooling, the backward's sums) round differently,
and the chain would no longer train bit for bit like the unsplit model (docs/vits.md "Exactness").
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from gaisnet_flwr.split.precision import to_wire

Direction = Literal["forward", "backward"]

# One byte per dtype on the wire; extend as needed (the receiver validates against this table).
_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
)
_HEADER = struct.Struct("<BB")  # dtype code, ndim; then ndim little-endian int64 sizes
# Set in the ndim byte when ndim bytes of dim order (outermost first) follow the sizes.
_DIM_ORDER = 0x80
MAX_DIMS = 16  # more than any tensor a chain sends (conv weights have 4)
MAX_TENSORS = 4096  # tensors in one framed message
MAX_ELEMENTS = 2**48  # elements in one tensor, counting empty dimensions as 1
MAX_HEADER_BYTES = 1 << 20  # a framed message's JSON header


class LinkError(ValueError):
    """A payload that does not decode to a well-formed tensor."""


def dim_order(tensor: torch.Tensor) -> tuple[int, ...] | None:
    """The order in which `tensor`'s dimensions lie in memory, outermost first, if it is dense
    but not contiguous (a permutation of a contiguous tensor); None otherwise (contiguous, or
    not dense: sent as a contiguous copy)."""
    if tensor.is_contiguous() or tensor.dim() >= _DIM_ORDER:
        return None
    strides = tensor.stride()
    order = tuple(sorted(range(tensor.dim()), key=lambda d: (-strides[d], d)))
    return order if tensor.permute(order).is_contiguous() else None


def header_bytes(ndim: int, permuted: bool) -> int:
    """Size of a tensor's header on the wire: dtype and ndim bytes, ndim int64 sizes, and the
    ndim bytes of the dim order of a `permuted` layout."""
    return _HEADER.size + 8 * ndim + (ndim if permuted else 0)


def wire_bytes(tensor: torch.Tensor) -> int:
    """Bytes `serialize_tensor(tensor)` produces, without producing them: the header and the
    raw data (a function of dtype, shape and whether the layout is permuted)."""
    if tensor.dtype not in _DTYPES:
        raise LinkError(f"dtype {tensor.dtype} cannot be sent; supported: {list(_DTYPES)}")
    permuted = dim_order(tensor) is not None
    return header_bytes(tensor.dim(), permuted) + tensor.numel() * tensor.dtype.itemsize


def serialize_tensor(tensor: torch.Tensor) -> bytes:
    """Tensor -> bytes: a small header (dtype, shape, and the dim order of a permuted layout)
    and the raw little-endian data in memory order."""
    if tensor.dtype not in _DTYPES:
        raise LinkError(f"dtype {tensor.dtype} cannot be sent; supported: {list(_DTYPES)}")
    t = tensor.detach().to("cpu")
    order = dim_order(t)
    data = t.contiguous() if order is None else t.permute(order)  # both contiguous
    flag = 0 if order is None else _DIM_ORDER
    header = _HEADER.pack(_DTYPES.index(t.dtype), t.dim() | flag)
    header += struct.pack(f"<{t.dim()}q", *t.shape) + bytes(order or ())
    assert len(header) == header_bytes(t.dim(), order is not None)  # what `wire_bytes` counts
    return header + data.reshape(-1).view(torch.uint8).numpy().tobytes()


def deserialize_tensor(payload: bytes, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bytes -> tensor (with the sender's memory layout), checking that the header and the data
    length agree."""
    if len(payload) < _HEADER.size:
        raise LinkError(f"payload of {len(payload)} bytes is shorter than the header")
    code, ndim = _HEADER.unpack_from(payload)
    if code >= len(_DTYPES):
        raise LinkError(f"unknown dtype code {code}")
    permuted, ndim = bool(ndim & _DIM_ORDER), ndim & ~_DIM_ORDER
    if ndim > MAX_DIMS:
        raise LinkError(f"tensor header claims {ndim} dimensions; at most {MAX_DIMS} are allowed")
    offset = header_bytes(ndim, permuted)
    if len(payload) < offset:
        raise LinkError(f"payload of {len(payload)} bytes is shorter than its header ({offset})")
    shape = struct.unpack_from(f"<{ndim}q", payload, _HEADER.size)
    if any(n < 0 for n in shape):
        raise LinkError(f"tensor shape {shape} has a negative size")
    if math.prod(max(n, 1) for n in shape) > MAX_ELEMENTS:  # empty tensors too: their strides
        raise LinkError(f"tensor shape {shape} is too large (over {MAX_ELEMENTS} elements)")
    order = tuple(payload[offset - ndim : offset]) if permuted else tuple(range(ndim))
    if sorted(order) != list(range(ndim)):
        raise LinkError(f"dim order {order} is not a permutation of {ndim} dimensions")
    dtype = _DTYPES[code]
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(payload) - offset != expected:
        raise LinkError(
            f"payload holds {len(payload) - offset} data bytes, shape {shape} of {dtype} "
            f"needs {expected}"
        )
    if expected == 0:  # an empty tensor (torch.frombuffer refuses an empty buffer)
        return torch.empty(shape, dtype=dtype, device=device)
    data = torch.frombuffer(bytearray(payload[offset:]), dtype=torch.uint8)
    stored = data.view(dtype).reshape([shape[d] for d in order])  # memory order
    inverse = sorted(range(ndim), key=order.__getitem__)
    return stored.permute(inverse).to(device)  # `to` keeps the strides of a dense tensor


@dataclass
class LinkStats:
    """Bytes and messages carried by one link, forward (smashed data) and backward (gradients)."""

    bytes_forward: int = 0
    bytes_backward: int = 0
    messages_forward: int = 0
    messages_backward: int = 0

    def add(self, direction: Direction, num_bytes: int) -> None:
        if direction == "forward":
            self.bytes_forward += num_bytes
            self.messages_forward += 1
        else:
            self.bytes_backward += num_bytes
            self.messages_backward += 1


class Link(Protocol):
    """Carries a tensor from one segment to the next (forward) or back (backward)."""

    stats: LinkStats

    def send(self, tensor: torch.Tensor, direction: Direction) -> torch.Tensor:
        """Deliver `tensor` to the other side and return it as the other side receives it."""
        ...


class InProcessLink:
    """Simulated D2D link: hand the tensor on without copying it, count its wire bytes.

    The receiver gets the tensor detached from the sender's graph (its own leaf, as after a
    real transfer), on `device` (the receiving node's) and, for floating tensors, rounded
    through `wire_dtype` (the smashed-data dtype; None: as it is) back to the dtype it left
    with. Nothing is
    copied unless the device or the dtype changes; a dense tensor keeps its memory layout (as
    `serialize_tensor` keeps it), a non-dense view arrives as the contiguous copy the wire
    would deliver. The bytes counted are `wire_bytes` of what was put on the wire.
    """

    def __init__(
        self, device: torch.device | str = "cpu", wire_dtype: torch.dtype | None = None
    ) -> None:
        self.device = torch.device(device)
        self.wire_dtype = wire_dtype
        self.stats = LinkStats()

    def send(self, tensor: torch.Tensor, direction: Direction) -> torch.Tensor:
        sent = tensor.detach()
        if self.wire_dtype is not None:
            sent = to_wire(sent, self.wire_dtype)
        if not sent.is_contiguous() and dim_order(sent) is None:
            sent = sent.contiguous()  # not dense: the wire carries (and delivers) a packed copy
        self.stats.add(direction, wire_bytes(sent))
        # `to` keeps the strides of a dense tensor and is a no-op on the same device and dtype.
        return sent.to(device=self.device, dtype=tensor.dtype)


# -- framed messages (the network transport's payloads) ----------------------------------------
_FRAME = struct.Struct("<I")  # length of the JSON header that follows


def pack_message(header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """A JSON header and named tensors in one payload: [len][header][tensor 1][tensor 2]...

    The header lists each tensor's name and byte length, so the receiver can check the frame
    before decoding anything."""
    blobs = {name: serialize_tensor(t) for name, t in (tensors or {}).items()}
    head = json.dumps({**header, "tensors": [[n, len(b)] for n, b in blobs.items()]}).encode()
    return _FRAME.pack(len(head)) + head + b"".join(blobs.values())


def unpack_message(payload: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Inverse of `pack_message`; raises `LinkError` on a malformed frame."""
    if len(payload) < _FRAME.size:
        raise LinkError(f"message of {len(payload)} bytes is shorter than its frame")
    (size,) = _FRAME.unpack_from(payload)
    end = _FRAME.size + size
    if end > len(payload):
        raise LinkError(f"message header claims {size} bytes, {len(payload) - _FRAME.size} left")
    if size > MAX_HEADER_BYTES:
        raise LinkError(f"message header of {size} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(payload[_FRAME.size : end])
    except RecursionError as err:
        raise LinkError("message header is not valid: JSON nested too deeply") from err
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise LinkError(f"message header is not valid JSON: {err}") from err
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise LinkError("message header must be a JSON object with a 'tensors' list")
    entries = header.pop("tensors")
    if len(entries) > MAX_TENSORS:
        raise LinkError(f"message lists {len(entries)} tensors; at most {MAX_TENSORS}")
    if not all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and type(e[1]) is int
        for e in entries
    ):
        raise LinkError("message header's 'tensors' must be [name, byte length] pairs")
    layout = [(str(name), int(n)) for name, n in entries]
    if any(n < 0 for _, n in layout):
        raise LinkError("message header lists a negative tensor length")
    if len({name for name, _ in layout}) != len(layout):
        raise LinkError("message header lists a tensor name twice")
    if end + sum(n for _, n in layout) != len(payload):
        raise LinkError(
            f"message carries {len(payload) - end} tensor bytes, its header lists "
            f"{sum(n for _, n in layout)}"
        )
    tensors, offset = {}, end
    for name, n in layout:
        tensors[name] = deserialize_tensor(payload[offset : offset + n])
        offset += n
    return header, tensors
