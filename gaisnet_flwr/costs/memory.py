"""Memory per node of a split chain (paper Sec. III-C.2 / III-D.2 "memory footprint").

Estimated from the model's shape and its segments' description (split/segments.py): weights,
gradients and optimizer state of each node's parameters, what autograd saves for backward, the
smashed data it holds between hops, and a no-grad forward's working set. Checked against what
autograd saves (`measure_saved_activation_bytes`) in tests/test_costs.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from gaisnet_flwr.costs.profiles import CostConfigError
from gaisnet_flwr.split.segments import AttnPoolShape, describe_segments

if TYPE_CHECKING:
    from gaisnet_flwr.split.plan import SplitPlan
    from gaisnet_flwr.vit.model import PromptedViT

OPTIMIZER_STATE = {"sgd": 1, "adamw": 2}  # buffers per tunable parameter: momentum; exp_avg(_sq)


@dataclass(frozen=True)
class MemoryFootprint:
    """Bytes one node holds for one batch (paper Sec. III-C.2 / III-D.2 "memory footprint").

    weights: every parameter of its segment (frozen and tunable).
    gradients, optimizer_state: for its tunable parameters, while training.
    activations: tensors autograd keeps for backward (training), estimated from the shape.
    smashed: its input and output tensors between hops, where autograd does not already hold them.
    inference_activations: the largest working set inside one block of a no-grad forward.
    """

    name: str
    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    smashed: int
    inference_activations: int

    @property
    def training(self) -> int:
        return (
            self.weights + self.gradients + self.optimizer_state + self.activations + self.smashed
        )

    @property
    def inference(self) -> int:
        return self.weights + self.inference_activations + self.smashed


def segment_memory(
    model: PromptedViT,
    plan: SplitPlan,
    batch_size: int,
    optimizer: str = "sgd",
    *,
    momentum: float = 0.9,
) -> list[MemoryFootprint]:
    """Memory per node [start, peer 1 .. peer K, end] while training on `batch_size` samples.

    `optimizer` is one of `OPTIMIZER_STATE` ("sgd" keeps one momentum buffer unless
    `momentum` == 0; "adamw" two moments). Activations follow what autograd saves in a timm
    block (see `block_saved_elements`); tests check them against `measure_saved_activation_bytes`.
    """
    if optimizer not in OPTIMIZER_STATE:
        raise CostConfigError(
            f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZER_STATE)}"
        )
    if batch_size < 1:
        raise CostConfigError(f"batch_size must be >= 1, got {batch_size}")
    chain = describe_segments(model, plan)
    s = chain.shape
    bb = model.backbone
    es = next(model.parameters()).element_size()
    fused = bool(getattr(bb.blocks[0].attn, "fused_attn", False))
    num_heads = int(getattr(bb.blocks[0].attn, "num_heads", 1))
    d = s.embed_dim
    b = batch_size
    state_factor = 0 if (optimizer == "sgd" and momentum == 0) else OPTIMIZER_STATE[optimizer]

    footprints = []
    for seg in chain:
        received, sent = b * seg.tokens_in * d, b * seg.tokens_out * d
        labels = 0
        if seg.role == "start":
            # Images in, tokens out. Only a trained embedding saves anything: the conv's input
            # (and norm_pre's, where the model has one), which then holds the image.
            image = b * s.num_patches * s.patch_dim
            saved = 0
            if seg.trains:
                norm_pre = _is_layer_norm(bb.norm_pre)
                saved = image + (b * seg.tokens_out * (d + 2) if norm_pre else 0)
            smashed = (0 if seg.trains else image) + sent  # the chain holds input and output
            infer = sent
        elif seg.role == "peer":
            # Every block runs on seg.block_tokens tokens (prompts included) and saves
            # activations once a gradient flows through it.
            saved = (
                seg.grad_blocks
                * b
                * block_saved_elements(
                    seg.block_tokens, d, s.mlp_dim, num_heads, fused, seg.weight_grad_blocks > 0
                )
            )
            # The first block's LayerNorm saves the received tokens if they need a gradient,
            # unless a prompt is inserted in front of them (a new tensor); the output is held
            # for backward.
            received_saved = seg.input_needs_grad and not seg.edits_input
            smashed = (0 if received_saved else received) + sent
            infer = b * seg.block_tokens * _block_working_set(d, s.mlp_dim)
        else:
            # Final LayerNorm (if a gradient flows back), pooling, head, loss, on the prompt-free
            # tokens.
            t = s.plain_tokens
            final_norm = seg.input_needs_grad and _is_layer_norm(bb.norm)  # Identity w/ fc_norm
            saved = b * t * (d + 2) if final_norm else 0
            if s.attn_pool is not None:  # MAP: trains with the head (or passes a gradient on)
                if seg.runs_backward:
                    pool_fused = bool(getattr(model.attn_pool, "fused_attn", False))
                    saved += b * attn_pool_saved_elements(s.attn_pool, pool_fused)
                saved += b * d  # the head's input: the pooled feature
            elif bb.global_pool == "token":
                saved += b * t * d  # the head saves x[:, 0], a view: the whole norm output stays
            else:
                if bb.global_pool in ("max", "avgmax"):
                    saved += b * t * d  # amax saves its input, again a view of the norm output
                if seg.input_needs_grad and _is_layer_norm(bb.fc_norm):
                    saved += b * (d + 2)
                saved += b * d  # the head's input: the pooled (and fc-normed) feature
            saved += b * s.num_classes + 1  # cross-entropy: log-softmax output, nll's weight
            labels = 8 * b  # bytes of the int64 labels the loss keeps
            # Dropping travelling prompt slots first makes a new tensor: then the input is held.
            received_saved = final_norm and not seg.edits_input
            smashed = (0 if received_saved else received) + b * s.num_classes
            infer = b * t * d
            if s.attn_pool is not None:  # + the pool's keys and values
                infer += b * 2 * s.attn_pool.tokens * s.attn_pool.dim
        tunable = seg.num_trainable * es
        footprints.append(
            MemoryFootprint(
                name=seg.name,
                weights=seg.num_params * es,
                gradients=tunable,
                optimizer_state=state_factor * tunable,
                activations=saved * es + labels,
                smashed=smashed * es,
                inference_activations=infer * es,
            )
        )
    return footprints


def block_saved_elements(
    tokens: int, dim: int, mlp_dim: int, num_heads: int, fused: bool, full: bool
) -> int:
    """Elements autograd saves per sample in a timm `Block` whose input needs a gradient.

    Frozen linear layers save only their (parameter) weight. What remains, measured on CPU:
      LayerNorm x2    input (D) + mean and rstd (1 + 1) per token
      attention       fused SDPA: q, k, v (one 3D qkv tensor), output (D), logsumexp per head;
                      explicit path: q * scale, k^T and v copies (3D) and the softmax (H T^2)
      GELU            its input (mlp_dim)
    Full fine-tuning adds the inputs of the weight gradients: both LayerNorm outputs (2D) and the
    GELU output (mlp_dim); the projection's input is the SDPA output already saved (explicit path:
    a reshaped copy, D more).
    """
    t, d, h = tokens, dim, mlp_dim
    per_token = 2 * (d + 2) + 3 * d + h  # LayerNorms, q/k/v, GELU input
    # fused: + output and logsumexp; explicit: + the attention probabilities
    attention = t * d + num_heads * t if fused else num_heads * t * t
    weight_grad_inputs = t * (2 * d + h + (0 if fused else d)) if full else 0
    return t * per_token + attention + weight_grad_inputs


def attn_pool_saved_elements(p: AttnPoolShape, fused: bool) -> int:
    """Elements autograd saves per sample in a timm `AttentionPoolLatent` (MAP) that trains,
    measured on CPU: kv's input (the T tokens, in_dim wide) and keys and values (2 T dim: views
    of kv's output for fused SDPA, copies for the explicit path); the queries and the attention
    output (2 L dim) with fused SDPA's logsumexp (heads L) or the explicit softmax (heads L T);
    the MLP's LayerNorm (input and mean/rstd), fc1's input and GELU's input and output; the
    projection's input is the attention output already counted (one latent)."""
    attention = 2 * p.tokens * p.dim + 2 * p.latents * p.dim
    attention += p.num_heads * p.latents * (1 if fused else p.tokens)
    mlp = p.latents * (2 * p.out_dim + 2 + 2 * p.mlp_dim) if p.mlp_dim else 0
    return p.tokens * p.in_dim + attention + mlp


def _block_working_set(dim: int, mlp_dim: int) -> int:
    """Per token, the most a no-grad block holds at once: residual stream, qkv and the attention
    output (5D), or residual, LayerNorm output and the MLP hidden before and after GELU
    (2D + 2 mlp_dim). An estimate; not measured."""
    return max(5 * dim, 2 * dim + 2 * mlp_dim)


def measure_saved_activation_bytes(
    fn: Callable[..., Any], *inputs: Any, exclude: Iterable[torch.Tensor] = ()
) -> int:
    """Bytes of the storages autograd saves for backward while running `fn(*inputs)`.

    Counted with `torch.autograd.graph.saved_tensors_hooks`, once per storage (views share
    one), leaving out the storages of `exclude` (pass the model's parameters: weights saved for
    backward are already counted as weights).
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    total = sum(storages.values())
    del out  # held until here: a live graph keeps saved storages (and their addresses) unique
    return total


def _is_layer_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm)
