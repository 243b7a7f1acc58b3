"""Load test of ``diffrt serve`` on loopback: closed-loop clients at rising concurrency, then a soak run.

    python -m diffrt.bench.load_serve --out DIR [--device cpu|cuda] [--quick]

The server (``create_app``: the reference DiT, dynamic batching) runs under uvicorn in this process
on 127.0.0.1; nothing leaves the machine. **Closed loop**: at each concurrency C, C clients each send
``POST /v1/generate`` back to back (a new one as soon as the last answered) until ``--requests``
answers or ``--seconds`` have passed: throughput (answers / s), latency p50 / p90 / p99 (ms), errors
(non-200), and the mean model batch the server formed (``X-Diffrt-Batch-Size``). **Soak**: ``--soak``
requests at the top concurrency with a cheap request (2 steps); the process's resident memory
(VmRSS) is sampled every ``--soak-every`` answers, and the growth over the second half of the run
(after the allocator warmed up; a least-squares slope) is reported per 1000 requests: flat memory means ~0.
Writes ``<device>-<yyyymmdd>-serve-load.json`` through the harness (stamped rows).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from . import harness

log = logging.getLogger("diffrt.bench.load_serve")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving ``create_app(config)`` on a background thread (``with Server(config) as url``)."""

    def __init__(self, config):
        import uvicorn  # noqa: PLC0415

        from diffrt.serve import create_app  # noqa: PLC0415

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start within 60 s")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def rss_mib() -> float:
    """This process's resident memory (Linux /proc; NaN elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def closed_loop(url: str, body: dict, concurrency: int, requests: int, seconds: float,
                      on_answer=None) -> dict[str, Any]:
    """``concurrency`` clients, back to back, until ``requests`` answers or ``seconds``."""
    import httpx  # noqa: PLC0415

    latencies: list[float] = []
    batches: list[int] = []
    errors: dict[str, int] = {}
    issued = 0
    began = time.perf_counter()

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() - began < seconds:
            issued += 1
            start = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/generate", json={**body, "seed": issued})
                status = str(response.status_code)
            except httpx.HTTPError as error:
                status = type(error).__name__
            if status == "200":
                latencies.append(time.perf_counter() - start)
                batches.append(int(response.headers.get("x-diffrt-batch-size", 1)))
            else:
                errors[status] = errors.get(status, 0) + 1
            if on_answer is not None:
                on_answer(len(latencies) + sum(errors.values()))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    ms = sorted(1e3 * s for s in latencies)
    return {"concurrency": concurrency, "answered": len(latencies), "errors": errors, "seconds": elapsed,
            "throughput_per_s": len(latencies) / elapsed if elapsed else 0.0,
            "latency_ms": {"p50": harness.quantile(ms, 0.5), "p90": harness.quantile(ms, 0.9),
                           "p99": harness.quantile(ms, 0.99)},
            "mean_batch": sum(batches) / len(batches) if batches else None}


def soak(url: str, body: dict, concurrency: int, requests: int, every: int) -> dict[str, Any]:
    samples: list[tuple[int, float]] = [(0, rss_mib())]

    def on_answer(count: int) -> None:
        if count % every == 0:
            samples.append((count, rss_mib()))

    result = asyncio.run(closed_loop(url, body, concurrency, requests, float("inf"), on_answer))
    samples.append((result["answered"] + sum(result["errors"].values()), rss_mib()))
    half = [s for s in samples if s[0] >= samples[-1][0] / 2]
    growth = _slope(half) * 1000 if len(half) > 2 else None
    return {**result, "phase": "soak", "rss_mib": samples, "rss_growth_mib_per_1000_second_half": growth,
            "rss_start_mib": samples[0][1], "rss_end_mib": samples[-1][1],
            "rss_max_mib": max(s[1] for s in samples)}


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (requests, MiB): robust to the allocator's ups and downs between samples."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffrt.bench.load_serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="digits-dit")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--requests", type=int, default=200, help="answers per concurrency level at most")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds per concurrency level at most")
    parser.add_argument("--soak", type=int, default=3000, help="soak requests (0: none)")
    parser.add_argument("--soak-every", type=int, default=250)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 levels, 12 answers, soak 40")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests, args.soak, args.soak_every, args.steps = "1,4", 12, 40, 10, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    from diffrt.serve import ServeConfig  # noqa: PLC0415

    levels = [int(c) for c in args.concurrency.split(",")]
    config = ServeConfig(models=(args.model,), device=args.device, max_batch=args.max_batch,
                         max_wait_ms=args.max_wait_ms, max_queue=max(64, 4 * max(levels)))
    body = {"model": args.model, "class_label": 3, "steps": args.steps, "output": "latents"}
    rows = []
    with Server(config) as url:
        asyncio.run(closed_loop(url, body, 1, 2, 60.0))  # warm-up: the model loads, the plan is built
        for level in levels:
            row = {"phase": "closed-loop", "model": args.model, "steps": args.steps,
                   **asyncio.run(closed_loop(url, body, level, args.requests, args.seconds))}
            log.info("concurrency %d: %.1f answers/s, p50 %.1f ms, p99 %.1f ms, errors %s, mean batch %s", level,
                     row["throughput_per_s"], row["latency_ms"]["p50"], row["latency_ms"]["p99"], row["errors"],
                     row["mean_batch"])
            rows.append(row)
        if args.soak:
            row = {"model": args.model, "steps": 2,
                   **soak(url, {**body, "steps": 2}, max(levels), args.soak, args.soak_every)}
            log.info("soak: %d answers, RSS %.0f -> %.0f MiB (max %.0f), second-half growth %s MiB / 1000 requests",
                     row["answered"], row["rss_start_mib"], row["rss_end_mib"], row["rss_max_mib"],
                     row["rss_growth_mib_per_1000_second_half"])
            rows.append(row)
    stamp = harness.environment_stamp(args.device)
    columns = [("phase", lambda r: r["phase"]), ("C", lambda r: r["concurrency"]), ("answered", lambda r: r["answered"]),
               ("req/s", lambda r: r["throughput_per_s"]), ("p50 ms", lambda r: r["latency_ms"]["p50"]),
               ("p99 ms", lambda r: r["latency_ms"]["p99"]), ("errors", lambda r: sum(r["errors"].values())),
               ("mean batch", lambda r: r["mean_batch"]),
               ("RSS growth MiB/1k", lambda r: r.get("rss_growth_mib_per_1000_second_half"))]
    print(harness.format_table(rows, columns))
    path = harness.write_results(args.out, "serve-load", rows, stamp,
                                 extra={"args": {k: v for k, v in vars(args).items() if k != "out"}})
    print(f"wrote {path}")
    return 0 if all(not r["errors"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
