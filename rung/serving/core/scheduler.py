"""Continuous batching: each step packs up to `max_num_batched_tokens` tokens — running requests first (decodes,
then the next chunk of any prefill in progress), then new requests, whose prompts are prefilled in chunks that fill
the rest of the budget. When the KV cache runs out, the lowest-priority, latest-arriving running request is
preempted (its blocks freed, its tokens recomputed later), so the engine never fails for lack of memory.

The scheduler imports no torch and decides nothing about how a step is computed (nano-batch splits, graphs): it
hands the runner a StepPlan of plain data and takes back one sampled token per request that reached its end.

A scheduled span counts as computed at once (`num_computed_tokens` moves when the span is planned, not when its step
returns), and a span that samples leaves its request one *pending* token. So the next step can be planned while
this one computes (async scheduling): a request continues from its pending token, which its span carries as
PENDING for the engine to fill in once the step in flight has sampled it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rung.serving.core.kv_cache import KVCacheManager
from rung.serving.core.params import SamplingParams
from rung.serving.core.request import Request, Status

PENDING = -1  # a token id the step in flight has yet to sample


@dataclass(frozen=True)
class Span:
    request_id: str
    start: int  # position of the first token to compute
    num_tokens: int
    token_ids: tuple[int, ...]  # the tokens at positions start .. start + num_tokens - 1 (the last may be PENDING)
    block_table: tuple[int, ...]
    samples: bool  # the span ends at the request's last token: the runner returns a sampled token for it
    params: SamplingParams | None = None  # sampling inputs, on sampling spans only
    num_prompt_tokens: int = 0  # with `history`, what the penalties look at
    history: tuple[int, ...] = ()


@dataclass
class StepPlan:
    spans: list[Span] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(span.num_tokens for span in self.spans)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 deterministic: bool = False):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # chunk boundaries that depend on the request alone (whole chunks of max_num_batched_tokens, never cut
        # by what else is in the step), so its computation is the same alone or in a busy batch
        self.deterministic = deterministic
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str, status: Status = Status.FINISHED_ABORTED) -> bool:
        """Stop a request wherever it is and free its blocks; False if it is unknown or already finished. `status`:
        why (a stop string matched after detokenization finishes a request as stopped, not aborted)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self._release(request, status)
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        decodes_first = sorted(self.running, key=lambda r: (r.num_scheduled_tokens - r.num_computed_tokens > 1,
                                                              r.priority, r.arrival))
        for request in decodes_first:
            if budget == 0 or request.status is not Status.RUNNING or request.ends_with_pending:
                continue
            remaining = request.num_scheduled_tokens - request.num_computed_tokens
            count = min(remaining, budget)
            if self.deterministic and count < min(remaining, self.max_num_batched_tokens):
                continue  # its next whole chunk does not fit this step
            while not self.kv.allocate(request.request_id, request.all_token_ids, count):
                victim = self._victim(exclude=request)
                self._preempt(victim or request, plan)
                if victim is None:
                    break
            if request.status is Status.RUNNING:
                plan.spans.append(self._span(request, request.num_computed_tokens, count))
                budget -= count
        for request in sorted(self.waiting, key=lambda r: (r.priority, r.arrival)):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if request.num_pending:
                continue  # preempted while its token was in flight: it is recomputed once that token is known
            prefix = self.kv.lookup_prefix(request.all_token_ids)
            cached = len(prefix) * self.kv.block_size
            count = min(request.num_tokens - cached, budget)
            if self.deterministic and count < min(request.num_tokens - cached, self.max_num_batched_tokens):
                break  # FCFS: wait for a step with room for its whole first chunk
            if not self.kv.allocate(request.request_id, request.all_token_ids, count, prefix=prefix,
                                    expected_tokens=len(request.prompt_token_ids) + request.params.max_tokens):
                break  # admission control: wait for blocks rather than preempt for a newcomer
            request.status = Status.RUNNING
            self.waiting.remove(request)
            self.running.append(request)
            plan.spans.append(self._span(request, cached, count))
            budget -= count
        return plan

    def update(self, plan: StepPlan, sampled: dict[str, int]) -> list[Request]:
        """Record a computed step's sampled tokens; returns the requests that finished. A request preempted while
        the step ran keeps its token (it is recomputed with it)."""
        finished = []
        for span in plan.spans:
            request = self.requests.get(span.request_id)
            if request is None or not span.samples:
                continue  # aborted while the step ran, or a prefill chunk short of the prompt's end
            request.num_pending -= 1
            request.append(sampled[span.request_id])
            if request.status.finished:
                self.requests.pop(request.request_id)
                self._release(request, request.status)
                finished.append(request)
        return finished

    def _span(self, request: Request, start: int, count: int) -> Span:
        """Plan tokens start..start+count-1 of `request`, counting them as computed from now on."""
        samples = start + count == request.num_scheduled_tokens
        known = request.all_token_ids[start:start + count]
        p = request.params
        penalised = samples and p.penalised
        request.num_computed_tokens = start + count
        request.num_pending += samples
        return Span(request.request_id, start, count, (*known, *[PENDING] * (count - len(known))),
                    tuple(self.kv.block_table(request.request_id)), samples=samples,
                    params=p if samples else None, num_prompt_tokens=len(request.prompt_token_ids),
                    history=tuple(request.all_token_ids) if penalised else ())

    def _victim(self, exclude: Request) -> Request | None:
        candidates = [r for r in self.running if r is not exclude]
        return max(candidates, key=lambda r: (r.priority, r.arrival), default=None)

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        """Recompute later: free the blocks, keep the tokens (a token in flight still arrives), and queue it
        ahead of newer arrivals."""
        self.kv.free(request.request_id)
        self.running.remove(request)
        request.num_pending -= sum(s.samples for s in plan.spans if s.request_id == request.request_id)
        request.status, request.num_computed_tokens = Status.WAITING, 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(request)
        plan.spans = [s for s in plan.spans if s.request_id != request.request_id]
        plan.preempted.append(request.request_id)

    def _release(self, request: Request, status: Status) -> None:
        self.kv.free(request.request_id)
        if request in self.running:
            self.running.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        request.status = status
