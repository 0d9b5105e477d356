"""What each piece of a `PromptedViT` costs, measured on fake tensors (paper Sec. III-C.2).

A piece is what one node runs for one step: the start point's embedding (`model.embed`), one
block with its prompt handling (`model.run_blocks(h, i, i + 1)`), or the end point's head and
loss (`cross_entropy(model.head_forward(h), y)`). `CostMeter` runs a piece once, forward and,
where a gradient flows, backward, on PyTorch's fake tensors (`FakeTensorMode`: shapes, dtypes and
the dispatch a CPU would take, with no data and no memory; a ViT-B/16 step takes tens of
milliseconds whatever the batch), with the model's own trainable flags, and reads

    forward, backward   matmul FLOPs (2 per multiply-accumulate), torch.utils.flop_counter's
                        count, with CPU fused attention counted as its explicit path's matmuls
                        (the counter skips that kernel)
    saved               bytes autograd saves for backward (weights left out: they are weights),
                        and whether the piece's input is among them
    working             the most bytes a no-grad forward holds at once, its input included
    out_shape           one sample's output

So the FLOPs and memory of any block timm builds (SwiGLU, parallel blocks, RoPE attention, a
relative-position bias, ...) are read off what it runs, never off its attributes' names. The
meter keeps what it measured: a planner asking about many block ranges measures each distinct
block once (blocks with the same structure share a measurement).

    split.flops.chain_flops     a segment's FLOPs: the sum of its pieces'
    costs.memory.segment_memory a node's memory: weights, optimizer state, its pieces' saved
                                tensors and working set, the smashed data it holds
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from gaisnet_flwr.vit.model import ModelError, PromptedViT

_aten = torch.ops.aten


def _cpu_sdpa_flops(q: Any, k: Any, v: Any, *_args: Any, out_shape: Any = None, **_kw: Any) -> int:
    return int(sdpa_flop_count(q, k, v))


def _cpu_sdpa_backward_flops(
    grad: Any, q: Any, k: Any, v: Any, *_args: Any, out_shape: Any = None, **_kw: Any
) -> int:
    # dA = dO V^T, dV = A^T dO, dQ = dS K, dK = dS^T Q: twice the forward, as timm's explicit
    # path (and attention on the meta device) computes it. A fused kernel also recomputes the
    # scores A = Q K^T; that is left out, so the count does not depend on the kernel.
    return 2 * int(sdpa_flop_count(q, k, v))


# torch's counter knows the CUDA attention kernels, not the CPU's fused one: count it as the
# explicit path's matmuls.
CPU_ATTENTION_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, counting CPU fused attention too (what the meter counts with)."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


@dataclass(frozen=True)
class PieceCost:
    """One piece at one batch size: FLOPs per sample, bytes for the whole batch."""

    forward: int  # FLOPs per sample
    backward: int  # FLOPs per sample of the backward a training step runs here (0: none)
    saved: int  # bytes autograd keeps for backward (training)
    saves_input: bool  # its input is among them (so holding the input costs nothing more)
    working: int  # most bytes a no-grad forward holds at once, input included (inference)
    out_shape: tuple[int, ...]  # one sample's output


class _Peak(TorchDispatchMode):
    """Bytes of the storages alive while ops run, beyond `held` (weights), from `base`."""

    def __init__(self, held: set[int], base: int) -> None:
        super().__init__()
        self.held = held
        self.live = self.peak = base
        self.alive: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.alive.discard(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.alive and key not in self.held:
                    self.alive.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


class _Call(nn.Module):
    """`fn` over `model`, so that `functional_call` can swap the model's tensors for fakes."""

    def __init__(self, model: nn.Module, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)


def _structure(module: nn.Module) -> Hashable:
    """What a module's cost depends on: its submodules' types and plain settings (heads, fused
    attention, ...), its tensors' shapes, dtypes and trainable flags."""
    parts: list[Hashable] = []
    for name, sub in module.named_modules():
        plain = tuple(
            sorted((k, v) for k, v in vars(sub).items() if isinstance(v, (bool, int, float, str)))
        )
        parts.append((name, type(sub).__qualname__, plain))
    for name, p in module.named_parameters():
        parts.append((name, tuple(p.shape), p.dtype, p.requires_grad))
    for name, b in module.named_buffers():
        parts.append((name, tuple(b.shape), b.dtype))
    return tuple(parts)


@dataclass(frozen=True)
class _FakeState:
    mode: FakeTensorMode
    state: dict[str, torch.Tensor]  # "model.<name>" -> fake parameter or buffer
    weights: set[int]  # their storages (left out of what a piece saves or holds)


_METERS: weakref.WeakKeyDictionary[PromptedViT, tuple[tuple[bool, ...], CostMeter]] = (
    weakref.WeakKeyDictionary()
)


class CostMeter:
    """Measures (once) what each piece of `model` costs; see the module docstring."""

    def __init__(self, model: PromptedViT) -> None:
        self.model = model
        self._costs: dict[Hashable, PieceCost] = {}
        self._keys: dict[int, Hashable] = {}
        self._fakes: dict[bool, _FakeState] = {}

    @classmethod
    def of(cls, model: PromptedViT) -> CostMeter:
        """The meter of `model`, kept while the model lives and its trainable flags stay (what a
        measurement depends on besides shapes): a process that builds a chain per message over
        one cached model measures once, not per message."""
        flags = tuple(p.requires_grad for p in model.parameters())
        kept = _METERS.get(model)
        if kept is None or kept[0] != flags:
            kept = _METERS[model] = (flags, cls(model))
        return kept[1]

    # -- the pieces -------------------------------------------------------------------------
    def start(self, batch: int = 1) -> PieceCost:
        """The start point's embedding of `batch` images."""
        image = self.model.image_shape
        return self._cost(("start", batch), self.model.embed, image, False, batch)

    def block(self, i: int, input_grad: bool, batch: int = 1) -> PieceCost:
        """Block `i` with its prompt handling, on the tokens the previous node or block hands
        it; `input_grad`: a gradient flows into them (something before trains)."""
        model = self.model
        if i not in self._keys:
            prompt = model.inserted_prompt(i)
            self._keys[i] = (
                _structure(model.backbone.blocks[i]),
                None if prompt is None else (prompt.num_tokens, prompt.tokens.requires_grad),
            )
        tokens = (model.tokens_before(i), int(model.backbone.embed_dim))

        def run(h: torch.Tensor) -> torch.Tensor:
            return model.run_blocks(h, i, i + 1)

        return self._cost(("block", self._keys[i], tokens, input_grad, batch), run, tokens,
                          input_grad, batch)  # fmt: skip

    def end(self, input_grad: bool, batch: int = 1) -> PieceCost:
        """The end point: head and cross-entropy loss on the tokens the last peer hands on."""
        model = self.model
        tokens = (model.tokens_before(model.depth), int(model.backbone.embed_dim))

        def run(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model.head_forward(h), y)

        return self._cost(("end", input_grad, batch), run, tokens, input_grad, batch, labels=True)

    # -- measuring --------------------------------------------------------------------------
    def _cost(
        self,
        key: Hashable,
        fn: Callable[..., torch.Tensor],
        in_shape: tuple[int, ...],
        input_grad: bool,
        batch: int,
        labels: bool = False,
    ) -> PieceCost:
        if key not in self._costs:
            train = self._measure(fn, in_shape, input_grad, batch, train=True, labels=labels)
            # Inference runs the piece without the loss: the end point returns its logits.
            infer_fn = self.model.head_forward if labels else fn
            infer = self._measure(infer_fn, in_shape, False, batch, train=False)
            self._costs[key] = PieceCost(
                forward=train.forward,
                backward=train.backward,
                saved=train.saved,
                saves_input=train.saves_input,
                working=infer.working,
                out_shape=infer.out_shape,
            )
        return self._costs[key]

    def _fake_state(self, train: bool) -> _FakeState:
        """The model's parameters and buffers as fake CPU tensors with the same shapes, dtypes
        and (for training) trainable flags, made once per meter (the mode caches dispatch)."""
        if train not in self._fakes:
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            with mode:
                state = {
                    f"model.{n}": torch.empty(p.shape, dtype=p.dtype).requires_grad_(
                        train and p.requires_grad
                    )
                    for n, p in self.model.named_parameters()
                }
                state |= {
                    f"model.{n}": torch.empty(b.shape, dtype=b.dtype)
                    for n, b in self.model.named_buffers()
                }
            weights = {t.untyped_storage()._cdata for t in state.values()}
            self._fakes[train] = _FakeState(mode, state, weights)
        return self._fakes[train]

    def _measure(
        self,
        fn: Callable[..., torch.Tensor],
        in_shape: tuple[int, ...],
        input_grad: bool,
        batch: int,
        *,
        train: bool,
        labels: bool = False,
    ) -> PieceCost:
        # Real tensors that are not parameters or buffers (cached position tables) are read as
        # constants by the fake mode.
        model = self.model
        fake = self._fake_state(train)
        dtype = next(model.parameters()).dtype
        call = _Call(model, fn)
        was_training = model.training
        model.train(train)
        try:
            with fake.mode:
                x = torch.empty((batch, *in_shape), dtype=dtype).requires_grad_(input_grad)
                args = (x, torch.zeros(batch, dtype=torch.long)) if labels else (x,)
                if not train:
                    held = fake.weights | {x.untyped_storage()._cdata}
                    with torch.no_grad(), _Peak(held, x.untyped_storage().nbytes()) as peak:
                        out = functional_call(call, fake.state, args)
                    return PieceCost(
                        forward=0,  # counted in training, where the forward is the same
                        backward=0,
                        saved=0,
                        saves_input=False,
                        working=peak.peak,
                        out_shape=tuple(out.shape[1:]),
                    )
                saved: dict[int, int] = {}

                def pack(t: torch.Tensor) -> torch.Tensor:
                    storage = t.untyped_storage()
                    if storage._cdata not in fake.weights:
                        saved[storage._cdata] = storage.nbytes()
                    return t

                with flop_counter() as counter:
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        out = functional_call(call, fake.state, args)
                    forward = counter.get_total_flops()
                    if out.requires_grad:  # a gradient flows: the backward of a training step
                        out.backward(None if out.dim() == 0 else torch.empty_like(out))
                for t in fake.state.values():
                    t.grad = None
                return PieceCost(
                    forward=forward // batch,
                    backward=(counter.get_total_flops() - forward) // batch,
                    saved=sum(saved.values()),
                    saves_input=x.untyped_storage()._cdata in saved,
                    working=0,
                    out_shape=tuple(out.shape[1:]),
                )
        except Exception as err:  # noqa: BLE001 - a shape the meter cannot run: say which model
            raise ModelError(
                f"cannot measure the FLOPs and memory of {model.name} "
                f"({type(model.backbone).__name__}) on fake tensors: "
                f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            ) from err
        finally:
            model.train(was_training)
