"""HTTP serving benchmark (`make bench`): `rung bench serve` against `rung serve`, against vLLM's OpenAI server
(the CPU build, from its own venv) and against `rung serve --engine vllm` (vLLM's engine behind rung's server) on
the same ~10M-parameter folder, fp32, one compute thread each, at concurrency 1, 8, 32 and 64. Writes
OUT/serve_http.json and OUT/serve_http.png; ratios are rung / vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

from serve_engine import make_models  # noqa: E402

from rung.errors import RungError  # noqa: E402
from rung.platform.processes import wait_until_ready  # noqa: E402

CONCURRENCY = (1, 8, 32, 64)


def add_tokenizer(folder: Path, vocab_size: int = 8000) -> None:
    """A byte-level BPE trained on the Python standard library, saved as a transformers fast tokenizer."""
    if (folder / "tokenizer.json").is_file():
        return
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([str(f) for f in files], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], url: str, log: Path, env: dict) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        return wait_until_ready(process, f"{url}/v1/models", 600, command[0])
    except RungError as err:
        raise RuntimeError(f"{err}: {log.read_text()[-1500:]}") from None


def load(url: str, model: str, concurrency: int, out: Path, name: str) -> dict:
    path = out / f"http-{name}-c{concurrency}.json"
    subprocess.run([sys.executable, "-m", "rung.cli", "bench", "serve", "--base-url", f"{url}/v1", "--model", model,
                    "--num-prompts", str(max(32, 8 * concurrency)), "--max-concurrency", str(concurrency),
                    "--random-input-len", "128", "--random-output-len", "64", "--seed", "0", "--json", str(path)],
                   check=True, capture_output=True, text=True)
    summary = json.loads(path.read_text())
    return {"output_tokens_per_s": summary["output_token_throughput"], "ttft_median_ms": summary["ttft"]["median_ms"],
            "failed": summary["failed_requests"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = make_models(out / "models")["llama-10m"]
    add_tokenizer(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    servers = {"rung": [sys.executable, "-m", "rung.cli", "serve", str(folder), "--served-model-name", "m",
                        "--max-num-seqs", "64"]}
    if Path(args.vllm_python).exists():
        servers["vllm"] = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                           "--served-model-name", "m", "--dtype", "float32", "--enforce-eager", "--max-num-seqs",
                           "64", "--max-model-len", "1024", "--host", "127.0.0.1"]
        # vLLM's engine behind rung's server (`--engine vllm`): what rung's API layer costs over vLLM's own
        servers["rung+vllm-engine"] = [args.vllm_python, "-m", "rung.cli", "serve", str(folder), "--engine", "vllm",
                                       "--served-model-name", "m", "--max-num-seqs", "64", "--max-model-len", "1024"]
    results: dict = {}
    for name, command in servers.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server_env = {**env, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1",
                      "VLLM_CPU_OMP_THREADS_BIND": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[1])
                      } if "vllm" in name else env
        try:
            process = start([*command, "--port", str(port)], url, out / f"http-{name}.log", server_env)
        except RuntimeError as err:
            results[name] = {"error": str(err)}
            print(f"bench: {name}: could not start: {str(err)[-300:]}", flush=True)
            continue
        try:
            results[name] = {str(c): load(url, "m", c, out, name) for c in CONCURRENCY}
            for c, row in results[name].items():
                print(f"bench: {name} concurrency {c}: {row['output_tokens_per_s']:.1f} output tokens/s, "
                      f"median TTFT {row['ttft_median_ms']:.0f} ms, {row['failed']} failed", flush=True)
        finally:
            process.terminate()
            process.wait(60)
    if "error" not in results.get("vllm", {"error": "absent"}):
        results["rung/vllm"] = {c: {"output_tokens_per_s": results["rung"][c]["output_tokens_per_s"]
                                    / results["vllm"][c]["output_tokens_per_s"],
                                    "ttft_median": results["rung"][c]["ttft_median_ms"]
                                    / results["vllm"][c]["ttft_median_ms"]} for c in results["rung"]}
    (out / "serve_http.json").write_text(json.dumps(results, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in servers:
        if "error" not in results.get(name, {"error": 1}):
            ax.plot(CONCURRENCY, [results[name][str(c)]["output_tokens_per_s"] for c in CONCURRENCY], marker="o",
                    label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("output tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "serve_http.png", dpi=100)
    print(f"bench: wrote {out}/serve_http.json and serve_http.png")


if __name__ == "__main__":
    main()
