"""How a node computes and what its D2D hops carry: the run's numeric precision.

Two independent choices (run-config `precision` and `smashed-dtype`, checked in config.py):

* compute precision, per node, around its segment:
    fp32   plain float32 everywhere (the default; on a CPU the split chain then trains bit for
           bit like the unsplit model, docs/vits.md "Exactness")
    tf32   float32 tensors, matmuls and convolutions on CUDA tensor cores in TF32 (10-bit
           mantissa). TF32 is a CUDA format: on a CPU this is exactly fp32.
    bf16   `torch.autocast` to bfloat16 in every forward pass. Parameters (prompts, head, the
           frozen backbone), their gradients and the optimizer state stay float32; autocast
           only runs matmuls and convolutions in bfloat16, and timm's residual stream stays
           float32 (a float32 input plus a bfloat16 branch is float32).
* smashed-data dtype, per D2D hop: the floating tensors a hop carries (smashed data forward,
  their gradients back) are cast to fp32 / bf16 / fp16 on the sender and back to the dtype
  they left with on the receiver. bf16 and fp16 halve the D2D bytes the paper counts
  (Sec. III-C.2); the cost model prices the bytes counted, i.e. what actually travelled.
  Labels (int64) and inference results are not smashed data and travel as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from gaisnet_flwr.config import PRECISIONS, SMASHED_DTYPE_NAMES

# The torch dtype of each smashed-dtype name the run-config offers.
SMASHED_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
assert tuple(SMASHED_DTYPES) == SMASHED_DTYPE_NAMES


@dataclass(frozen=True)
class Precision:
    """The compute precision of the segments and the dtype of the smashed data on the wire."""

    compute: str = "fp32"  # one of PRECISIONS
    smashed: str = "fp32"  # one of SMASHED_DTYPES

    def __post_init__(self) -> None:
        if self.compute not in PRECISIONS:
            raise ValueError(
                f"precision={self.compute!r} is not valid; choose one of {', '.join(PRECISIONS)}"
            )
        if self.smashed not in SMASHED_DTYPES:
            raise ValueError(
                f"smashed-dtype={self.smashed!r} is not valid; choose one of "
                f"{', '.join(SMASHED_DTYPES)}"
            )

    @property
    def wire_dtype(self) -> torch.dtype:
        """The dtype a D2D hop puts floating tensors in."""
        return SMASHED_DTYPES[self.smashed]

    @contextlib.contextmanager
    def forward(self, device: torch.device) -> Iterator[None]:
        """A forward pass on `device`: TF32 matmuls (CUDA) or bf16 autocast, as chosen."""
        with self.backward(device):
            if self.compute == "bf16":
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    yield
            else:
                yield

    @contextlib.contextmanager
    def backward(self, device: torch.device) -> Iterator[None]:
        """A backward pass (autocast is a forward-only context: its backward ops run in the
        dtypes the forward chose); with tf32 on CUDA, matmuls and convolutions use TF32."""
        if self.compute != "tf32" or device.type != "cuda":
            yield
            return
        # Process-wide flags, set for the pass and restored. The `fp32_precision` API only:
        # torch refuses a mix of it and the legacy `allow_tf32` flags.
        matmul = torch.backends.cuda.matmul
        conv = torch.backends.cudnn.conv  # type: ignore[attr-defined]
        saved = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision = conv.fp32_precision = "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved


FP32 = Precision()


def to_wire(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What a hop puts on the wire: floating tensors in `dtype`, anything else as it is."""
    if tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor


def tensor_device(params: list[torch.nn.Parameter], fallback: torch.device) -> torch.device:
    """The device a segment computes on: where its parameters live (`fallback` if it holds
    none). A segment spread over several devices is refused: its node would not be one
    device."""
    devices = {p.device for p in params}
    if len(devices) > 1:
        where = sorted(map(str, devices))
        raise ValueError(f"a segment's parameters lie on several devices: {where}")
    return devices.pop() if devices else fallback


def resolve_device(name: str) -> torch.device:
    """run-config `device`: auto is the GPU this process sees, if any. Under Flower's Ray
    simulation that is the one Ray assigned this ClientApp (client-resources-num-gpus > 0 sets
    CUDA_VISIBLE_DEVICES; with 0 GPUs Ray hides them all and the node runs on the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def non_finite(values: Mapping[str, Any]) -> list[str]:
    """The keys whose floating-point values (torch tensors or NumPy arrays) hold a NaN or an
    infinity, sorted: the one check every receiver of weights or modules runs."""
    bad = []
    for key, value in values.items():
        tensor = torch.as_tensor(value)  # a NumPy array is shared, not copied
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad.append(key)
    return sorted(bad)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Torch's intra-op threads set to `threads` inside the block, the caller's restored after
    (None leaves torch alone). The thread count changes how float sums are split, so the same
    count is what makes results equal bit for bit: the cloud's pre-training runs at one thread,
    an in-process ClientApp call at the threads a Ray actor would have."""
    if threads is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
