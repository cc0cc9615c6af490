"""The model runner: turns a step plan into one packed forward pass over the paged KV cache and returns a token
for every span that reached its request's end. It sees token ids, positions, block tables and sampling inputs —
never request status, queues or stop rules.

A step is prepared (index tensors, sampling rows) and executed separately, so that under async scheduling the next
step is prepared while this one computes; its PENDING tokens are filled in between.
"""

from __future__ import annotations

import logging
import typing
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rung.errors import ConfigError
from rung.platform.cpu_features import native_bf16
from rung.serving.config import DEFAULT_BLOCK_SIZE, DType, EngineConfig
from rung.serving.core.outputs import Sample
from rung.serving.core.scheduler import PENDING, StepPlan
from rung.serving.core.structured import StructuredOutput
from rung.serving.worker.cuda_graphs import Capture, DecodeGraphs, cuda_graph_capture, graphs_blocked
from rung.serving.worker.grammar import GrammarMasks
from rung.serving.worker.kv_sizing import check_device_fits, kv_cache_bytes, num_kv_blocks
from rung.serving.worker.model import InferenceModel
from rung.serving.worker.model_spec import load_spec
from rung.serving.worker.ops.select import select_ops
from rung.serving.worker.parallel.group import CollectiveFailed, TensorParallelGroup
from rung.serving.worker.parallel.sharding import load_shard
from rung.serving.worker.parallel.workers import StepMessage, Workers, rank_config
from rung.serving.worker.quantization import QuantizedWeight, WeightQuantization
from rung.serving.worker.sampling import SampleInput, Sampler
from rung.serving.worker.step import StepInputs
from rung.serving.worker.weights import check_weights, load_weights, weight_files

SLOT_PADDING = 32
DTYPES = {name: getattr(torch, name) for name in typing.get_args(DType)}  # the config's names, as torch dtypes
log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> torch.device:
    """The configured device, or the GPU when there is one, else the CPU; a CUDA device without a GPU is refused."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", "is cuda, but torch sees no CUDA GPU here")
    return torch.device(device)


def load_model(model_dir: str | Path, config: EngineConfig,
               weights: dict[str, torch.Tensor | QuantizedWeight] | None = None,
               group: TensorParallelGroup | None = None) -> InferenceModel:
    """The model of a Hugging Face folder on the configured device and compute path, quantized as configured;
    `weights`: the folder's, when the caller has read them already; `group`: this process's tensor-parallel rank,
    whose shard alone is read."""
    spec = load_spec(model_dir)
    dtype, device = DTYPES[config.dtype], resolve_device(config.device)
    ops = select_ops(device, config.attention_backend)
    ops.check_model(spec.head_dim)
    local = group.shard.local_spec(spec) if group else spec
    check_device_fits(local, dtype, device, config.gpu_memory_utilization)
    if device.type == "cpu" and dtype == torch.bfloat16 and not native_bf16():
        log.warning("dtype bfloat16 on a CPU without AVX-512 BF16 or AMX: every bf16 product is converted here, "
                    "several times slower than float32 (measured 0.13-0.28x on an AVX2-only CPU); serve float32, "
                    "or --quantization int8/int4 for fewer bytes")
    quantization = WeightQuantization.of(config.quantization, config.quantization_group_size, config.quantize_lm_head)
    if group is not None:
        folder = Path(model_dir)
        weights, shapes, _ = load_shard(folder, weight_files(folder), spec, group.shard)
        check_weights(spec, shapes)  # the stored tensors' whole shapes against config.json
    weights = load_weights(model_dir) if weights is None else weights
    if quantization and any(isinstance(w, QuantizedWeight) for w in weights.values()):
        raise ConfigError("quantization", f"{model_dir} is already quantized (its config.json's "
                          "quantization_config); serve it without --quantization")
    return InferenceModel(local, weights, dtype, device, ops, quantization, group, config.overlap_collectives)


@dataclass
class PreparedStep:
    inputs: StepInputs
    sample_rows: list[int]  # the row of each span that samples: its last token
    sample_inputs: list[SampleInput]
    pending: dict[str, int]  # request id -> the row holding its PENDING token (filled in before the step runs)


class ModelRunner:
    def __init__(self, model: InferenceModel, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
                 nano_batches: int = 1, deterministic: bool = False, grammars: GrammarMasks | None = None,
                 workers: Workers | None = None):
        spec = model.spec
        self.model, self.num_blocks, self.block_size = model, num_blocks, block_size
        self.workers = workers  # on a tensor-parallel rank 0: the other ranks, sent every step
        self.grammars = grammars  # structured outputs' masks; None: a runner without a tokenizer refuses them
        self.nano_batches = nano_batches
        # batch-invariant: every request's rows go through their own GEMMs (one nano-batch per span, one logits
        # row at a time), so no other request in the step can change its numerics
        self.deterministic = deterministic
        self.sampler = Sampler(model.device)
        # [layers, key|value, kv heads, slots x head dim]; a block is block_size consecutive slots. The model
        # views keys as [head dim, slots] and values as [slots, head dim] per head, the layouts its two matrix
        # products read, so a request in consecutive blocks attends over views of the pool. SLOT_PADDING unused
        # slots make a key row's stride no power of two (pools are sized in powers of two): otherwise a key's
        # features all map to the same few cache sets, and the attention kernels ran 1.2x slower
        self.cache = torch.zeros(spec.num_layers, 2, spec.num_kv_heads,
                                 (num_blocks * block_size + SLOT_PADDING) * spec.head_dim, dtype=dtype,
                                 device=model.device)
        self.graphs: DecodeGraphs | None = None  # decode steps replayed from CUDA graphs (`capture_graphs`)

    def capture_graphs(self, max_num_seqs: int, capture: Capture) -> None:
        """Capture decode steps of up to max_num_seqs requests; the graphs' padding rows write to the pool's first
        padding slot, which no block owns."""
        self.graphs = DecodeGraphs(self.model, self.cache, max_num_seqs, self.num_blocks + max_num_seqs,
                                   self.num_slots, capture)

    @classmethod
    def for_folder(cls, model_dir: str | Path, config: EngineConfig, nano_batches: int = 1,
                   workers: Workers | None = None, group: TensorParallelGroup | None = None) -> ModelRunner:
        """The model of a Hugging Face folder on the configured device, over a KV pool sized by the config. Under
        tensor parallelism, rank 0 passes the `workers` it started (ranks 1..N-1, whose group it joined) and a
        worker passes its `group`; each holds its own shard."""
        if workers is not None:
            group, config = workers.group, rank_config(config, 0)
        try:
            model = load_model(model_dir, config, group=group)
            spec, dtype, device, ops = model.spec, DTYPES[config.dtype], model.device, model.ops
            block_size = config.block_size or DEFAULT_BLOCK_SIZE
            num_blocks = config.num_blocks or num_kv_blocks(spec, block_size, dtype, kv_cache_bytes(model, config))
            if group is not None:  # every rank's pool holds the same blocks; rank 0 learns what each rank holds
                num_blocks = group.min(num_blocks)
                held = group.gather(torch.tensor([[model.weight_bytes]], device=device))
                if workers is not None:
                    workers.weight_bytes = tuple(held[0].tolist())
        except BaseException:
            if workers is not None:
                try:
                    workers.check()  # a worker that failed to load says why
                finally:
                    workers.stop()
            raise
        grammars = GrammarMasks(model_dir, spec.vocab_size, list(spec.eos_token_ids)) \
            if group is None or group.rank == 0 else None
        runner = cls(model, num_blocks, block_size, dtype, nano_batches, config.deterministic, grammars, workers)
        if graphs_blocked(device, ops.name, spec.num_experts, config.enforce_eager, config.deterministic,
                          config.tensor_parallel_size) is None:
            runner.capture_graphs(config.max_num_seqs, cuda_graph_capture())
        return runner

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def _runs(self, block_table: tuple[int, ...], stop: int) -> list[slice]:
        """Where tokens 0..stop-1 of a request sit in the pool's slots, as runs of consecutive slots: one run when
        the KV manager kept its blocks consecutive, one more for a cached prefix shared with others."""
        runs, size, covered = [], self.block_size, 0
        start = previous = block_table[0]
        if block_table == tuple(range(start, start + len(block_table))):
            return [slice(start * size, start * size + stop)]
        for block in [*block_table[1:], None]:
            if block is None or block != previous + 1:
                length = min((previous + 1 - start) * size, stop - covered)
                if length > 0:
                    runs.append(slice(start * size, start * size + length))
                    covered += length
                start = block
            previous = block
        return runs

    @staticmethod
    def _slots(runs: list[slice], start: int, stop: int) -> list[int]:
        """The slots of tokens start..stop-1."""
        pieces, offset = [], 0
        for run in runs:
            low, high = max(start, offset), min(stop, offset + run.stop - run.start)
            if low < high:
                pieces.extend(range(run.start + low - offset, run.start + high - offset))
            offset += run.stop - run.start
        return pieces

    def prepare(self, plan: StepPlan) -> PreparedStep:
        """Plain Python lists first and one tensor each at the end: a decode step has one token per request, and a
        tensor per request would cost more than the lists."""
        token_ids, positions, slots, spans, first = [], [], [], [], 0
        rows, inputs, pending = [], [], {}
        for span in plan.spans:
            end = span.start + span.num_tokens
            runs = self._runs(span.block_table, end)
            token_ids.extend(span.token_ids)
            positions.extend(range(span.start, end))
            slots.extend(self._slots(runs, span.start, end))
            spans.append((first, span.num_tokens, runs))
            first += span.num_tokens
            if span.token_ids[-1] == PENDING:
                pending[span.request_id] = first - 1
                token_ids[-1] = 0
            if span.samples:
                rows.append(first - 1)
                inputs.append(SampleInput(span.request_id, span.params, span.history[:span.num_prompt_tokens],
                                          span.history[span.num_prompt_tokens:]))
        step = StepInputs(token_ids=torch.tensor(token_ids, dtype=torch.long), positions=torch.tensor(positions),
                          slots=torch.tensor(slots), spans=spans, read_in_place=not self.deterministic
                          ).to(self.model.device)
        # now, while (under async scheduling) the step before computes: what will run, the whole step or its parts
        graphed = self.graphs is not None and self.graphs.takes(step)
        for _, part in [(None, step)] if graphed else step.nano_batches(self._nano_batch_count(step)):
            self.model.ops.prepare(part)
        return PreparedStep(step, rows, inputs, pending)

    def _nano_batch_count(self, step: StepInputs) -> int:
        """Deterministic mode runs every span alone, so its arithmetic never depends on its batch-mates."""
        return len(step.spans) if self.deterministic else self.nano_batches

    @staticmethod
    def fill(step: PreparedStep, samples: dict[str, Sample]) -> None:
        """Put the tokens the previous step sampled in place of the PENDING ones, in the inputs and in what the
        penalties see."""
        if not step.pending:
            return
        token_ids = step.inputs.token_ids
        token_ids[list(step.pending.values())] = torch.tensor([samples[r].token_id for r in step.pending],
                                                              device=token_ids.device)
        for index, row in enumerate(step.sample_inputs):
            if row.request_id in step.pending and row.params.penalised:
                step.sample_inputs[index] = replace(row, output_token_ids=(*row.output_token_ids,
                                                                           samples[row.request_id].token_id))

    def execute(self, step: PreparedStep) -> dict[str, Sample]:
        """A sampled token (with logprobs, when asked) for every span that reached its request's end."""
        structured = [index for index, row in enumerate(step.sample_inputs) if row.params.structured]
        masks = None
        if structured:  # filled on the grammar thread while the forward runs
            if self.grammars is None:
                raise ConfigError("structured", "this model runner was built without a tokenizer for grammars")
            masks = self.grammars.fill([(step.sample_inputs[i].request_id, step.sample_inputs[i].params)
                                        for i in structured])
        hidden = self.graphs.run(step.inputs) if self.graphs else None
        rows = step.sample_rows
        try:
            if hidden is None:
                count = self._nano_batch_count(step.inputs)
                if self.workers is not None:
                    self.workers.send(StepMessage.of(step.inputs, count, rows))
                hidden = self.model.forward(step.inputs, self.cache, count)
            if not rows:
                return {}
            logits = torch.cat([self.model.logits(hidden[[row]]) for row in rows]) if self.deterministic else \
                self.model.logits(hidden[rows])
        except CollectiveFailed as err:  # a rank went away mid-step: say which, when one did
            raise self.workers.explain(err) if self.workers is not None else err from None
        samples = self.sampler.sample(logits, step.sample_inputs,
                                      (structured, masks.result()) if masks else None)
        for index in structured:
            self.grammars.accept(step.sample_inputs[index].request_id, samples[index].token_id)
        return {row.request_id: sample for row, sample in zip(step.sample_inputs, samples)}

    def compute(self, message: StepMessage) -> None:
        """A tensor-parallel worker's part of a step rank 0 sent: the same forward over its shard, and its share of
        the sampled rows' logits (gathered on rank 0)."""
        inputs = message.inputs(self.model.device)
        for _, part in inputs.nano_batches(message.nano_batches):
            self.model.ops.prepare(part)
        hidden = self.model.forward(inputs, self.cache, message.nano_batches)
        if message.sample_rows:
            self.model.logits(hidden[message.sample_rows])

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if this is rank 0 of several."""
        if self.workers is not None:
            self.workers.stop()
            self.workers = None

    def run(self, plan: StepPlan) -> dict[str, Sample]:
        return self.execute(self.prepare(plan)) if plan.spans else {}

    def prepare_grammar(self, structured: StructuredOutput) -> None:
        """A request with this constraint arrived: compile it off the step (`GrammarMasks.prepare`)."""
        if self.grammars is not None:
            self.grammars.prepare(structured)

    def release(self, request_id: str) -> None:
        """Forget a finished request's sampling state (its random stream, its grammar's matcher)."""
        self.sampler.release(request_id)
        if self.grammars is not None:
            self.grammars.release(request_id)
