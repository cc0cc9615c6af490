"""`rung serve`'s settings (and the model's, which `rung eval` shares) as command-line flags: each flag names a field of the serving config
(`rung/serving/config.py`), takes its default from the dataclass, and a value the config refuses is reported as the
flag the user typed (`--max-num-seqs: must be at least 1, got 0`). Torch-free: `rung --help` imports it."""

from __future__ import annotations

import argparse
import os

from rung.config import default
from rung.errors import ConfigError
from rung.serving.api.tool_calls import TOOL_CALL_FORMATS
from rung.serving.config import CPU_KV_CACHE_MEMORY, DEFAULT_BLOCK_SIZE, EngineConfig, ServeConfig

SERVE_FLAGS: dict[str, str] = {
    "--served-model-name": "served_model_name", "--api-key": "api_key", "--max-num-seqs": "max_num_seqs",
    "--max-num-batched-tokens": "max_num_batched_tokens", "--max-queued-requests": "max_queued_requests",
    "--max-queued-tokens": "max_queued_tokens", "--max-model-len": "max_model_len", "--dtype": "dtype",
    "--kv-cache-memory": "kv_cache_memory", "--block-size": "block_size", "--grace-period": "grace_seconds",
    "--nano-batches": "nano_batches", "--deterministic": "deterministic", "--async-scheduling": "async_scheduling",
    "--device": "device", "--engine": "backend", "--no-prefix-caching": "enable_prefix_caching",
    "--tool-call-parser": "tool_call_parser", "--attention-backend": "attention_backend",
    "--gpu-memory-utilization": "gpu_memory_utilization", "--enforce-eager": "enforce_eager",
    "--quantization": "quantization", "--group-size": "quantization_group_size",
    "--quantize-lm-head": "quantize_lm_head", "--tensor-parallel-size": "tensor_parallel_size",
    "--no-overlap-collectives": "overlap_collectives", "--distributed-backend": "distributed_backend",
}
MODEL_FIELDS = ("dtype", "attention_backend", "quantization", "quantization_group_size", "quantize_lm_head", "device")
GIB = 1 << 30


def add_model_settings(parser: argparse.ArgumentParser) -> None:
    """How the model computes: the flags `rung serve` and `rung eval` share."""
    engine = lambda name: default(EngineConfig, name)  # noqa: E731
    parser.add_argument("--dtype", default=engine("dtype"), choices=["float32", "bfloat16", "float16"],
                        help=f"weights and KV cache dtype (default: {engine('dtype')})")
    parser.add_argument("--attention-backend", default=engine("attention_backend"),
                        choices=["auto", "cpu", "torch", "triton"],
                        help="rung's compute path: cpu (its C++ kernels), torch (PyTorch's operators), triton (paged "
                             "attention in Triton: GPUs, or a CPU under TRITON_INTERPRET=1); auto: cpu on a CPU, triton "
                             "on a GPU where it is installed (default: auto)")
    parser.add_argument("--quantization", default=engine("quantization"), choices=["none", "int8", "int4"],
                        help="the attention, MLP and MoE experts' projections' weights as integers: int8 (a scale "
                             "per output row) or int4 (a scale per --group-size input features); on a CPU they "
                             "multiply rows of activations quantized to int8 (default: none)")
    parser.add_argument("--group-size", type=int, default=engine("quantization_group_size"),
                        help="int4's input features per scale; must divide every projection's input size "
                             f"(default: {engine('quantization_group_size')})")
    parser.add_argument("--quantize-lm-head", action="store_true",
                        help="quantize the readout (vocabulary projection) too")
    parser.add_argument("--device", help="where rung's engine computes: cpu, cuda, cuda:N (default: the GPU when "
                                         "there is one, else the CPU)")


def _value(args: argparse.Namespace, flag: str, name: str):
    return getattr(args, {"--engine": "backend", "--no-prefix-caching": name, "--no-overlap-collectives": name}.get(
        flag, flag[2:].replace("-", "_")))


def model_settings(args: argparse.Namespace) -> dict:
    """The engine settings `add_model_settings`' flags set."""
    return {name: _value(args, flag, name) for flag, name in SERVE_FLAGS.items() if name in MODEL_FIELDS}


def add_serve_settings(serve: argparse.ArgumentParser) -> None:
    engine = lambda name: default(EngineConfig, name)  # noqa: E731
    add_model_settings(serve)
    serve.add_argument("--served-model-name", help="the model id clients use (default: the folder's name)")
    serve.add_argument("--api-key", default=os.environ.get("RUNG_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1 routes (default: $RUNG_API_KEY)")
    serve.add_argument("--max-num-seqs", type=int, default=engine("max_num_seqs"),
                       help=f"most requests running at once (default: {engine('max_num_seqs')})")
    serve.add_argument("--max-num-batched-tokens", type=int, default=engine("max_num_batched_tokens"),
                       help="tokens per engine step: decodes first, then chunked prefill "
                            f"(default: {engine('max_num_batched_tokens')})")
    queued = default(ServeConfig, "max_queued_requests")
    serve.add_argument("--max-queued-requests", type=int, default=queued,
                       help=f"waiting requests before new ones get 429 (default: {queued})")
    serve.add_argument("--max-queued-tokens", type=int,
                       help="prompt tokens of waiting requests before new ones get 429 (default: no bound)")
    serve.add_argument("--max-model-len", type=int, help="context window (default: the model's)")
    serve.add_argument("--kv-cache-memory", type=float, metavar="GIB",
                       help=f"memory for the preallocated KV-cache pool in GiB (default: {CPU_KV_CACHE_MEMORY / GIB:g} "
                            "on a CPU; on a GPU, what --gpu-memory-utilization leaves after the weights and a "
                            "profiled forward at the largest batch)")
    utilization = engine("gpu_memory_utilization")
    serve.add_argument("--gpu-memory-utilization", type=float, default=utilization, metavar="FRACTION",
                       help=f"share of the GPU's memory the engine may take, in (0, 1] (default: {utilization:g})")
    serve.add_argument("--enforce-eager", action="store_true",
                       help="no CUDA graphs: launch every decode step's kernels one by one (graphs are captured on "
                            "a GPU with --attention-backend triton and a dense model)")
    serve.add_argument("--block-size", type=int,
                       help=f"tokens per KV-cache block (default: {DEFAULT_BLOCK_SIZE}; with --engine vllm, vLLM's "
                            "choice)")
    grace = default(ServeConfig, "grace_seconds")
    serve.add_argument("--grace-period", type=float, default=grace,
                       help=f"seconds in-flight requests may take to finish after SIGTERM (default: {grace:g})")
    serve.add_argument("--nano-batches", type=int,
                       help="nano-batches per engine step (default: the --tune result for this device and model, "
                            "else 2 on a GPU and 1 on a CPU)")
    serve.add_argument("--deterministic", action="store_true",
                       help="batch-invariant outputs: a request's results do not depend on what else is running")
    serve.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                       help="compute every prompt afresh instead of reusing the KV of earlier prompts' full blocks "
                            "(vLLM's --no-enable-prefix-caching; --deterministic implies it)")
    serve.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                       help="schedule step i+1 while step i computes (default: rung's engine on a GPU only, "
                            "vLLM's own choice with --engine vllm)")
    serve.add_argument("--tool-call-parser", choices=list(TOOL_CALL_FORMATS),
                       help="how the model writes tool calls, for `tools` in chat requests (default: the format its "
                            "chat template shows; rung's exports write hermes)")
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, default=engine("tensor_parallel_size"),
                       metavar="N",
                       help="split the model across N processes, one per GPU (or per CPU core, with gloo): heads, "
                            "FFN width and vocabulary sharded Megatron-style; with --engine vllm, vLLM's own "
                            "(default: 1)")
    serve.add_argument("--distributed-backend", default=engine("distributed_backend"), choices=["mp", "ray"],
                       help="with --tensor-parallel-size: start the other ranks as processes on this machine (mp), "
                            "or as Ray actors placed by a placement group on the cluster at $RAY_ADDRESS (ray; "
                            "an embedded one without it) (default: mp)")
    serve.add_argument("--no-overlap-collectives", dest="overlap_collectives", action="store_false",
                       help="with --tensor-parallel-size: wait for each all-reduce at once instead of running it "
                            "while the next nano-batch computes")
    serve.add_argument("--engine", dest="backend", default=default(ServeConfig, "backend"), choices=["rung", "vllm"],
                       help="what computes: rung's engine, or vLLM's (needs the vllm extra; default: rung)")


def serve_settings(args: argparse.Namespace) -> dict:
    """The flat settings `rung.serving.config.serve_config` takes, from the parsed flags."""
    settings = {"model_dir": args.model_dir}
    for flag, name in SERVE_FLAGS.items():
        value = _value(args, flag, name)
        settings[name] = round(value * GIB) if name == "kv_cache_memory" and value is not None else value
    return settings


def flag_of(err: ConfigError) -> ConfigError:
    """A serving config error as the flag the user typed: `engine.max_num_seqs` → `--max-num-seqs`."""
    field = err.field.removeprefix("engine.")
    flag = next((flag for flag, name in SERVE_FLAGS.items() if name == field), None)
    return ConfigError(flag, err.message) if flag else err
