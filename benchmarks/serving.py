"""Served images/s: one 32-prompt request, one-prompt requests, clients at once, and `generate`.

By default a registered model's files, served by this checkout's pyfunc class as `mlflow
models serve` would, answer in this process (no HTTP: the figures are the model's, not the
web server's). `--http` saves the same files with this checkout's code as an MLflow model,
starts `mlflow models serve` on it and sends the same requests over loopback HTTP, as
users' clients do. 32 one-prompt requests are what the model did before it batched a
request; `--clients` threads send the same prompts at once, split evenly, as concurrent
clients of one server process would. Latencies are per request.
Every figure is from the same run, so the ratios hold on any host; absolute times vary 2x
between hosts.

    python benchmarks/serving.py                            # models:/unclip@champion
    python benchmarks/serving.py --model models:/unclip/3 --prompts 32 --repeats 3
    python benchmarks/serving.py --http                     # through `mlflow models serve`
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]


@contextlib.contextmanager
def http_server(model: Path) -> Iterator[Callable[[pd.DataFrame], None]]:
    """`mlflow models serve` of a saved model folder on loopback; yields a sender that POSTs
    a frame and checks that every row came back as an image."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = Path(sys.executable).parent  # mlflow starts uvicorn from PATH
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", str(model), "--env-manager", "local"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"

    def send(frame: pd.DataFrame) -> None:
        body = json.dumps({"dataframe_records": frame.to_dict(orient="records")}).encode()
        req = urllib.request.Request(
            f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=600) as reply:
            images = json.loads(reply.read())["predictions"]
        if len(images) != len(frame):
            raise SystemExit(f"the server answered {len(images)} images for {len(frame)} rows")

    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    urllib.request.urlopen(f"{url}/ping", timeout=5).close()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        err = log.read().decode(errors="replace")[-2000:]
                        msg = f"`mlflow models serve` did not come up on {url}:\n{err}"
                        raise SystemExit(msg) from None
                    time.sleep(1)
            yield send
        finally:
            server.terminate()
            server.wait(timeout=60)


def main() -> None:
    import mlflow

    from dalle2.edges.runs import default_tracking_uri
    from dalle2.edges.serving import MODELS, UnclipModel, model_spec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models:/unclip@champion")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--http", action="store_true", help="through `mlflow models serve`")
    args = p.parse_args()
    mlflow.set_tracking_uri(args.tracking_uri or default_tracking_uri())
    # this checkout's serving code over the model's files, in-process and over HTTP (a logged
    # model carries the code it was logged with, which may predate what is measured here)
    local = Path(mlflow.artifacts.download_artifacts(args.model))
    model = UnclipModel()
    model.load_context(SimpleNamespace(artifacts={MODELS: str(local / "artifacts" / MODELS)}))
    texts = prompts(args.prompts)
    frame = pd.DataFrame({"prompt": texts, "seed": range(len(texts))})
    with contextlib.ExitStack() as stack:
        if args.http:  # the same files with this checkout's code, saved where the server reads
            saved = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "model"
            mlflow.pyfunc.save_model(saved, **model_spec(local / "artifacts" / MODELS))
            send = stack.enter_context(http_server(saved))
        else:

            def send(part: pd.DataFrame) -> None:
                model.predict(None, part)

        measure(args, model, frame, send)


def measure(args: argparse.Namespace, model, frame: pd.DataFrame, send) -> None:
    """Interleaved repeats of each way to ask for the prompts (so load drifts hit all alike);
    the best repeat's time per way, and every request's latency."""
    texts = list(frame["prompt"])
    n = len(texts)
    send(frame.iloc[:1])  # warm-up: first-call allocations and thread pools
    single = [frame.iloc[i : i + 1] for i in range(n)]
    shares = [frame.iloc[i :: args.clients] for i in range(args.clients)]
    ways = {
        f"one {n}-prompt request": [],
        f"{n} one-prompt requests": [],
        f"{args.clients} clients at once, {n} prompts split among them": [],
        "dalle2 generate's batch (no start-up)": [],
    }
    waits = {name: [] for name in ways}
    batch, rows, clients, generate = ways

    def request(name: str, part: pd.DataFrame) -> None:
        waits[name].append(timed(lambda: send(part)))

    def at_once() -> None:
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(lambda share: request(clients, share), shares))

    def draw() -> None:  # on the thread that loaded the weights, as `dalle2 generate` runs
        model.sampler.submit(model.unclip.generate, texts, batch_size=n).result()

    draw()  # warm-up of this process's copy (with --http, the server's is another)
    for _ in range(args.repeats):
        ways[batch].append(timed(lambda: request(batch, frame)))
        ways[rows].append(timed(lambda: [request(rows, r) for r in single]))
        ways[clients].append(timed(at_once))
        ways[generate].append(timed(draw))
    how = "over HTTP (`mlflow models serve`)" if args.http else "in-process"
    where = model.unclip.device
    print(f"model {args.model} on {where}, {how}, {n} prompts, best of {args.repeats}")
    print("| how | seconds | images/s | request p50 s | request p95 s |")
    print("|---|---|---|---|---|")
    for name, times in ways.items():
        best = min(times)
        lat = waits[name] or times
        p50, p95 = statistics.median(lat), percentile(lat, 0.95)
        print(f"| {name} | {best:.2f} | {n / best:.2f} | {p50:.3f} | {p95:.3f} |")
    t_batch, t_rows, t_generate = min(ways[batch]), min(ways[rows]), min(ways[generate])
    print(
        f"ratios: {n} one-prompt requests / one {n}-prompt request = {t_rows / t_batch:.2f}x; "
        f"served batch throughput / generate's = {t_generate / t_batch:.2f}; "
        f"clients at once / one {n}-prompt request = {min(ways[clients]) / t_batch:.2f}x"
    )


if __name__ == "__main__":
    main()
