"""The slow path: any ``transformers`` causal LM behind dspark's model interface.

The adapter stores keys and values in a ``transformers`` ``DynamicCache`` whose physical length is
the same for every request (the cache grows by ``T`` slots per forward for the whole batch).
Each request's logical sequence is the subset of slots marked valid in ``slot_valid``; rollback
marks slots invalid and crops the tail that no request uses. Correct for every architecture that
accepts a 4-D attention mask and per-request ``position_ids``, but slower than the native model:
memory holds rejected slots until they fall off the tail, and the mask is rebuilt every step.
"""

from __future__ import annotations

import torch
from torch import nn

from dspark.cache.base import KVCache, register_cache
from dspark.records import ModelOutput


@register_cache("hf_dynamic")
class HFSlotCache(KVCache):
    """Per-request lengths over a batch-uniform ``DynamicCache`` (see the module docstring).

    Attributes:
        lengths: ``[B]`` int64 logical lengths.
        slot_valid: ``[B, S]`` bool, physical slot ``s`` holds a committed token of request ``b``.
    """

    def __init__(self, batch_size: int, max_len: int, device):
        from transformers import DynamicCache

        self.dynamic = DynamicCache()
        self._max_len = max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.slot_valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> "HFSlotCache":
        return cls(batch_size, max_len, model.device)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return self._max_len

    @property
    def physical_len(self) -> int:
        """S, slots in the underlying ``DynamicCache``."""
        return self.slot_valid.shape[1]

    def set_lengths(self, lengths: torch.Tensor) -> None:
        self.lengths.copy_(lengths)
        # the i-th valid slot of a row holds its logical position i: keep the first `lengths` of them
        self.slot_valid &= self.slot_valid.long().cumsum(1) <= self.lengths.unsqueeze(1)
        used = self.slot_valid.any(0).nonzero()
        keep = int(used.max()) + 1 if used.numel() else 0
        if keep == 0:
            from transformers import DynamicCache

            self.dynamic = DynamicCache()
        elif keep < self.physical_len:
            self.dynamic.crop(-(self.physical_len - keep))
        self.slot_valid = self.slot_valid[:, :keep]


class HFCausalLM(nn.Module):
    """Wraps a ``transformers`` ``PreTrainedModel`` with the forward signature of :class:`NativeCausalLM`."""

    is_dspark_model = True

    def __init__(self, model):
        super().__init__()
        self.model = model
        object.__setattr__(self, "hf_source", model)  # a plain reference, not a second submodule
        self.hf_config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self._captured: dict[int, torch.Tensor] = {}
        self._layers = _decoder_layers(model)
        for i, layer in enumerate(self._layers):
            layer.register_forward_hook(self._capture_hook(i))
        self._wanted: tuple[int, ...] = ()

    def _capture_hook(self, index: int):
        def hook(module, inputs, output):
            if index in self._wanted:
                self._captured[index] = output[0] if isinstance(output, tuple) else output
        return hook

    @property
    def vocab_size(self) -> int:
        """V (from the output embedding, which may be padded past ``config.vocab_size``)."""
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def num_layers(self) -> int:
        """Decoder layers (hidden-state layer ids are ``0..num_layers-1``)."""
        return len(self._layers)

    @property
    def max_position_embeddings(self) -> int | None:
        """Longest sequence the model was configured for (``None`` if the config does not say)."""
        return getattr(self.hf_config, "max_position_embeddings", None)

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype."""
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Parameter device."""
        return next(self.model.parameters()).device

    def new_cache(self, batch_size: int, max_len: int) -> HFSlotCache:
        """An empty :class:`HFSlotCache`."""
        return HFSlotCache.for_model(self, batch_size, max_len)

    def forward(self, input_ids: torch.Tensor, cache: HFSlotCache, num_new: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, hidden_layers: tuple[int, ...] = (),
                logits_positions: torch.Tensor | None = None, kv_len: int | None = None) -> ModelOutput:
        """Same contract as :meth:`NativeCausalLM.forward` (``kv_len`` is only used for the capacity check)."""
        batch, num_tokens = input_ids.shape
        device = input_ids.device
        if num_new is None:
            num_new = torch.full((batch,), num_tokens, dtype=torch.long, device=device)
        cache.check_capacity(kv_len if kv_len is not None else int(cache.lengths.max()) + num_tokens)
        for layer in hidden_layers:
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"hidden layer id {layer} is outside this model's layers 0..{self.num_layers - 1}")

        offsets = torch.arange(num_tokens, device=device)
        positions = cache.lengths.unsqueeze(1) + offsets  # [B, T]
        among_new = offsets.view(1, -1) <= offsets.view(-1, 1)  # causal [T, T]
        among_new = among_new.expand(batch, -1, -1) if attention_mask is None else attention_mask | torch.eye(
            num_tokens, dtype=torch.bool, device=device)
        old = cache.slot_valid.unsqueeze(1).expand(-1, num_tokens, -1)  # [B, T, S]
        allowed = torch.cat([old, among_new], dim=2).unsqueeze(1)  # [B, 1, T, S+T]
        additive = torch.zeros(allowed.shape, dtype=self.dtype, device=device)
        additive.masked_fill_(~allowed, torch.finfo(self.dtype).min)

        self._wanted, self._captured = tuple(hidden_layers), {}
        out = self.model(input_ids=input_ids, attention_mask=additive, position_ids=positions,
                         cache=cache.dynamic, use_cache=True)
        hidden = [self._captured[i] for i in hidden_layers]
        self._wanted, self._captured = (), {}

        cache.slot_valid = torch.cat([cache.slot_valid, offsets.unsqueeze(0) < num_new.unsqueeze(1)], dim=1)
        cache.lengths += num_new
        logits = out.logits
        if logits_positions is not None:
            logits = logits.gather(1, logits_positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        return ModelOutput(logits=logits, hidden_states=hidden)


def _decoder_layers(model) -> nn.ModuleList:
    """The list of decoder layers of a ``transformers`` causal LM (for hidden-state capture)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    for owner in (decoder, getattr(decoder, "model", None)):
        for name in ("layers", "h", "blocks"):
            layers = getattr(owner, name, None) if owner is not None else None
            if isinstance(layers, nn.ModuleList):
                return layers
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__} (looked for .layers, .h, .blocks)")
