"""The engine's config section (``engine``): batching, compilation, prefix caching and the rest."""

from __future__ import annotations

from dataclasses import dataclass


BATCHING = ("auto", "continuous", "static")


@dataclass
class EngineConfig:
    """Config section ``engine``.

    Attributes:
        max_batch_size: requests decoded together (slots of the batch).
        batching: how a call with more requests than slots goes. ``continuous``: a request that
            ends hands its slot to the next waiting one between two rounds (its prompt is
            prefilled into that row of the cache; vLLM's continuous batching), so the batch stays
            full; ``static``: batches of ``max_batch_size`` one after the other, each until its
            last request ends; ``auto`` (default): continuous when the drafter
            (:meth:`~dspark.drafters.Drafter.admit`) and the cache (:meth:`~dspark.cache.KVCache.rows`)
            support it — every built-in drafter with a native target does — else static.
        kv_len_multiple: attention reads the cache up to the longest request rounded up to this
            multiple (fewer distinct shapes for compiled kernels; 1 = exact).
        progress: show a progress bar over rounds.
        compile: ``torch.compile`` the target's round forward (static shapes: attention reads the
            whole cache, one graph per batch size). Pays off for small models whose step time is
            dominated by per-operation overhead; the first round of each shape compiles (seconds
            to a minute). The drafter's own forwards are compiled too; on CPU with inductor's C++
            wrapper (:func:`~dspark.models.compiled.compile_forward`). The sampling settings reach
            them as tensors, so a new temperature (or top-p, penalty, ...) reuses the graphs;
            turning a setting on that was off compiles once more.
        time_phases: split each round's time into draft / schedule / verify / other (host clock; on
            CUDA this adds synchronisations, so keep it for measurements).
        cuda_graphs: replay the target's round forward from CUDA graphs captured per batch size and
            width bucket (:class:`~dspark.models.graphs.GraphedForward`; CUDA targets with the static
            cache only), and the drafter's own forwards where it supports it (``dspark``,
            ``eagle3``, ``draft_model``: :meth:`~dspark.drafters.base.Drafter.use_graphs`). Composes
            with ``compile``.
        prefix_caching: continuous batching: a request takes the free slot whose last prompt shares
            the most first tokens with its own, and prefills only the rest (:mod:`dspark.prefix_cache`;
            vLLM's automatic prefix caching, one prompt per slot). Each slot keeps the target's
            hidden states over its last prompt for the drafter (prompt × the drafter's target
            layers × hidden size). With ``reuse_outputs``, its last request's output counts too.
        reuse_outputs: with prefix caching, a slot holds its last request's prompt and output, so
            that a conversation's next turn (the last prompt, the reply, a new message) prefills the
            new message alone (SGLang's radix cache keeps outputs likewise). For a drafter that reads
            the target's hidden states (``dspark``, ``eagle3``) the rounds keep those over the
            positions they feed: a buffer of slots × max_len × the drafter's target layers × hidden
            size (:class:`~dspark.prefix_cache.HiddenHistory`), written once a round; ``false``: a
            slot holds its last prompt alone, and no such buffer.
        guide_drafts: structured outputs: a drafter that drafts left to right through
            :meth:`~dspark.drafters.Drafter.draw` (``dspark``, ``eagle3``, ``draft_model``,
            ``early_exit``) masks a constrained request's logits with its grammar before each draft
            step, as the target's are masked when it verifies (:class:`~dspark.structured.DraftGuide`): its drafts are
            what the constrained target can accept, at a host read per draft step and, with
            ``compile``, one call per draft step in such rounds (not one for all of them).
            ``false``: the drafters draft as without grammars (the verification masks them alike:
            exact either way).
        cut_stray_drafts: structured outputs: a constrained request's deterministic drafts (the
            n-gram drafter's; any drafter's when greedy) are verified only up to the first one its
            grammar forbids — it would be rejected there, and the bonus token that takes its place
            comes from the same constrained distribution as the recovered one would (vLLM
            validates speculative tokens against the grammar alike); when every request of the
            round is constrained, the verify forward narrows to the longest kept run. Sampled
            drafts are never cut (whether a cut happens would depend on the draw). ``false``:
            every scheduled draft is verified.
        trim_idle_slots: a round runs over the batch's first slots up to its last unfinished
            request (their number rounded up to a power of two), not over all ``max_batch_size``
            of them: a server whose slots are mostly free decodes as fast as a smaller batch
            (vLLM's scheduler batches the running requests alone). Requests take the lowest free
            slots that serve them as well (:meth:`~dspark.prefix_cache.SlotPrefixes.assign`); a
            prompt found in a higher slot is copied down to a lower free one.
            Needs a drafter with :meth:`~dspark.drafters.Drafter.use_rows` (every built-in one)
            and a cache with :meth:`~dspark.cache.KVCache.head`; not with ``cuda_graphs``.
        prefill_chunk: chunked prefill (0: off): a step prefills at most this many new prompt
            positions, over all the prompts it admits (beyond what their slots hold already). A
            prompt whose rest does not fit goes in over several steps, requests that find the
            step's positions spent wait for the next (first come, first served), and the requests
            decoding meanwhile run a round between two such steps: a long prompt, or a burst of
            them, no longer stalls them for its whole prefill (vLLM's chunked prefill with its
            ``max_num_batched_tokens``; here a step prefills or decodes, and each chunk goes into
            the slot as a prompt of its own that the next one reuses — :mod:`dspark.prefix_cache`
            — so it needs ``prefix_caching`` and continuous batching). The tokens are those of a
            whole prefill.
    """

    max_batch_size: int = 64
    batching: str = "auto"
    kv_len_multiple: int = 16
    progress: bool = False
    compile: bool = False
    time_phases: bool = False
    cuda_graphs: bool = False
    prefix_caching: bool = True
    reuse_outputs: bool = True
    guide_drafts: bool = True
    cut_stray_drafts: bool = True
    trim_idle_slots: bool = True
    prefill_chunk: int = 0

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError(f"engine.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batching not in BATCHING:
            raise ValueError(f"engine.batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")
        if self.kv_len_multiple < 1:
            raise ValueError(f"engine.kv_len_multiple must be >= 1, got {self.kv_len_multiple}")
        if isinstance(self.prefill_chunk, bool) or self.prefill_chunk < 0 or self.prefill_chunk == 1:
            # (the next chunk feeds a chunk's last position again: a chunk of one never advances)
            raise ValueError(f"engine.prefill_chunk must be 0 (off) or a number of prompt positions >= 2, got "
                             f"{self.prefill_chunk!r}")


