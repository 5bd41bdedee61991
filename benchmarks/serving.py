"""Serving latency: requests arriving over time (a Poisson process) into a session, per pipeline.

    python benchmarks/serving.py [--configs ar eagle3] [--rates 20 60] [--requests 48]
        [--batch 8] [--max-new-tokens 64] [--temperature 0] [--seed 0] [--http] [--plot PNG]

``--requests`` code prompts arrive at ``--rates`` requests per second (exponential gaps from
``--seed``: the same arrival times for every pipeline); before each step the session takes every
request whose time has come (:class:`dspark.Session`: continuous batching over ``--batch``
slots). Per request: time to first token (from its arrival), time per output token after the
first, and latency (arrival to end); per run: throughput (tokens ÷ the time from the first
arrival to the last end). Prints medians and 90th percentiles. One run per cell, pipelines in
turn at each rate (a serving run is long enough that its own requests average the noise).

``--http`` also serves the same arrivals through the OpenAI-compatible server
(:class:`dspark.serving.OpenAIServer` on a free local port): a client thread per request, started
at its arrival in a process of its own, streams a completion; its first token is the first chunk
with text, its end the ``[DONE]``. The difference to the session's own numbers is what HTTP, JSON,
text decoding and the server's threads cost (the client process shares this machine's cores).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import random
import statistics
import threading
import time

import dspark
from dspark.bench.runner import load_prompts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def serve(pipe, prompts: list, arrivals: list[float], max_new_tokens: int, temperature: float) -> dict:
    """Submit each prompt once its arrival time has passed, step until all are done."""
    session = pipe.session(max_len=max(len(p) for p in pipe.encode(prompts)) + max_new_tokens + pipe.drafter.gamma + 1)
    start, submitted, arrived_at = time.perf_counter(), 0, []
    while submitted < len(prompts) or session.unfinished:
        now = time.perf_counter() - start
        while submitted < len(prompts) and arrivals[submitted] <= now:
            session.submit(prompts[submitted], max_new_tokens=max_new_tokens, temperature=temperature, seed=submitted,
                           ignore_eos=True)
            arrived_at.append(arrivals[submitted] + (start - session.batch.started))  # on the session's clock
            submitted += 1
        if not session.unfinished:  # idle until the next arrival
            time.sleep(max(0.0, arrivals[submitted] - (time.perf_counter() - start)))
            continue
        session.step()
    stats = [session.result(i).stats for i in range(len(prompts))]
    return summarize([(s["first_token_s"], s["finished_s"], s["generated"]) for s in stats], arrived_at)


def summarize(timings: list[tuple[float, float, int]], arrivals: list[float]) -> dict:
    """Per request (first token, end, tokens) and its arrival, on one clock → time to first token,
    latency and time per output token after the first, per request; throughput over the run."""
    ttft = [first - a for (first, _, _), a in zip(timings, arrivals)]
    latency = [end - a for (_, end, _), a in zip(timings, arrivals)]
    per_token = [(end - first) / max(1, tokens - 1) for first, end, tokens in timings]
    makespan = max(end for _, end, _ in timings) - min(arrivals)
    return dict(ttft=ttft, latency=latency, per_token=per_token, throughput=sum(t for _, _, t in timings) / makespan)


def serve_http(pipe, prompts: list, arrivals: list[float], max_new_tokens: int, temperature: float) -> dict:
    """The same arrivals as :func:`serve`, each a streaming client of an :class:`OpenAIServer`; the
    clients run in a process of their own (as they would on other machines)."""
    from dspark.serving import OpenAIServer

    max_len = max(len(p) for p in pipe.encode(prompts)) + max_new_tokens + pipe.drafter.gamma + 1
    with OpenAIServer(pipe, max_len=max_len, port=0) as server:
        results = multiprocessing.get_context("fork").Queue()
        clients = multiprocessing.get_context("fork").Process(target=_clients, args=(
            server.httpd.server_address[:2], prompts, arrivals, max_new_tokens, temperature, results))
        clients.start()
        timings = results.get()  # request → (first text, end, tokens), seconds since the first arrival
        clients.join()
    return summarize(timings, arrivals)


def _clients(address, prompts: list, arrivals: list[float], max_new_tokens: int, temperature: float, results) -> None:
    """A thread per request, started at its arrival, streaming a completion (in the client process)."""
    timings: dict[int, tuple[float, float, int]] = {}

    def client(i: int) -> None:
        connection = http.client.HTTPConnection(*address, timeout=600)
        connection.request("POST", "/v1/completions", body=json.dumps(
            {"prompt": prompts[i], "max_tokens": max_new_tokens, "temperature": temperature, "seed": i,
             "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}),
            headers={"Content-Type": "application/json"})
        response, first, tokens = connection.getresponse(), None, 0
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and any(c["text"] for c in event["choices"]):
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        timings[i] = (first, time.perf_counter() - start, tokens)
        connection.close()

    start, threads = time.perf_counter(), []
    for i, arrival in enumerate(arrivals):
        time.sleep(max(0.0, arrival - (time.perf_counter() - start)))
        threads.append(threading.Thread(target=client, args=(i,)))
        threads[-1].start()
    for thread in threads:
        thread.join()
    results.put([timings[i] for i in range(len(arrivals))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["ar", "eagle3"])
    parser.add_argument("--rates", type=float, nargs="+", default=[20.0, 60.0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--http", action="store_true", help="also through the OpenAI-compatible HTTP server")
    parser.add_argument("--plot", help="draw time to first token, per output token and latency against the rate")
    args = parser.parse_args()

    pipes = {name: dspark.build_pipeline(f"configs/{name}.yaml", overrides=[
        "target.device=cpu", "target.dtype=float32", f"engine.max_batch_size={args.batch}"]) for name in args.configs}
    prompts = load_prompts("code", next(iter(pipes.values())).tokenizer, args.requests)
    for pipe in pipes.values():  # warm-up
        serve(pipe, prompts[:args.batch], [0.0] * args.batch, 8, args.temperature)
    medians: dict[tuple[str, str], dict[str, list[float]]] = {}  # (config, way) → metric → one per rate
    for rate in args.rates:
        gaps = random.Random(args.seed).expovariate
        arrivals, t = [], 0.0
        for _ in prompts:
            arrivals.append(t)
            t += gaps(rate)
        for name, pipe in pipes.items():
            for way, run in (("session", serve), *((("http", serve_http),) if args.http else ())):
                r = run(pipe, prompts, arrivals, args.max_new_tokens, args.temperature)
                for key in ("ttft", "per_token", "latency"):
                    medians.setdefault((name, way), {}).setdefault(key, []).append(1e3 * statistics.median(r[key]))
                cells = "; ".join(f"{key} median {1e3 * statistics.median(r[key]):.0f} ms, "
                                  f"p90 {1e3 * percentile(r[key], 0.9):.0f} ms" for key in ("ttft", "per_token", "latency"))
                print(f"rate {rate:g}/s, {name}{', over HTTP' if way == 'http' else ''}: {r['throughput']:.0f} tokens/s; "
                      f"{cells}", flush=True)
    if args.plot:
        plot(args.plot, args.rates, medians)


def plot(path: str, rates: list[float], medians: dict) -> None:
    """One panel per metric: its median against the arrival rate, a line per pipeline and way."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"ttft": "time to first token", "per_token": "per output token", "latency": "latency"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, title) in zip(axes, titles.items()):
        for (name, way), values in medians.items():
            ax.plot(rates, values[key], marker="o", linestyle="-" if way == "session" else "--",
                    label=f"{name}{' over HTTP' if way == 'http' else ''}")
        ax.set(title=f"{title} (median)", xlabel="arrivals per second", ylabel="ms", xscale="log", yscale="log")
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
