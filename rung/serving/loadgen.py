"""`rung bench serve`: a load generator for any OpenAI-compatible server (rung's, vLLM's): Poisson or burst
arrivals, an optional concurrency cap, streaming requests; reports throughput, TTFT / TPOT / ITL / end-to-end
latency (mean, median, p99) and goodput under SLOs, as a table, JSON and a PNG of latency over time.

Besides independent prompts it makes the two workloads a prefix cache is for: a shared prefix before every prompt
(a system prompt; `--prefix-len`) and multi-turn conversations (`--turns`), where each turn resends the whole
conversation so far — earlier prompts and the server's own replies — followed by a new message.

TTFT is measured to the first streamed chunk carrying text (a reply that never carried text is left out of it and
counted), ITL between text-carrying chunks, TPOT as (end-to-end − TTFT) / (output tokens − 1) with output tokens
from the server's usage. A failed turn ends its conversation; the turns it leaves unsent count as failed.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rung.errors import RungError

WORDS = ("the model reads a token and writes the next one while the scheduler packs requests into steps "
         "that share a cache of keys and values across layers of attention").split()


@dataclass
class Prompt:
    text: str
    output_len: int
    followups: list[str] = field(default_factory=list)  # later turns' new messages, sent after the conversation


@dataclass
class Result:
    ok: bool
    start: float  # seconds since the benchmark began
    conversation: int = 0  # which prompt of the dataset
    turn: int = 0  # which turn of its conversation
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def load_prompts(dataset: str, num: int, input_len: int, output_len: int, seed: int, prefix_len: int = 0,
                 turns: int = 1) -> list[Prompt]:
    """`random`: prompts of about input_len words, outputs of output_len tokens (both ±50%), each after the same
    prefix of prefix_len words and followed by turns - 1 further messages of about input_len words; or a JSONL file
    of {"prompt": str, "output_len": int} or ShareGPT-style {"conversations": [{"value": ...}, {"value": ...}]}."""
    rng = random.Random(seed)
    if dataset == "random":
        def words(mean: int) -> str:
            return " ".join(rng.choice(WORDS) for _ in range(max(1, int(mean * rng.uniform(0.5, 1.5)))))

        prefix = " ".join(rng.choice(WORDS) for _ in range(prefix_len)) + "\n" if prefix_len else ""
        return [Prompt(prefix + words(input_len), max(1, int(output_len * rng.uniform(0.5, 1.5))),
                       [f"\nUser: {words(input_len)}\nAssistant:" for _ in range(turns - 1)]) for _ in range(num)]
    if prefix_len or turns > 1:
        raise RungError("--prefix-len and --turns make prompts for --dataset random only")
    path = Path(dataset)
    if not path.is_file():
        raise RungError(f"--dataset {dataset}: not 'random' and not a file")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if "conversations" in row:
                exchange = row["conversations"]
                rows.append(Prompt(exchange[0]["value"], max(1, len(exchange[1]["value"].split()))
                                   if len(exchange) > 1 else output_len))
            else:
                rows.append(Prompt(row["prompt"], int(row.get("output_len", output_len))))
        except (ValueError, KeyError, IndexError, TypeError):
            raise RungError(f"--dataset {path}:{number}: expected {{\"prompt\", \"output_len\"}} or "
                            f"{{\"conversations\": [...]}}") from None
    if not rows:
        raise RungError(f"--dataset {path} has no prompts")
    rng.shuffle(rows)
    return [rows[i % len(rows)] for i in range(num)]


async def _one(client, url: str, model: str, text: str, output_len: int, started: float,
               headers: dict) -> tuple[Result, str]:
    """One streamed completion: its measurements, and the text it produced (the next turn resends it)."""
    body = {"model": model, "prompt": text, "max_tokens": output_len, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0}
    result = Result(ok=False, start=time.perf_counter() - started)
    begin = last = time.perf_counter()
    produced = []
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result, ""
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    produced.append(chunk["choices"][0]["text"])
                    if result.ttft == 0.0:
                        result.ttft = now - begin
                    else:
                        result.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
        result.e2e = time.perf_counter() - begin
        result.ok = result.output_tokens > 0
        result.error = "" if result.ok else "no usage in the stream"
    except Exception as err:  # noqa: BLE001 — any failure is a failed request in the report, not a crash
        result.error = f"{type(err).__name__}: {err}"
    return result, "".join(produced)


async def run(base_url: str, model: str, prompts: list[Prompt], request_rate: float, max_concurrency: int | None,
              seed: int, api_key: str | None, log=print) -> tuple[list[Result], float]:
    import httpx

    rng = np.random.default_rng(seed)
    limit = asyncio.Semaphore(max_concurrency or len(prompts))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/completions"
    total = sum(1 + len(prompt.followups) for prompt in prompts)
    done, results = 0, []
    started = time.perf_counter()
    timeout = httpx.Timeout(600.0, connect=10.0)
    limits = httpx.Limits(max_connections=max_concurrency or total or 1)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def gated(text: str, output_len: int) -> tuple[Result, str]:
            nonlocal done
            async with limit:
                result, produced = await _one(client, url, model, text, output_len, started, headers)
            done += 1
            if done % max(total // 10, 1) == 0 or done == total:
                elapsed = time.perf_counter() - started
                log(f"bench: {done}/{total} requests, {done / elapsed:.2f} req/s, elapsed {elapsed:.0f} s, "
                    f"eta {elapsed / done * (total - done):.0f} s")
            return result, produced

        async def converse(index: int, prompt: Prompt) -> list[Result]:
            """The turns of one conversation in order, each resending every earlier prompt and reply."""
            measured, conversation = [], ""
            for turn, message in enumerate([prompt.text, *prompt.followups]):
                conversation += message
                result, produced = await gated(conversation, prompt.output_len)
                result.conversation, result.turn = index, turn
                measured.append(result)
                if not result.ok:
                    unsent = len(prompt.followups) - turn
                    measured += [Result(ok=False, start=result.start, conversation=index, turn=turn + 1 + later,
                                        error="not sent: an earlier turn of its conversation failed")
                                 for later in range(unsent)]
                    break
                conversation += produced
            return measured

        tasks = []
        for index, prompt in enumerate(prompts):
            tasks.append(asyncio.create_task(converse(index, prompt)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / request_rate))  # Poisson arrivals
        results = [result for measured in await asyncio.gather(*tasks) for result in measured]
    return results, time.perf_counter() - started


def summarize(results: list[Result], duration: float, slos: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)

    def stats(values: list[float]) -> dict:
        if not values:
            return {"mean_ms": None, "median_ms": None, "p99_ms": None}
        array = np.array(values) * 1000
        return {"mean_ms": float(array.mean()), "median_ms": float(np.median(array)),
                "p99_ms": float(np.percentile(array, 99))}

    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    good = [r for r in ok if r.ttft * 1000 <= slos.get("ttft", float("inf"))
            and r.e2e * 1000 <= slos.get("e2el", float("inf"))
            and (r.output_tokens <= 1 or (r.e2e - r.ttft) / (r.output_tokens - 1) * 1000 <= slos.get("tpot",
                                                                                                float("inf")))]
    return {"successful_requests": len(ok), "failed_requests": len(results) - len(ok), "duration_s": duration,
            "request_throughput": len(ok) / duration, "output_token_throughput": out_tokens / duration,
            "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
            "goodput": len(good) / duration if slos else None, "slos_ms": slos,
            # a reply whose tokens never made text (random weights, bytes of no character) has no first-text time
            "ttft": stats([r.ttft for r in ok if r.ttft > 0]), "replies_without_text": sum(r.ttft == 0 for r in ok),
            "tpot": stats(tpot),
            "itl": stats([x for r in ok for x in r.itl]), "e2el": stats([r.e2e for r in ok]),
            "errors": sorted({r.error for r in results if not r.ok})[:5]}


def table(summary: dict) -> str:
    lines = [f"{'successful requests':<32}{summary['successful_requests']}",
             f"{'failed requests':<32}{summary['failed_requests']}",
             f"{'duration (s)':<32}{summary['duration_s']:.2f}",
             f"{'request throughput (req/s)':<32}{summary['request_throughput']:.2f}",
             f"{'output tokens/s':<32}{summary['output_token_throughput']:.1f}",
             f"{'total tokens/s':<32}{summary['total_token_throughput']:.1f}"]
    if summary["goodput"] is not None:
        lines.append(f"{'goodput (req/s)':<32}{summary['goodput']:.2f}")
    for key, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        s = summary[key]
        if s["mean_ms"] is not None:
            lines.append(f"{name + ' (ms) mean/median/p99':<32}{s['mean_ms']:.1f} / {s['median_ms']:.1f} / "
                         f"{s['p99_ms']:.1f}")
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.scatter([r.start for r in ok], [r.e2e for r in ok], s=8, label="end-to-end")
    ax.scatter([r.start for r in ok], [r.ttft for r in ok], s=8, label="time to first token")
    failed = [r.start for r in results if not r.ok]
    if failed:
        ax.scatter(failed, [0] * len(failed), marker="x", color="red", label="failed")
    ax.set_xlabel("request start (s)")
    ax.set_ylabel("latency (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_slos(text: str | None) -> dict[str, float]:
    """'ttft:500,tpot:50,e2el:5000' (milliseconds)."""
    slos = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, _, value = part.partition(":")
        if name not in ("ttft", "tpot", "e2el"):
            raise RungError(f"--goodput: unknown SLO {name!r} (ttft, tpot, e2el)")
        try:
            slos[name] = float(value)
        except ValueError:
            raise RungError(f"--goodput: {part!r} is not NAME:MILLISECONDS") from None
    return slos


def bench_serve(base_url: str, model: str, dataset: str, num_prompts: int, request_rate: float,
                max_concurrency: int | None, seed: int, input_len: int, output_len: int, goodput: str | None,
                api_key: str | None, json_path: str | None, plot_path: str | None, prefix_len: int = 0,
                turns: int = 1, log=print) -> dict:
    slos = parse_slos(goodput)
    prompts = load_prompts(dataset, num_prompts, input_len, output_len, seed, prefix_len, turns)
    shape = f" ({turns} turns each)" if turns > 1 else ""
    log(f"bench: {len(prompts)} prompts{shape} to {base_url} ({model}), rate "
        f"{'inf (all at once)' if request_rate == float('inf') else f'{request_rate:g}/s (Poisson)'}, "
        f"concurrency {max_concurrency or 'unlimited'}")
    results, duration = asyncio.run(run(base_url, model, prompts, request_rate, max_concurrency, seed, api_key,
                                        log))
    summary = summarize(results, duration, slos)
    summary.update(base_url=base_url, model=model, dataset=dataset, num_prompts=num_prompts,
                   request_rate=None if request_rate == float("inf") else request_rate,
                   max_concurrency=max_concurrency, seed=seed, prefix_len=prefix_len, turns=turns)
    log(table(summary))
    if json_path:
        Path(json_path).write_text(json.dumps({**summary, "requests": [asdict(r) for r in results]}, indent=2))
        log(f"bench: wrote {json_path}")
    if plot_path:
        plot(results, Path(plot_path))
        log(f"bench: wrote {plot_path}")
    return summary
