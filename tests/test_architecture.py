"""The layout's rules, checked on the source: the torch-free serving core stays torch-free, training and serving never
import each other (the Hugging Face folder is their interface), no import cycles, small modules, one EngineClient
surface that both engines implement, and typed engine messages where an unknown one fails loudly."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "rung"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every rung module `name` imports, at the top or inside a function (a lazy import is still a dependency)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith("rung") and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_serving_core_and_the_cli_import_no_torch():
    core = [name for name in MODULES if name.startswith("rung.serving.core.")]
    assert len(core) >= 5, core
    code = ("import sys, importlib\n"
            f"for name in {core + ['rung.serving.config', 'rung.serving.flags', 'rung.serving.api.protocol']!r}:\n"
            "    importlib.import_module(name)\n"
            "import rung.cli; rung.cli.build_parser()\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_coordinate_check_and_sweeps_load_no_trainer():
    """Preparing data and measuring activations need neither DeepSpeed nor Ray (the trainer loads in the runs)."""
    code = ("import sys\n"
            "import rung.jobs.experiments.coordcheck, rung.jobs.experiments.sweep, rung.jobs.experiments.ladder\n"
            "assert 'deepspeed' not in sys.modules and 'ray' not in sys.modules, 'a trainer was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("importer, forbidden", [("rung.jobs", "rung.serving"), ("rung.serving", "rung.jobs")])
def test_training_and_serving_do_not_import_each_other(importer, forbidden):
    offenders = {name: sorted(t for t in targets if t.startswith(forbidden + "."))
                 for name, targets in GRAPH.items() if name.startswith(importer + ".")}
    assert not {name: targets for name, targets in offenders.items() if targets}
    assert any(name.startswith(importer + ".") for name in GRAPH)  # the rule looked at something


def test_no_import_cycles():
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for name in GRAPH:
        if name not in index:
            visit(name)
    assert sum(len(targets) for targets in GRAPH.values()) > 200  # the graph was read
    assert not cycles


def test_modules_stay_small_or_say_why():
    long = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()
            if len(path.read_text().splitlines()) > MAX_LINES and "longer than 400 lines because"
            not in (ast.get_docstring(ast.parse(path.read_text())) or "")}
    assert not long


def test_kernel_builds_live_outside_the_package(tmp_path, monkeypatch):
    from rung.serving.worker.ops import cpu_kernels

    monkeypatch.setenv("RUNG_CACHE_DIR", str(tmp_path))
    assert cpu_kernels.build_dir().is_relative_to(tmp_path)
    assert not list(PACKAGE.rglob("*.so"))


def members(cls: type) -> dict[str, tuple[str, list[str]]]:
    """Public members as (kind, parameter names): what a caller of the protocol relies on."""
    out = {}
    for name, value in inspect.getmembers(cls):
        if name.startswith("_") and name not in ("__aiter__", "__anext__"):
            continue
        if isinstance(value, property):
            out[name] = ("property", [])
        elif inspect.isfunction(value):
            kind = "async" if inspect.iscoroutinefunction(value) else "method"
            out[name] = (kind, list(inspect.signature(value).parameters))
    return out


def test_both_engines_implement_the_engine_client_protocol():
    from rung.serving.backends.vllm import VLLMAsyncEngine, VLLMRequestHandle
    from rung.serving.engine.async_engine import AsyncEngine, RequestHandle
    from rung.serving.engine.client import EngineClient, RequestStream

    for protocol, implementations in ((EngineClient, (AsyncEngine, VLLMAsyncEngine)),
                                      (RequestStream, (RequestHandle, VLLMRequestHandle))):
        declared = {name: spec for name, spec in members(protocol).items() if name not in ("request_id",)}
        assert len(declared) >= (10 if protocol is EngineClient else 3), declared
        for implementation in implementations:
            actual = members(implementation)
            for name, spec in declared.items():
                assert actual.get(name) == spec, f"{implementation.__name__}.{name}: {actual.get(name)} != {spec}"


def test_an_unknown_message_is_a_protocol_error():
    from rung.serving.core.request import Status
    from rung.serving.engine.messages import AbortRequest, AddRequest, ProtocolError, dispatch

    handled = []
    handlers = {AddRequest: handled.append, AbortRequest: handled.append}
    dispatch(AbortRequest("r1", Status.FINISHED_STOPPED), handlers)
    assert handled == [AbortRequest("r1", Status.FINISHED_STOPPED)]
    for unknown in (("abort", "r1"), "stop", object()):
        with pytest.raises(ProtocolError, match="unknown message .* bug"):
            dispatch(unknown, handlers)


def tiny_llama(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("where", ["thread", "process"])
def test_an_unknown_engine_message_fails_the_engine_loudly(where, tmp_path):
    """A message of a type the engine core does not know stops it with a failure the server turns into 503s and a
    failing /health — on a compute thread and across the engine process's pipe."""
    from rung.serving.config import EngineConfig
    from rung.serving.core.params import SamplingParams
    from rung.serving.engine.core import ProcessCore, ThreadCore
    from rung.serving.engine.engine import Engine
    from rung.serving.engine.messages import AddRequest

    folder, config = tiny_llama(tmp_path / "llama"), EngineConfig(num_blocks=16, block_size=4)
    core = ThreadCore(Engine(folder, config)) if where == "thread" else ProcessCore(folder, config)
    reports, failures = [], []
    core.start(reports.append, failures.append)
    try:
        core.send(AddRequest("ok", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0)))
        wait_for(lambda: any(e.finish_reason for r in reports for e in r.events))
        assert [e.token_id for r in reports for e in r.events if e.request_id == "ok"]  # the known kinds work
        core.send(("abort", "ok"))  # the string-tagged tuples of old: no longer a message
        wait_for(lambda: failures)
        assert failures and "unknown message tuple" in failures[0] and "bug" in failures[0], failures
        wait_for(lambda: not core.alive, 10)
        assert not core.alive
    finally:
        core.stop()
