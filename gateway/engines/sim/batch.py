"""TurboMind's batch: which requests run in the next engine step, and which KV-cache blocks they hold.

Pure code (no asyncio, no clock): the simulated engine's scheduler drives it, tests drive it with plain values.
The rules are LMDeploy 0.18's TurboMind (``src/turbomind/engine/scheduler.cc``, ``engine.cc``, ``request.h``;
the same rules as ``SequenceManager::Materialize`` and ``BlockManager`` in the releases before the 0.15
rewrite):

- **Slots.** Up to ``max_batch_size`` requests are in the batch, running or not; later arrivals wait in a
  first-come first-served queue outside it (TurboMind's gateway queue) until a slot frees.
- **Priority.** Every step walks the batch in arrival order (TurboMind's ``unique_id``); older requests are
  served first and may take memory from younger ones, never the reverse.
- **Blocks.** The KV cache is ``kv_cache_blocks`` blocks of ``block_tokens`` tokens (``cache_block_seq_len``,
  64). A request runs only when it holds blocks for its *whole* context: a new request reserves its whole
  prompt at admission, even when its prefill is split over several steps; a decoding request takes one more
  block when its next token crosses a block boundary.
- **Eviction (preemption).** When the free blocks do not suffice, blocks are taken from the youngest requests
  first, last block first (TurboMind stamps a request's blocks in reverse order, and evicts the oldest stamp
  first). A request that lost blocks keeps the valid prefix of its cache and is not active this step; when
  it runs again it recomputes the lost tail (its prompt and the tokens it had generated). The step stops at
  the first request that lost blocks, and at the first request whose blocks cannot be found at all (nobody
  younger overtakes it); nothing is evicted for a request that cannot be admitted.
- **Token budgets.** One step computes at most ``max_forward_tokens`` tokens (``max_prefill_token_num +
  max_batch_size``, rounded up to a multiple of TP): one per decoding request, the rest for prompts. The
  request that crosses the budget gets a partial chunk, cut down to a block boundary. Every request that
  prefills or resumes this step also spends its whole context from ``max_context_tokens``
  (``max_context_token_num``: the session length by default), the attention workspace; the step stops at the
  first request that does not fit a budget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import KW_ONLY, dataclass, field


@dataclass(eq=False)
class BatchSequence:
    """One request as the batch sees it: token counts and the KV-cache blocks it holds.

    ``context_tokens`` (prompt plus generated tokens) is what the request attends to; ``cached_tokens`` of
    them have valid KV entries in its ``blocks``. The request produces its next token in a step that brings
    ``cached_tokens`` up to ``context_tokens``.
    """

    prompt_tokens: int
    output_tokens: int  # tokens it generates before finishing
    _: KW_ONLY
    generated: int = 0
    cached_tokens: int = 0
    blocks: int = 0
    active: bool = False  # ran in the latest step
    in_batch: bool = False
    preemptions: int = 0  # times it lost KV blocks to an older request

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.generated

    @property
    def finished(self) -> bool:
        return self.generated >= self.output_tokens


@dataclass(frozen=True)
class BatchLimits:
    """The engine settings that bound a step (LMDeploy's names, in tokens and blocks)."""

    max_batch_size: int
    kv_cache_blocks: int
    max_forward_tokens: int  # tokens one step computes: max_prefill_token_num + max_batch_size
    max_context_tokens: int  # context of the requests that prefill or resume in one step
    block_tokens: int = 64

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "kv_cache_blocks", "max_forward_tokens", "max_context_tokens", "block_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_forward_tokens < self.block_tokens:
            # A partial chunk ends on a block boundary: a smaller budget could never move a long prompt on.
            raise ValueError(
                f"max_forward_tokens ({self.max_forward_tokens}) must hold at least one block "
                f"({self.block_tokens} tokens)"
            )

    @classmethod
    def turbomind(
        cls, *, max_batch_size: int, kv_cache_blocks: int, max_prefill_token_num: int, session_len: int, tp: int,
        block_tokens: int = 64,
    ) -> BatchLimits:
        """The limits TurboMind derives from its engine settings (``turbomind.cc``): the forward budget is
        ``max_prefill_token_num + max_batch_size`` rounded up to a multiple of TP, the context budget the
        session length (times the session length when it is not above ``max_batch_size``)."""
        forward = max_prefill_token_num + max_batch_size
        forward = -(-forward // tp) * tp
        context = session_len if session_len > max_batch_size else session_len * session_len
        return cls(max_batch_size=max_batch_size, kv_cache_blocks=kv_cache_blocks, max_forward_tokens=forward,
                   max_context_tokens=context, block_tokens=block_tokens)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)


@dataclass(frozen=True)
class Chunk:
    """Work of one request in one step: ``tokens`` new tokens after ``cached_tokens`` already in the cache."""

    seq: BatchSequence
    cached_tokens: int
    tokens: int


@dataclass(frozen=True)
class StepPlan:
    """What one step computes: every active request's chunk, oldest request first."""

    chunks: tuple[Chunk, ...]
    preemptions: int = 0  # requests that lost KV blocks to older ones in this step
    evicted_blocks: int = 0  # blocks they lost

    @property
    def empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class StepOutcome:
    """What a completed step produced: requests that got a token (first tokens flagged), requests that finished."""

    produced: tuple[BatchSequence, ...]
    first_tokens: tuple[BatchSequence, ...]
    finished: tuple[BatchSequence, ...]
    prompt_tokens: int  # prompts whose first token came in this step, in tokens (LMDeploy counts them then)


@dataclass
class TurboMindBatch:
    """The queue, the batch and the block pool of one engine (see the module docstring for the rules)."""

    limits: BatchLimits
    free_blocks: int = field(init=False)
    queue: deque[BatchSequence] = field(init=False, default_factory=deque)
    batch: list[BatchSequence] = field(init=False, default_factory=list)  # in arrival order: oldest first

    def __post_init__(self) -> None:
        self.free_blocks = self.limits.kv_cache_blocks

    @property
    def used_blocks(self) -> int:
        return self.limits.kv_cache_blocks - self.free_blocks

    @property
    def running(self) -> int:
        return sum(1 for seq in self.batch if seq.active)

    @property
    def idle(self) -> bool:
        return not self.batch and not self.queue

    def fits(self, prompt_tokens: int, output_tokens: int) -> bool:
        """Whether a request could ever run: its longest context fits the whole cache and the context budget."""
        longest = prompt_tokens + output_tokens
        return (self.limits.blocks_for(longest) <= self.limits.kv_cache_blocks
                and longest <= self.limits.max_context_tokens)

    def add(self, seq: BatchSequence) -> None:
        """A request arrives: it waits in the queue, behind every earlier arrival."""
        self.queue.append(seq)

    def remove(self, seq: BatchSequence) -> None:
        """A request leaves early (cancelled): out of the queue or the batch, its blocks freed."""
        if seq.in_batch:
            self.batch.remove(seq)
            self._release(seq)
        elif seq in self.queue:
            self.queue.remove(seq)

    def schedule(self) -> StepPlan:
        """Fill free slots from the queue, then decide the next step (TurboMind's scheduling pass)."""
        while self.queue and len(self.batch) < self.limits.max_batch_size:
            seq = self.queue.popleft()
            seq.in_batch = True
            self.batch.append(seq)  # the queue is in arrival order, so the batch stays in it too
        limits = self.limits
        forward_budget, context_budget = limits.max_forward_tokens, limits.max_context_tokens
        chunks: list[Chunk] = []
        stop = len(self.batch)  # the step ends before the oldest request that lost blocks in it
        preemptions = evicted_total = 0
        for index, seq in enumerate(self.batch):
            was_active, seq.active = seq.active, False
            if index >= stop:
                continue
            input_tokens = seq.context_tokens - seq.cached_tokens
            context_cost = seq.context_tokens if input_tokens > 1 or not was_active else 0
            if forward_budget <= 0 or context_cost > context_budget:
                stop = index
                continue
            end = seq.cached_tokens + min(input_tokens, forward_budget)
            if end < seq.context_tokens:
                end -= end % limits.block_tokens  # a partial chunk ends on a block boundary
            if end <= seq.cached_tokens:
                continue
            needed = limits.blocks_for(seq.context_tokens) - seq.blocks
            victims = self._victims(index, needed - min(needed, self.free_blocks))
            if victims is None:
                stop = index  # out of blocks: this request and every younger one wait
                continue
            self.free_blocks -= min(needed, self.free_blocks)
            for victim_index, count in victims:
                self._evict(self.batch[victim_index], count)
                preemptions += 1
                evicted_total += count
                stop = min(stop, victim_index)
            seq.blocks += needed
            seq.active = True
            chunks.append(Chunk(seq, seq.cached_tokens, end - seq.cached_tokens))
            forward_budget -= end - seq.cached_tokens
            context_budget -= context_cost
        return StepPlan(tuple(chunks), preemptions, evicted_total)

    def complete(self, plan: StepPlan) -> StepOutcome:
        """Apply a finished step: caches grow, requests whose context is all cached produce a token, and
        requests that produced their last token leave the batch and free their blocks."""
        produced: list[BatchSequence] = []
        first: list[BatchSequence] = []
        finished: list[BatchSequence] = []
        prompt_tokens = 0
        for chunk in plan.chunks:
            seq = chunk.seq
            if not seq.in_batch or not seq.active:
                continue  # cancelled while the step ran
            seq.cached_tokens = chunk.cached_tokens + chunk.tokens
            if seq.cached_tokens < seq.context_tokens:
                continue  # a partial prefill: no token yet
            if seq.generated == 0:
                first.append(seq)
                prompt_tokens += seq.prompt_tokens
            seq.generated += 1
            produced.append(seq)
            if seq.finished:
                finished.append(seq)
        for seq in finished:
            self.batch.remove(seq)
            self._release(seq)
        return StepOutcome(tuple(produced), tuple(first), tuple(finished), prompt_tokens)

    def _victims(self, index: int, shortfall: int) -> list[tuple[int, int]] | None:
        """(batch index, blocks) to take from requests younger than ``batch[index]``, youngest first; None if
        they do not suffice (then nothing is taken)."""
        victims: list[tuple[int, int]] = []
        younger = len(self.batch) - 1
        while shortfall > 0 and younger > index:
            taken = min(self.batch[younger].blocks, shortfall)
            if taken:
                victims.append((younger, taken))
                shortfall -= taken
            younger -= 1
        return None if shortfall > 0 else victims

    def _evict(self, seq: BatchSequence, count: int) -> None:
        """Take ``count`` blocks from the end of ``seq``'s cache (they go straight to the request that needs
        them, so the free count does not change); ``seq`` keeps the valid prefix."""
        seq.blocks -= count
        seq.cached_tokens = min(seq.cached_tokens, seq.blocks * self.limits.block_tokens)
        seq.active = False
        seq.preemptions += 1

    def _release(self, seq: BatchSequence) -> None:
        self.free_blocks += seq.blocks
        seq.blocks = 0
        seq.cached_tokens = 0
        seq.active = False
        seq.in_batch = False
