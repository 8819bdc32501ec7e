"""Served images/s: one 32-prompt request, one-prompt requests, clients at once, and `generate`.

A registered model's files, served by this checkout's pyfunc class as `mlflow models serve`
would, answer in this process (no HTTP, so the figures are the model's, not the web
server's; 32 one-prompt requests are what the model did before it batched a request).
`--clients` threads send the same prompts at once, split evenly, as concurrent clients of
one server process would.
Every figure is from the same run, so the ratios hold on any host; absolute times vary 2x
between hosts.

    python benchmarks/serving.py                            # models:/unclip@champion
    python benchmarks/serving.py --model models:/unclip/3 --prompts 32 --repeats 3
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")


def prompts(n: int) -> list[str]:
    cycle = itertools.cycle(itertools.product(("small", "large"), COLOURS, SHAPES))
    return [f"a {s} {c} {sh} on a white background" for s, c, sh in itertools.islice(cycle, n)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    import mlflow

    from dalle2.cli import _default_tracking_uri
    from dalle2.serving import MODELS, UnclipModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models:/unclip@champion")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, default=8)
    args = p.parse_args()
    mlflow.set_tracking_uri(args.tracking_uri or _default_tracking_uri())
    # this checkout's serving code over the model's files (a logged model carries the code
    # it was logged with, which may predate what is measured here)
    local = Path(mlflow.artifacts.download_artifacts(args.model))
    model = UnclipModel()
    model.load_context(SimpleNamespace(artifacts={MODELS: str(local / "artifacts" / MODELS)}))
    inner = model
    texts = prompts(args.prompts)
    frame = pd.DataFrame({"prompt": texts, "seed": range(len(texts))})
    model.predict(None, frame.iloc[:1])  # warm-up: first-call allocations and thread pools

    single = [frame.iloc[i : i + 1] for i in range(len(frame))]
    shares = [frame.iloc[i :: args.clients] for i in range(args.clients)]

    def clients() -> None:
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(lambda share: model.predict(None, share), shares))

    batched, rows, generate, concurrent = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so load drifts hit all four alike
        batched.append(timed(lambda: model.predict(None, frame)))
        one = [timed(lambda r=r: model.predict(None, r)) for r in single]
        rows.append(one)
        concurrent.append(timed(clients))
        generate.append(
            timed(
                lambda: inner.generate(
                    inner.clip,
                    inner.prior,
                    inner.decoder,
                    texts,
                    device=inner.device,
                    batch_size=len(texts),
                )
            )
        )
    n = len(texts)
    t_batched, t_generate = min(batched), min(generate)
    t_rows = min(sum(r) for r in rows)
    t_clients = min(concurrent)
    latencies = sorted(itertools.chain.from_iterable(rows))
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(f"model {args.model} on {inner.device}, {n} prompts, best of {args.repeats}")
    print("| how | seconds | images/s |")
    print("|---|---|---|")
    print(f"| one {n}-prompt request | {t_batched:.2f} | {n / t_batched:.2f} |")
    print(f"| {n} one-prompt requests | {t_rows:.2f} | {n / t_rows:.2f} |")
    print(
        f"| {args.clients} clients at once, {n} prompts split among them | {t_clients:.2f} "
        f"| {n / t_clients:.2f} |"
    )
    print(f"| dalle2 generate's batch (no start-up) | {t_generate:.2f} | {n / t_generate:.2f} |")
    print(
        f"one-prompt latency p50 {statistics.median(latencies):.3f} s, p95 {p95:.3f} s; "
        f"{n}-prompt request latency {t_batched:.2f} s"
    )
    print(
        f"ratios: {n} one-prompt requests / one {n}-prompt request = {t_rows / t_batched:.2f}x; "
        f"served batch throughput / generate's = {t_generate / t_batched:.2f}"
    )


if __name__ == "__main__":
    main()
