"""How much a LoRA adapter costs on one vLLM server: base vs adapter requests, same server, same run.

Run by hand (not a test):

    .venv/bin/python bench/lora_overhead.py [--adapter alpha] [--concurrency 1 4 16] [--max-tokens 64]

Starts one real vLLM server on the tiny generated model (tests/fixtures), loads one adapter, and for each
concurrency level runs rounds of base and adapter requests in turn (base, adapter, base, adapter, ...), each
round with that many concurrent streaming clients. It measures time to first token (TTFT) per request and
output tokens per second over each round (all clients together), then prints a table with adapter/base
ratios. Prompts are distinct per request and the prefix cache is off, so every request pays its prefill.

On a tiny model the absolute numbers say little about a real GPU; the ratios show the LoRA code path's
overhead in vLLM's scheduler and kernels on this machine. On a 2-core machine the client-side TTFT is
distorted: the API server often sends a request's streamed chunks in one burst at the end of the generation
(while vLLM's own TTFT histogram says ~10 ms), so client TTFT there is close to the whole request's latency.
The engine-stamped columns (prefill, inter-token) are the ones to compare across base and adapter.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "operator"))

from openai import AsyncOpenAI  # noqa: E402
from tests.fixtures.models import WORDS, adapter_dirs, adapter_rank, tiny_model_dir  # noqa: E402
from tests.fixtures.vllm_server import SERVED_MODEL_NAME, VllmServer  # noqa: E402

from loraserve.vllm.admin import VllmAdmin  # noqa: E402

# vLLM's own latency histograms (sum, count), read from /metrics before and after each round. Only one model
# runs in a round, so the difference is that model's. Prefill, decode and inter-token times are stamped in
# the engine core, so they do not include HTTP, the API server's scheduling or this client's.
SERVER_HISTOGRAMS = {
    "ttft": "vllm:time_to_first_token_seconds",
    "prefill": "vllm:request_prefill_time_seconds",
    "itl": "vllm:inter_token_latency_seconds",
}


def histogram_totals(metrics_text: str) -> dict[str, tuple[float, float]]:
    totals: dict[str, tuple[float, float]] = {}
    wanted = {v: k for k, v in SERVER_HISTOGRAMS.items()}
    for family in text_string_to_metric_families(metrics_text):
        key = wanted.get(family.name)
        if key is None:
            continue
        total = sum(x.value for x in family.samples if x.name == family.name + "_sum")
        count = sum(x.value for x in family.samples if x.name == family.name + "_count")
        totals[key] = (total, count)
    return totals


@dataclass
class Round:
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0
    server: dict[str, tuple[float, float]] = field(default_factory=dict)  # histogram (sum, count) deltas


@dataclass
class Result:
    rounds: list[Round] = field(default_factory=list)

    @property
    def ttfts(self) -> list[float]:
        return [t for r in self.rounds for t in r.ttft]

    @property
    def tokens_per_s(self) -> float:
        """Median over rounds of output tokens per second (all clients together): robust to a noisy round."""
        return statistics.median(r.tokens / r.wall for r in self.rounds)

    def server_mean(self, key: str) -> float:
        total = sum(r.server[key][0] for r in self.rounds)
        count = sum(r.server[key][1] for r in self.rounds)
        return total / count if count else float("nan")


class Prompts:
    def __init__(self, seed: int, words: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._words = words

    def next(self) -> str:
        picks = self._rng.integers(0, len(WORDS), size=self._words)
        return " ".join(WORDS[int(i)] for i in picks)


async def one_request(client: AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if first is None or tokens != max_tokens:
        raise RuntimeError(f"{model}: got {tokens} tokens (wanted {max_tokens}), first token seen: {first}")
    return first - start, tokens


async def run_round(
    client: AsyncOpenAI,
    admin_session: aiohttp.ClientSession,
    metrics_url: str,
    model: str,
    concurrency: int,
    per_client: int,
    max_tokens: int,
    prompts: Prompts,
) -> Round:
    result = Round()

    async def worker() -> None:
        for _ in range(per_client):
            ttft, tokens = await one_request(client, model, prompts.next(), max_tokens)
            result.ttft.append(ttft)
            result.tokens += tokens

    async def totals() -> dict[str, tuple[float, float]]:
        async with admin_session.get(metrics_url) as resp:
            return histogram_totals(await resp.text())

    before = await totals()
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall = time.perf_counter() - start
    after = await totals()
    result.server = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in SERVER_HISTOGRAMS}
    return result


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


async def bench(server: VllmServer, args: argparse.Namespace) -> list[tuple[int, Result, Result]]:
    adapter = args.adapter
    async with VllmAdmin(server.base_url) as admin:
        await admin.load_adapter(adapter, str(adapter_dirs()[adapter]))
    prompts = Prompts(seed=7, words=args.prompt_words)
    out: list[tuple[int, Result, Result]] = []
    async with (
        AsyncOpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=300) as client,
        aiohttp.ClientSession() as session,
    ):
        metrics_url = server.base_url + "/metrics"
        for model in (SERVED_MODEL_NAME, adapter):  # warm both paths up
            await run_round(client, session, metrics_url, model, 2, 2, args.max_tokens, prompts)
        for concurrency in args.concurrency:
            per_client = max(args.min_per_client, args.requests // concurrency)
            base, lora = Result(), Result()
            t0 = time.perf_counter()
            for i in range(args.rounds):
                # Alternate which goes first, so drift on a shared machine hits both alike.
                order = [(SERVED_MODEL_NAME, base), (adapter, lora)]
                for model, result in order if i % 2 == 0 else reversed(order):
                    result.rounds.append(
                        await run_round(
                            client, session, metrics_url, model, concurrency, per_client, args.max_tokens, prompts
                        )
                    )
            print(
                f"  concurrency {concurrency:>2}: {args.rounds} rounds x {concurrency * per_client} requests "
                f"per model in {time.perf_counter() - t0:.1f}s",
                file=sys.stderr,
            )
            out.append((concurrency, base, lora))
    return out


def _cells(base: float, lora: float, unit: str, scale: float = 1.0, digits: int = 1) -> list[str]:
    return [f"{base * scale:.{digits}f}{unit}", f"{lora * scale:.{digits}f}{unit}", f"{lora / base:.2f}"]


def table(results: list[tuple[int, Result, Result]], adapter: str) -> str:
    groups = [
        "TTFT p50 (client)",
        "TTFT p90 (client)",
        "output tok/s (client)",
        "TTFT mean (vLLM)",
        "prefill mean (engine)",
        "inter-token mean (engine)",
    ]
    rows: list[list[str]] = []
    for concurrency, base, lora in results:
        cells = [str(concurrency), str(len(base.ttfts))]
        cells += _cells(statistics.median(base.ttfts), statistics.median(lora.ttfts), " ms", 1000)
        cells += _cells(pct(base.ttfts, 90), pct(lora.ttfts, 90), " ms", 1000)
        cells += _cells(base.tokens_per_s, lora.tokens_per_s, "")
        cells += _cells(base.server_mean("ttft"), lora.server_mean("ttft"), " ms", 1000)
        cells += _cells(base.server_mean("prefill"), lora.server_mean("prefill"), " ms", 1000, 2)
        cells += _cells(base.server_mean("itl"), lora.server_mean("itl"), " ms", 1000, 2)
        rows.append(cells)
    sub = ["clients", "requests"] + ["base", adapter, "ratio"] * len(groups)
    widths = [max(len(sub[i]), *(len(r[i]) for r in rows)) for i in range(len(sub))]
    group_widths = [sum(widths[2 + 3 * g : 5 + 3 * g]) + 6 for g in range(len(groups))]
    group_widths = [max(w, len(name)) for w, name in zip(group_widths, groups, strict=True)]
    for g, w in enumerate(group_widths):  # widen the group's last column if its title is longer
        widths[4 + 3 * g] += w - (sum(widths[2 + 3 * g : 5 + 3 * g]) + 6)
    lead = sum(widths[:2]) + 3
    lines = [" " * lead + " | " + " | ".join(name.center(w) for name, w in zip(groups, group_widths, strict=True))]
    lines.append(" | ".join(h.rjust(w) for h, w in zip(sub, widths, strict=True)))
    lines.append("-" * len(lines[-1]))
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="alpha", choices=["alpha", "beta", "gamma", "wide"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per model per round")
    parser.add_argument("--min-per-client", type=int, default=2, help="requests per client per round, at least")
    parser.add_argument("--rounds", type=int, default=6, help="base and adapter rounds per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=48)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        log = Path(tmp) / "vllm.log"
        server = VllmServer(tiny_model_dir(), log, extra_args=["--no-enable-prefix-caching"])
        load_before = os.getloadavg()[0]
        print(f"starting vLLM (log {log}) ...", file=sys.stderr)
        t0 = time.perf_counter()
        server.start()
        print(f"  healthy after {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        try:
            results = asyncio.run(bench(server, args))
        finally:
            server.stop()
    load_after = os.getloadavg()[0]

    print(
        f"\nvLLM {SERVED_MODEL_NAME} (hidden 128, 2 layers, float32, CPU), adapter {args.adapter!r} "
        f"(rank {adapter_rank(args.adapter)}, q_proj+v_proj); streaming completions, {args.max_tokens} output tokens "
        f"each (ignore_eos), ~{args.prompt_words}-word prompts, prefix cache off.\n"
        "requests: per model, over all rounds. output tok/s: over all concurrent clients, median of the rounds.\n"
        "(client): measured by this script. (vLLM): vLLM's own TTFT histogram (API server clock). (engine): "
        "vLLM's histograms stamped in the engine core.\nratio: adapter / base. "
        f"Machine: {os.cpu_count()} CPUs, 1-minute load average {load_before:.2f} before, {load_after:.2f} after.\n"
    )
    print(table(results, args.adapter))


if __name__ == "__main__":
    main()
