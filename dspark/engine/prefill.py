"""Admission: requests take a batch's free slots and their prompts are prefilled into the target
cache's rows — sharing a prefill between requests of one prompt, reusing what a slot (or another
prompt admitted with it) holds of the prompt (:mod:`dspark.prefix_cache`), in chunks over several
steps (``engine.prefill_chunk``) — and their first tokens are drawn. The part of :class:`Engine`
that runs between rounds; the round itself is in :mod:`dspark.engine.core`."""

from __future__ import annotations

from dataclasses import replace

import torch

from dspark.engine.batch import Batch, Request, draw_uniforms
from dspark.prefix_cache import ResidentPrompt, common_prefix, valid_scores, with_prefixes
from dspark.records import DecodingState, DraftProposal, batch_params
from dspark.samplers.penalties import PenaltyHistory
from dspark.structured import GrammarRows, constrain

#: prompt positions scored per LM-head call for ``prompt_logprobs`` (bounds the logits held at once)
PROMPT_SCORE_CHUNK = 512


class Admission:
    """The admission half of :class:`~dspark.engine.Engine` (a base class of it, with its
    attributes): taking slots, prefilling prompts (whole, from what a slot holds, or in chunks),
    reading finished requests out of their slots."""

    def _copy_down(self, batch: "Batch", admitting: list[int], free: list[int]) -> list[int]:
        """Rounds run over the slots up to the last busy one (:attr:`trims_idle_slots`): a request
        that would take a free slot for what it holds of its prompt, above a free slot left empty
        by this admission, takes the lowest such slot instead, the positions the slot holds
        copied down to it (:meth:`~dspark.cache.KVCache.copy_rows`) with what the slot kept of its
        prompt — the same prefill saved, rounds no wider for it. (``admitting``: the slots the
        first waiting requests take, in order.)"""
        spare = sorted(set(free) - set(admitting))
        moved = []
        for b, i in zip(admitting, batch.waiting):
            request = batch.requests[i]
            reusable = batch.prefixes.reusable(b, request.prompt, request.prompt_logprobs)
            if not spare or spare[0] > b or not reusable:
                moved.append(b)
                continue
            lower = spare.pop(0)
            self._collect(batch, [lower] if batch.holder[lower] >= 0 else [])  # (before its rows change)
            # every position the slot holds, not only those this request reuses: ``lower`` is
            # recorded as holding all of it, and a later request may reuse more (once it read rows
            # this copy had skipped when this request went back to wait and was aborted)
            held = len(batch.prefixes.resident[b].tokens)
            batch.cache.copy_rows(torch.tensor([b], device=self.device), torch.tensor([lower], device=self.device),
                                  held)
            batch.prefixes.copy(b, lower)
            spare = sorted([*spare, b])
            moved.append(lower)
        return moved

    def _admit(self, batch: "Batch", pairs: list[tuple[int, int]]) -> None:
        """Requests take slots (``pairs``: slot, request): their prompts go into the target cache's
        rows (a forward over them alone, from the positions a slot's last prompt already holds:
        :mod:`dspark.prefix_cache`), their first tokens are drawn from its last logits, and the
        drafter starts them (:meth:`Drafter.start` for a whole batch, or the batch's first requests
        with the other slots empty; :meth:`Drafter.admit` for some of its slots later). The
        requests that held those slots are collected first. (A request prefilled in chunks had its
        prompt counted in the prefix-cache figures when it took its slot: :meth:`_chunks`.)"""
        state, device, slots = batch.state, self.device, batch.state.batch_size
        free, taken = (list(x) for x in zip(*sorted(pairs)))
        self._collect(batch, [b for b in free if batch.holder[b] >= 0])
        requests = [batch.requests[i] for i in taken]
        counted = [i in batch.counted for i in taken]  # (chunked: counted already)
        batch.counted.difference_update(taken)
        longest = max(len(r.prompt) for r in requests)
        rows = torch.tensor(free, device=device)
        width = state.tokens.shape[1]
        tokens = torch.tensor([r.prompt + [0] * (width - len(r.prompt)) for r in requests], dtype=torch.long)
        prompt_lengths = torch.tensor([len(r.prompt) for r in requests], dtype=torch.long, device=device)
        state.tokens[rows], state.prompt_lengths[rows], state.lengths[rows] = tokens.to(device), prompt_lengths, prompt_lengths
        state.done[rows] = False
        state.max_new_tokens = max(state.max_new_tokens, *(r.budget for r in requests))
        for b, i, request in zip(free, taken, requests):
            batch.holder[b], batch.slot_params[b] = i, request.params
            batch.generators[b] = torch.Generator(device=device).manual_seed(request.seed)
        batch.param_rows = [p or requests[0].params for p in batch.slot_params]
        state.params = params = batch_params(batch.param_rows, slots, device, columns=self.config.compile)
        batch.heads = {}  # (the rounds' views of the state carry the settings of their rows)
        batch.stopper.admit(rows, free, requests)
        if batch.stream is not None:
            batch.stream.admit(free, taken, [len(r.prompt) for r in requests])

        # prefill: the prompts go into their cache rows; their last logits give the first tokens.
        # Requests of one prompt (n choices of one request, say) share one prefill: the first one's
        # cache rows are copied, its logits and hidden states serve the others. A prompt that starts
        # as its slot's last one, or as another one admitted now, is prefilled from where they part.
        whole = len(free) == slots
        first: dict[tuple, int] = {}
        source = [first.setdefault(tuple(r.prompt), k) for k, r in enumerate(requests)]
        share = self.shares_prefill and len(first) < len(requests)
        prefilled = list(first.values()) if share else list(range(len(free)))  # (indices into free, ascending)
        asked = max(r.prompt_logprobs for r in requests)  # (−1: none asks for its prompt's scores)
        starts, resident = [0] * len(prefilled), [None] * len(prefilled)
        if self.caches_prefixes:
            starts = [batch.prefixes.reusable(free[k], requests[k].prompt, requests[k].prompt_logprobs) for k in prefilled]
            resident = [batch.prefixes.resident[free[k]] if start else None for k, start in zip(prefilled, starts)]
        # a prompt that shares more with another one admitted now (its leader, prefilled first) than
        # with its slot's last prompt follows it: the leader's rows are copied up to where they part.
        # In sorted order the nearest leader before a prompt shares the most with it.
        leader = [None] * len(prefilled)
        if self.caches_prefixes and self.shares_prefill:
            last = None
            for j in sorted(range(len(prefilled)), key=lambda j: requests[prefilled[j]].prompt):
                prompt, ask = requests[prefilled[j]].prompt, requests[prefilled[j]].prompt_logprobs
                if last is not None:
                    shared = common_prefix(requests[prefilled[last]].prompt, prompt) - 1
                    if shared > starts[j] and (ask < 0 or valid_scores(starts[last], resident[last], asked) >= ask):
                        starts[j], leader[j] = shared, last
                        continue
                last = j
        if whole and not share and not any(starts):
            out, prompt_scores = self._prefill(state, batch.cache, starts, longest, longest, asked)
        else:
            leaders = [j for j in range(len(prefilled)) if leader[j] is None]
            followers = [j for j in range(len(prefilled)) if leader[j] is not None]
            out, prompt_scores = self._prefill_rows(batch, state, rows, prefilled, leaders, starts, resident, asked,
                                                    longest)
            if followers:
                position = {j: p for p, j in enumerate(leaders + followers)}  # (in the phases' outputs)
                for j in followers:
                    i = leader[j]
                    batch.cache.copy_rows(rows[[prefilled[i]]], rows[[prefilled[j]]], starts[j])
                    at, n = position[i], len(requests[prefilled[i]].prompt)
                    resident[j] = ResidentPrompt(requests[prefilled[i]].prompt, [h[at, :n] for h in out.hidden_states],
                                                 None if prompt_scores is None else [x[at, :n - 1] for x in prompt_scores],
                                                 valid_scores(starts[i], resident[i], asked))
                more, more_scores = self._prefill_rows(batch, state, rows, prefilled, followers, starts, resident, asked,
                                                       longest)
                order = torch.tensor([position[j] for j in range(len(prefilled))], device=device)
                out = replace(out, logits=torch.cat([out.logits, more.logits])[order],
                              hidden_states=[torch.cat(pair)[order] for pair in zip(out.hidden_states, more.hidden_states)])
                if prompt_scores is not None:
                    prompt_scores = [torch.cat(pair)[order] for pair in zip(prompt_scores, more_scores)]
        batch.prefixes.queries += sum(len(r.prompt) for r, done in zip(requests, counted) if not done)
        batch.prefixes.hits += (sum(start for k, start in zip(prefilled, starts) if not counted[k])
                                + sum(len(requests[k].prompt) for k, s in enumerate(source) if s != k and not counted[k]))
        if share:
            copies = [k for k, s in enumerate(source) if s != k]
            batch.cache.copy_rows(rows[[source[k] for k in copies]], rows[copies], longest)
            at = {k: j for j, k in enumerate(prefilled)}
            spread = torch.tensor([at[s] for s in source], device=device)
            out = replace(out, logits=out.logits[spread], hidden_states=[h[spread] for h in out.hidden_states])
            prompt_scores = None if prompt_scores is None else [x[spread] for x in prompt_scores]
        if prompt_scores is not None:
            self._keep_prompt_scores(batch, taken, requests, prompt_scores)
        if self.caches_prefixes:  # what each slot now holds, for the next request to take it
            valid = dict(zip(prefilled, (valid_scores(start, r, asked) for start, r in zip(starts, resident))))
            batch.prefixes.keep_admitted(free, [r.prompt for r in requests], out.hidden_states, prompt_scores,
                                         [valid[source[k] if share else k] for k in range(len(free))])
        logits = out.logits if whole else out.logits.new_zeros(slots, *out.logits.shape[1:]).index_copy(0, rows, out.logits)
        admitted = [False] * slots
        for b in free:
            admitted[b] = True
        no_drafts = self._no_drafts = DraftProposal(tokens=state.tokens.new_zeros(slots, 0),
                                                    num_tokens=state.tokens.new_zeros(slots))  # also for skipped rounds
        uniforms = draw_uniforms(batch.generators, admitted, self.verifier.num_uniforms(0, params), device)
        first_logits = batch.stopper.suppress(logits, state)
        state.penalties = None
        if params.penalized:  # the history is the prompt (for the new requests)
            state.penalties = PenaltyHistory.of(state.tokens, state.prompt_lengths, state.lengths, logits.shape[-1])
            first_logits = state.penalties.penalize_verify(first_logits, no_drafts.tokens, no_drafts.num_tokens, params)
        if any(r.grammar is not None for r in requests) or batch.grammars is not None:
            if batch.grammars is None:
                batch.grammars = GrammarRows(slots, logits.shape[-1], batch.lookahead)
            for b, r in zip(free, requests):
                batch.grammars.admit(b, r.grammar, len(r.prompt))
            constrained = batch.grammars.constrained(free)
            if constrained:
                masks = batch.grammars.first_masks(constrained)  # [k, V] (the logits: [B, 1, V])
                masks = masks.view(-1, *[1] * (first_logits.dim() - 2), masks.shape[-1])
                first_logits = constrain(first_logits, constrained, masks)
        first = self.verifier.verify(first_logits, no_drafts, sampler=self.sampler, params=params, uniforms=uniforms)
        num_emitted = torch.tensor(admitted, device=device).long()
        tokens = batch.stopper.check_mass(first_logits, first.tokens, num_emitted, state.lengths)
        batch.stopper.append(state, tokens, num_emitted, logits)
        state.max_cache_len = max(state.max_cache_len, longest)
        if whole or not batch.drafter_started:  # a batch's first requests (the others' slots empty: no context)
            self.drafter.start(state, out if whole else replace(out, logits=logits, hidden_states=[
                h.new_zeros(slots, *h.shape[1:]).index_copy(0, rows, h) for h in out.hidden_states]), batch.cache.max_len)
            batch.drafter_started, batch.drafter_rows = True, slots
        else:
            self.drafter.admit(rows, state, out)

    @staticmethod
    def _collect(batch: "Batch", slots: list[int]) -> None:
        """Read the outputs (and log-probabilities) of the requests in ``slots`` and free the slots
        (one host read)."""
        if not slots:
            return
        state, rows = batch.state, torch.tensor(slots, device=batch.state.tokens.device)
        requests = [batch.holder[b] for b in slots]
        data = torch.cat([state.lengths[rows].unsqueeze(1), batch.cache.lengths[rows].unsqueeze(1), state.tokens[rows]],
                         1).tolist()
        for b, i, row in zip(slots, requests, data):
            batch.outputs[i] = row[2 + len(batch.requests[i].prompt): 2 + row[0]]
            batch.prefixes.extend(b, row[2: 2 + row[1]],  # (the tokens its cache rows hold)
                                  batch.history and batch.history.rows(b))
        spans = [(len(batch.requests[i].prompt), len(batch.outputs[i])) for i in requests]
        wanted = [batch.requests[i].logprobs for i in requests]  # (−1: none; k: k likeliest)
        if batch.stopper.logprobs is not None:
            for i in requests:
                batch.scores.tokens[i] = None
            asking = [j for j, k in enumerate(wanted) if k >= 0]  # (read only their rows)
            if asking:
                for j, row in zip(asking, batch.stopper.logprobs[rows[asking]].tolist()):
                    start, n = spans[j]
                    batch.scores.tokens[requests[j]] = row[start: start + n]
        if batch.stopper.top is not None:
            for i in requests:
                batch.scores.top[i] = None
            asking = [j for j, k in enumerate(wanted) if k >= 1]
            if asking:
                values, ids = (buffer[rows[asking]].tolist() for buffer in batch.stopper.top)
                for j, row_values, row_ids in zip(asking, values, ids):
                    (start, n), k = spans[j], wanted[j]
                    batch.scores.top[requests[j]] = [list(zip(row_ids[t][:k], row_values[t][:k]))
                                                     for t in range(start, start + n)]
        batch.counters.retire(rows, torch.tensor(requests, device=rows.device))
        batch.stopper.release(slots)
        for b in slots:
            batch.holder[b] = -1
            if batch.grammars is not None:
                batch.grammars.release(b)

    def _prefill_rows(self, batch: "Batch", state: DecodingState, rows: torch.Tensor, prefilled: list[int],
                      which: list[int], starts: list[int], resident: list, asked: int, longest: int):
        """Prefill the admitted requests ``prefilled[j]`` for ``j`` in ``which`` (their ``rows``), each
        from ``starts[j]`` (:meth:`_prefill_from`; ``starts[j]`` set to 0 where it prefilled the
        whole prompt)."""
        index = rows[[prefilled[j] for j in which]]
        lengths = state.prompt_lengths[index]
        part = replace(state, tokens=state.tokens[index], prompt_lengths=lengths, lengths=lengths.clone(),
                       done=state.done[index])
        out, scores, begins = self._prefill_from(batch, part, index, [starts[j] for j in which],
                                                 [resident[j] for j in which], asked, longest)
        for j, begin in zip(which, begins):
            starts[j] = begin
        return out, scores

    def _prefill_from(self, batch: "Batch", part: DecodingState, index: torch.Tensor, begins: list[int],
                      kept: list, asked: int, longest: int):
        """Prefill the prompts of ``part`` (a state over the cache rows ``index``: their tokens and
        prompt lengths) each from ``begins[k]``, and put the suffixes' outputs back at their
        prompts' positions with what their resident prompts ``kept``: the hidden states
        ``[k, longest, H]`` and scores ``[k, longest − 1]`` (+ likeliest) as after a prefill of the
        whole prompts. Where the padded suffixes would not fit the cache, the whole prompts.
        Returns the output, the scores and the positions each prefill began at."""
        lengths = part.prompt_lengths.tolist()
        counts = [int(n) - b for n, b in zip(lengths, begins)]
        kv_len = max(b + max(counts) for b in begins)
        if kv_len > batch.cache.max_len:  # (the padded suffixes would not fit: prefill whole prompts)
            begins, counts, kv_len = [0] * len(begins), [int(n) for n in lengths], longest
        out, scores = self._prefill(part, batch.cache.rows(index), begins, max(counts), kv_len, asked)
        if not any(begins) and max(counts) == longest:
            return out, scores, begins
        out = replace(out, hidden_states=[with_prefixes(h, [r and r.hidden[layer] for r in kept], begins, counts, longest)
                                          for layer, h in enumerate(out.hidden_states)])
        if scores is not None:
            scores = [with_prefixes(x, [r and r.scores and (r.scores[i] if i < len(r.scores) else None) for r in kept],
                                    begins, [c - 1 for c in counts], longest - 1) for i, x in enumerate(scores)]
        return out, scores, begins

    def _chunks(self, batch: "Batch", pairs: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[tuple]]:
        """Chunked prefill (:attr:`EngineConfig.prefill_chunk`): the step prefills at most that many
        new prompt positions, first for the prompts being prefilled in chunks already
        (``batch.prefilling``, oldest first), then for the requests taking slots now (``pairs``:
        slot, request; first come, first served). A prompt whose rest fits what is left is admitted
        now (returned as a pair); one that does not prefills what is left — ``(slot, request, end)``:
        the prompt up to ``end`` goes into the slot (:meth:`_prefill_chunks`) — and holds the slot
        from then on (its last request collected), its prompt counted in the prefix-cache figures
        with what the slot held of it before the first chunk. Requests that find nothing left go
        back to the front of the queue, in order. Notes in ``batch.chunked`` whether prefill work is
        left for later steps (then a round of the requests decoding comes first)."""
        budget, admitting, chunks, later = self.config.prefill_chunk, [], [], []
        for b, i in [*batch.prefilling.items(), *pairs]:
            new = b not in batch.prefilling
            if new and (budget <= 0 or later):
                later.append(i)
                continue
            request = batch.requests[i]
            start = batch.prefixes.reusable(b, request.prompt, request.prompt_logprobs)
            held = start + 1 if start else 0  # (positions the slot holds: the last one is fed again)
            rest = len(request.prompt) - held
            if rest <= budget:
                admitting.append((b, i))
                batch.prefilling.pop(b, None)
                batch.prefilled_to.pop(b, None)
                budget -= rest
                continue
            if budget <= 0:  # (in chunks already: its next one in a later step)
                continue
            if held + budget < 2:  # a first chunk of one position: the next would feed it again
                later.append(i)
                continue
            if new:
                self._collect(batch, [b] if batch.holder[b] >= 0 else [])
                batch.prefilling[b] = i
                batch.counted.add(i)
                batch.prefixes.queries += len(request.prompt)
                batch.prefixes.hits += start
            chunks.append((b, i, held + budget))
            budget = 0
        batch.waiting.extendleft(reversed(later))
        batch.chunked = bool(batch.prefilling or later)
        return admitting, chunks

    def _prefill_chunks(self, batch: "Batch", chunks: list[tuple[int, int, int]]) -> None:
        """One chunk of each prompt prefilled in parts (``chunks``: slot, request, end): the prompt up
        to ``end`` goes into the slot's rows from what they hold, as a prompt of its own — its
        hidden states and scores kept with the slot (:class:`~dspark.prefix_cache.ResidentPrompt`)
        for the next chunk to reuse, the last one in the request's admission. No token is drawn,
        and the batch's state is left as it was (the slot rides along in rounds as a free one)."""
        state, device = batch.state, self.device
        slots = [b for b, _, _ in chunks]
        parts = [batch.requests[i].prompt[:end] for _, i, end in chunks]
        tops = [batch.requests[i].prompt_logprobs for _, i, _ in chunks]
        asked, longest, width = max(tops), max(len(p) for p in parts), state.tokens.shape[1]
        starts = [batch.prefixes.reusable(b, p, top) for b, p, top in zip(slots, parts, tops)]
        resident = [batch.prefixes.resident[b] if start else None for b, start in zip(slots, starts)]
        ends = torch.tensor([len(p) for p in parts], dtype=torch.long, device=device)
        part = replace(state, tokens=torch.tensor([p + [0] * (width - len(p)) for p in parts], dtype=torch.long,
                                                  device=device),
                       prompt_lengths=ends, lengths=ends.clone(), done=torch.ones_like(ends, dtype=torch.bool))
        out, scores, starts = self._prefill_from(batch, part, torch.tensor(slots, device=device), starts, resident,
                                                 asked, longest)
        batch.prefixes.keep_admitted(slots, parts, out.hidden_states, scores,
                                     [valid_scores(start, r, asked) for start, r in zip(starts, resident)])
        batch.prefilled_to.update((b, len(p)) for b, p in zip(slots, parts))

    @staticmethod
    def _keep_prompt_scores(batch: "Batch", taken: list[int], requests: list["Request"],
                            prompt_scores: list[torch.Tensor]) -> None:
        """Note the prompt scores of the admitted requests ``taken`` that asked for them (one host read)."""
        asking = [j for j, r in enumerate(requests) if r.prompt_logprobs >= 0]
        values = prompt_scores[0][asking].tolist()
        if any(requests[j].prompt_logprobs > 0 for j in asking):
            top_values, top_ids = (x[asking].tolist() for x in prompt_scores[1:])
        for at, j in enumerate(asking):
            i, k, n = taken[j], requests[j].prompt_logprobs, len(requests[j].prompt) - 1
            batch.scores.prompt[i] = [None] + values[at][:n]
            if k > 0:
                batch.scores.prompt_top[i] = [None] + [list(zip(ids[:k], lps[:k]))
                                                       for lps, ids in zip(top_values[at][:n], top_ids[at][:n])]

    def _prefill(self, state: DecodingState, cache, starts: list[int], width: int, kv_len: int, prompt_top: int = -1):
        """The prompts' forward into the cache from positions ``starts`` on (what a row already holds;
        usually 0): row ``b`` feeds ``prompt[starts[b]:]``, ``width`` its longest such suffix, into a
        cache read up to ``kv_len`` (≥ every ``starts[b] + width``). Returns its output (the logits
        after each prompt's last token ``[B, 1, V]``, the drafter's hidden states over the suffixes
        ``[B, width, H]``) and, when ``prompt_top ≥ 0``, the suffixes' scores: at suffix position
        ``t``, log p(next prompt token) ``[B, width − 1]`` (a row's last ``width − len`` columns are
        padding; no prompt token follows the last position), then with ``prompt_top = k > 0`` the
        ``k`` likeliest tokens' log-probabilities and ids there (``[B, width − 1, k]`` each, likeliest
        first). A model that maps its last layer's output
        to logits (``logits_of``, the native models) scores the prompt in chunks of
        :data:`PROMPT_SCORE_CHUNK` positions; others return the logits at every position at once."""
        target, batch = self.target, state.batch_size
        layers, scored = tuple(self.drafter.hidden_layers), prompt_top >= 0
        begin = torch.tensor(starts, dtype=torch.long, device=state.tokens.device)
        columns = begin.unsqueeze(1) + torch.arange(width, device=begin.device)  # [B, width]: the positions fed
        edge = state.tokens.shape[1] - 1
        num_new = state.prompt_lengths - begin
        cache.set_lengths(begin)
        chunked = scored and hasattr(target, "logits_of")
        positions = (num_new - 1).unsqueeze(1)
        if scored and not chunked:
            positions = torch.arange(width, device=begin.device).expand(batch, -1)
        out = target(state.tokens.gather(1, columns.clamp(max=edge)), cache, num_new, logits_positions=positions,
                     hidden_layers=layers + ((target.num_layers - 1,) if chunked else ()), kv_len=kv_len)
        if not scored:
            return out, None
        scored_columns = columns[:, :width - 1]  # [B, width − 1]: the positions a prompt token follows
        following = state.tokens.gather(1, (scored_columns + 1).clamp(max=edge))  # the token each one predicts

        def score(logits: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
            distributions = torch.log_softmax(logits.float(), -1)
            chosen = distributions.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            return [chosen, *distributions.topk(prompt_top, -1)] if prompt_top > 0 else [chosen]

        if chunked:
            hidden = out.hidden_states[-1][:, :width - 1]
            out = replace(out, hidden_states=out.hidden_states[:len(layers)])
            parts = [score(target.logits_of(hidden[:, i:i + PROMPT_SCORE_CHUNK]), following[:, i:i + PROMPT_SCORE_CHUNK])
                     for i in range(0, max(width - 1, 1), PROMPT_SCORE_CHUNK)]  # (one empty chunk when nothing is scored)
            return out, [torch.cat(pieces, 1) for pieces in zip(*parts)]
        scores = score(out.logits[:, :width - 1], following)
        last = (num_new - 1).view(-1, 1, 1).expand(-1, 1, out.logits.shape[-1])
        return replace(out, logits=out.logits.gather(1, last)), scores
