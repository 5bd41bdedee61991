"""A native decoder for the Llama / Qwen2 / Qwen3 family over a :class:`StaticKVCache`.

One forward takes ``T`` new tokens per request (ragged: request ``b`` has ``num_new[b] ≤ T`` real
ones, the rest is padding), writes their keys and values at each request's own positions, and
returns logits and, on request, the hidden states of chosen layers. The three families differ
only in biases (Qwen2: q/k/v), per-head q/k RMSNorm (Qwen3) and tied embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from dspark.cache import StaticKVCache
from dspark.models.linear import Linear, linear
from dspark.records import ModelOutput

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# rope types whose inverse frequencies do not depend on the sequence length seen so far
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture or one of its options has no native implementation."""


@dataclass(frozen=True)
class ModelArgs:
    """Architecture of a native model (read from a ``transformers`` config by :meth:`from_hf_config`)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    @classmethod
    def from_hf_config(cls, config) -> "ModelArgs":
        """Map a Llama/Qwen2/Qwen3 ``PretrainedConfig``; raise :class:`UnsupportedArchitectureError` otherwise."""
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} has no native implementation (native: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedArchitectureError(f"hidden_act {config.hidden_act!r} is not supported natively (only 'silu')")
        if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
            raise UnsupportedArchitectureError("sliding-window attention is not supported natively")
        rope_type = rope_parameters(config).get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedArchitectureError(
                f"rope_type {rope_type!r} is not supported natively (supported: {', '.join(STATIC_ROPE_TYPES)})"
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


def rope_parameters(config) -> dict:
    """The rope settings of a ``transformers`` 5.x config (``rope_parameters``), as a plain dict."""
    params = getattr(config, "rope_parameters", None) or {}
    return dict(params)


def rope_inverse_frequencies(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq [D/2], attention_scaling)`` for the config's rope type, as ``transformers`` computes them."""
    params = rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the rotate-half convention of these families.

    ``x·cos + rotate_half(x)·sin`` with ``rotate_half([x1, x2]) = [−x2, x1]``, written as
    ``x·cos + roll(x, D/2)·[−sin, sin]`` (three kernels instead of six).
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


class Block(nn.Module):
    """One pre-norm decoder layer: ``x + attention(norm(x))``, then ``x + SwiGLU(norm(x))``.

    Grouped-query attention with fused q/k/v and gate/up projections; q and k heads share one
    norm call (Qwen3) and one rotary call. The forward calls functional ops on the parameters
    directly: on small models the per-module call overhead is a visible share of a decode step.
    """

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.eps = layer, args.rms_norm_eps
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        q_dim, kv_dim = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.attention_norm = nn.Parameter(torch.ones(args.hidden_size))
        self.wqkv = Linear(args.hidden_size, q_dim + 2 * kv_dim, bias=args.qkv_bias)
        # Qwen3 RMS-normalises every q and k head: one scale row per head (q heads, then k heads)
        self.qk_norm = nn.Parameter(torch.ones(args.num_heads + args.num_kv_heads, args.head_dim)) if args.qk_norm else None
        self.wo = Linear(q_dim, args.hidden_size, bias=args.o_bias)
        self.ffn_norm = nn.Parameter(torch.ones(args.hidden_size))
        self.w13 = Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)  # gate, up
        self.w2 = Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: StaticKVCache,
                positions: torch.Tensor, mask: torch.Tensor, kv_len: int) -> torch.Tensor:
        """x ``[B, T, H]``; rope: cos, signed sin ``[B, T, 1, D]``; positions ``[B, T]``;
        mask ``[B, 1, T, kv_len]`` bool → ``[B, T, H]``. Writes the new keys/values to ``cache``."""
        q, kv = self.project(x, rope)
        keys, values = cache.write(self.layer, kv, positions, kv_len)  # [B, H_kv, kv_len, D] each
        return self.attend(x, q, keys, values, mask)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries ``[B, T, H_q, D]`` and new keys/values ``[B, T, 2, H_kv, D]`` (normed, rotated) of ``x``."""
        return self.project_normed(F.rms_norm(x, (x.shape[-1],), self.attention_norm, self.eps), rope)

    def project_normed(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`project` of an already normalised input ``h`` ``[B, T, wqkv.in_features]``."""
        batch, num_new, _ = h.shape
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = linear(h, self.wqkv.weight, self.wqkv.bias).view(batch, num_new, heads + 2 * kv_heads, self.head_dim)
        qk, v = qkv[:, :, : heads + kv_heads], qkv[:, :, heads + kv_heads:]
        if self.qk_norm is not None:
            qk = F.rms_norm(qk, (self.head_dim,), eps=self.eps) * self.qk_norm
        qk = apply_rotary(qk, *rope)
        return qk[:, :, :heads], torch.stack((qk[:, :, heads:], v), 2)

    def project_kv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], normalise: bool = True) -> torch.Tensor:
        """The keys/values of :meth:`project` alone ``[B, T, 2, H_kv, D]``, without computing queries
        (half the projection for these heads): what injecting context into a drafter needs. With
        ``normalise=False`` ``x`` is projected without the layer's input norm."""
        batch, num_new, _ = x.shape
        q_dim, kv_heads = self.num_heads * self.head_dim, self.num_kv_heads
        h = F.rms_norm(x, (x.shape[-1],), self.attention_norm, self.eps) if normalise else x
        bias = None if self.wqkv.bias is None else self.wqkv.bias[q_dim:]
        kv = linear(h, self.wqkv.weight[q_dim:], bias).view(batch, num_new, 2 * kv_heads, self.head_dim)
        k, v = kv[:, :, :kv_heads], kv[:, :, kv_heads:]
        if self.qk_norm is not None:
            k = F.rms_norm(k, (self.head_dim,), eps=self.eps) * self.qk_norm[self.num_heads:]
        return torch.stack((apply_rotary(k, *rope), v), 2)

    def attend(self, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """Attention of ``q`` over ``keys``/``values`` ``[B, H_kv, S, D]`` under ``mask`` ``[B, 1, T, S]``,
        output projection and residual, then the SwiGLU block: the new ``x`` ``[B, T, H]``."""
        batch, num_new, hidden = x.shape
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                           enable_gqa=self.num_heads != self.num_kv_heads)  # [B, heads, T, D]
        x = x + linear(y.transpose(1, 2).reshape(batch, num_new, -1), self.wo.weight, self.wo.bias)
        gate, up = linear(F.rms_norm(x, (hidden,), self.ffn_norm, self.eps), self.w13.weight, self.w13.bias).chunk(2, -1)
        return x + linear(F.silu(gate) * up, self.w2.weight, self.w2.bias)


def build_attention_mask(lengths: torch.Tensor, num_tokens: int, kv_len: int,
                   among_new: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, 1, T, kv_len]`` bool: which cache positions each of ``T`` new tokens may attend to.

    New token ``t`` of request ``b`` sits at position ``lengths[b] + t``. It sees every cached
    position (``< lengths[b]``), itself, and the new tokens that ``among_new`` ``[B, T, T]`` allows
    (default: the causal ones, ``≤ t``).
    """
    batch, device = lengths.shape[0], lengths.device
    offsets = torch.arange(num_tokens, device=device)
    key_pos = torch.arange(kv_len, device=device)
    if among_new is None:
        mask = key_pos <= (lengths.unsqueeze(1) + offsets).unsqueeze(-1)  # [B, T, kv_len] causal
    else:
        rel = key_pos - lengths.unsqueeze(1)  # [B, kv_len] position among the new tokens
        allowed = among_new.gather(2, rel.clamp(0, num_tokens - 1).unsqueeze(1).expand(batch, num_tokens, kv_len))
        itself = rel.unsqueeze(1) == offsets.view(1, -1, 1)
        mask = (rel < 0).unsqueeze(1) | itself | (allowed & (rel < num_tokens).unsqueeze(1))
    return mask.unsqueeze(1)


class NativeCausalLM(nn.Module):
    """Llama / Qwen2 / Qwen3 decoder with a static KV cache (build with :func:`dspark.models.load_model`).

    Args:
        args: the architecture.
        inv_freq: ``[D/2]`` rotary inverse frequencies; attention_scaling: rotary cos/sin scale.
    """

    is_dspark_model = True

    def __init__(self, args: ModelArgs, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.norm = nn.Parameter(torch.ones(args.hidden_size))
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = attention_scaling

    def _apply(self, fn, recurse=True):
        # .to(dtype) must not round the rotary frequencies: keep them float32, follow the device only
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.embed_tokens.weight.device)
        return self

    @property
    def vocab_size(self) -> int:
        """V."""
        return self.args.vocab_size

    @property
    def max_position_embeddings(self) -> int:
        """Longest sequence the model was configured for."""
        return self.args.max_position_embeddings

    @property
    def num_layers(self) -> int:
        """Number of decoder layers (valid hidden-state layer ids are ``0..num_layers-1``)."""
        return self.args.num_layers

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype."""
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Parameter device."""
        return self.embed_tokens.weight.device

    def cache_shape(self) -> tuple[int, int, int]:
        """(layers, KV heads, head dim) of this model's KV cache."""
        return self.args.num_layers, self.args.num_kv_heads, self.args.head_dim

    def new_cache(self, batch_size: int, max_len: int) -> StaticKVCache:
        """A zeroed :class:`StaticKVCache` for this model."""
        return StaticKVCache.for_model(self, batch_size, max_len)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin ``[B, T, 1, D]`` for integer ``positions`` ``[B, T]`` (computed in float32).

        The signed sin is ``[−sin, sin]`` over the two halves (see :func:`apply_rotary`).
        """
        freqs = positions.unsqueeze(-1).float() * self.inv_freq  # [B, T, D/2]
        cos, sin = freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling
        cos, sin_signed = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
        return cos.unsqueeze(2).to(dtype), sin_signed.unsqueeze(2).to(dtype)

    def forward(self, input_ids: torch.Tensor, cache: StaticKVCache, num_new: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, hidden_layers: tuple[int, ...] = (),
                logits_positions: torch.Tensor | None = None, kv_len: int | None = None) -> ModelOutput:
        """Run ``T`` new tokens per request through the model and append them to ``cache``.

        Parameters never require grad (:func:`~dspark.models.load_model` freezes them); call under
        ``torch.inference_mode()`` for speed, as the engine does.

        Args:
            input_ids: ``[B, T]`` int64; row ``b`` holds ``num_new[b]`` real tokens, then padding.
            cache: the request's KV cache; new tokens go to positions ``cache.lengths[b] + t`` and the
                lengths advance by ``num_new`` (padding is written past the length, never committed).
            num_new: ``[B]`` int64 real tokens per row (default: all ``T``).
            attention_mask: optional ``[B, T, T]`` bool, which new tokens each new token may attend
                to (default causal). Every new token always attends to all cached positions and to
                itself (so no row of the mask is empty).
            hidden_layers: ids (``0..num_layers-1``) of decoder layers whose outputs to return.
            logits_positions: optional ``[B, K]`` int64 indices into ``T``; logits only there.
            kv_len: a host-side bound ``≥ max(lengths) + T`` if the caller knows one (avoids a
                device sync); otherwise computed.

        Returns:
            :class:`ModelOutput` with ``logits`` ``[B, K, V]`` and the requested hidden states.
        """
        batch, num_tokens = input_ids.shape
        if kv_len is None:
            kv_len = int(cache.lengths.max()) + num_tokens
        cache.check_capacity(kv_len)
        for layer in hidden_layers:
            if not 0 <= layer < self.args.num_layers:
                raise ValueError(f"hidden layer id {layer} is outside this model's layers 0..{self.args.num_layers - 1}")

        positions = cache.lengths.unsqueeze(1) + torch.arange(num_tokens, device=input_ids.device)  # [B, T]
        mask = build_attention_mask(cache.lengths, num_tokens, kv_len, attention_mask)

        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        hidden = {}
        for i, block in enumerate(self.layers):
            x = block(x, rope, cache, positions, mask, kv_len)
            if i in hidden_layers:
                hidden[i] = x
        cache.advance(num_new if num_new is not None else torch.full_like(cache.lengths, num_tokens))

        if logits_positions is not None:
            x = x.gather(1, logits_positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return ModelOutput(logits=self.logits_of(x), hidden_states=[hidden[i] for i in hidden_layers])

    def early_exit(self, num_layers: int) -> "NativeCausalLM":
        """This model cut after its first ``num_layers`` decoder layers, then its final norm and LM
        head (LayerSkip's early exit, for self-speculative drafting): the same parameter tensors,
        not copies — it costs no memory but its own KV cache (``num_layers`` layers). Never move
        it to another dtype or device (that would convert this model's weights with it)."""
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers < self.num_layers:
            raise ValueError(f"an early exit keeps 1 to {self.num_layers - 1} of this model's {self.num_layers} "
                             f"decoder layers, got {num_layers!r}")
        view = NativeCausalLM.__new__(NativeCausalLM)
        nn.Module.__init__(view)
        view.args = replace(self.args, num_layers=num_layers)
        view.embed_tokens, view.norm, view.lm_head = self.embed_tokens, self.norm, self.lm_head
        view.layers = nn.ModuleList(self.layers[:num_layers])
        view.register_buffer("inv_freq", self.inv_freq, persistent=False)
        view.attention_scaling = self.attention_scaling
        return view

    def logits_of(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., V]`` from the last decoder layer's output ``x`` ``[..., H]`` (final norm, LM
        head) — what :meth:`forward` returns, so a cached last-layer output gives the same logits."""
        return self.lm_head(F.rms_norm(x, (x.shape[-1],), self.norm, self.args.rms_norm_eps))
