"""D2D links between split-learning segments (paper Sec. III-C.1: smashed data and gradients).

Every hop serializes the tensor it hands on, so the bytes we count are the bytes a real link would
carry. `InProcessLink` is the simulation's link: it serializes, counts and deserializes in the same
process. A network link (gRPC between lab devices) implements the same `Link` protocol, so the chain
never changes when the transport does.

A hop keeps the tensor's memory layout: a dense tensor whose dimensions lie in memory in another
order than its shape (a prefix-free ViT's tokens straight from the patch convolution are
[B, N, D] with strides (N*D, 1, N)) is sent in memory order with its dim order, and arrives with
the same strides. The unsplit model keeps that layout through every block; a hop that made it
contiguous would let later reductions (average pooling, the backward's sums) round differently,
and the chain would no longer train bit for bit like the unsplit model (README "Exactness").
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

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
    offset = _HEADER.size + 8 * ndim + (ndim if permuted else 0)
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
    """Simulated D2D link: serialize, count the bytes, deserialize onto the receiver's device."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.stats = LinkStats()

    def send(self, tensor: torch.Tensor, direction: Direction) -> torch.Tensor:
        payload = serialize_tensor(tensor)
        self.stats.add(direction, len(payload))
        return deserialize_tensor(payload, self.device)


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
