#!/usr/bin/env python3
"""What a Prometheus scrape costs the data path: the forwarding rate with
nobody scraping against the same with a scraper, in the same invocation.

Configurations, each on a fresh lab and a fresh xdpguard (one queue, its
process pinned to CPU 1 as in forwarding.py), each offered forwarding.py's
sweep of 64-byte UDP loads:

  loop               --fast-path off: every frame through the AF_XDP loop,
                     whose worker shares CPU 1 with the scrape's Python
  loop+scrape 1/s    the same, GET /metrics once a second (Prometheus's
                     usual interval is 15-60 s: this is the hard case)
  loop+scrape 10/s   the same, ten times a second (stress)
  fast               the fast path on: UDP forwarded in XDP
  fast+scrape 1/s    the same, scraped once a second

Reported per configuration: the saturated forwarding rate, the scrapes done
and their median/worst latency. The figure to read is each scraped rate over
its unscraped twin.

Usage: bench/metrics_cost.py [--seconds-per-point S] [--json PATH]
(as root; builds and removes its own labs).
"""

from __future__ import annotations

import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import forwarding  # noqa: E402
import xgbench  # noqa: E402
from xgbench import lab  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Scraper:
    """GET the metrics every ``interval`` seconds on a thread, until stopped."""

    def __init__(self, url: str, interval: float) -> None:
        self.url, self.interval = url, interval
        self.latencies: list[float] = []
        self.lines = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=10) as r:
                body = r.read()
            self.latencies.append(time.perf_counter() - t0)
            self.lines = body.count(b"\n")
            self._stop.wait(self.interval)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)


CONFIGS = (
    ("loop", ("--fast-path", "off"), None),
    ("loop+scrape 1/s", ("--fast-path", "off"), 1.0),
    ("loop+scrape 10/s", ("--fast-path", "off"), 0.1),
    ("fast", (), None),
    ("fast+scrape 1/s", (), 1.0),
)


def main() -> int:
    ap = xgbench.arguments(__doc__, "metrics_cost")
    ap.add_argument("--seconds-per-point", type=float, default=1.0)
    args = xgbench.parse_as_root(ap)
    results = []
    ceiling = forwarding.generator_ceiling()
    for name, extra, interval in CONFIGS:
        port = free_port()
        with (
            tempfile.TemporaryDirectory() as tmp,
            lab(edge=False),
            xgbench.xdpguard(*extra, "--metrics", f"127.0.0.1:{port}", state_dir=Path(tmp)),
        ):
            scrapes: list[float] = []
            lines = 0
            if interval is None:
                points = forwarding.sweep(args.seconds_per_point, ceiling)
            else:
                with Scraper(f"http://127.0.0.1:{port}/metrics", interval) as scraper:
                    points = forwarding.sweep(args.seconds_per_point, ceiling)
                scrapes, lines = scraper.latencies, scraper.lines
            results.append(
                {
                    "name": name,
                    "scrape_interval": interval,
                    "saturated_pps": max(p["forwarded_pps"] for p in points),
                    "scrapes": len(scrapes),
                    "scrape_lines": lines,
                    "scrape_median_ms": statistics.median(scrapes) * 1e3 if scrapes else None,
                    "scrape_max_ms": max(scrapes) * 1e3 if scrapes else None,
                    "points": points,
                }
            )
    by = {r["name"]: r for r in results}
    ratios = {
        name: by[name]["saturated_pps"] / by[name.split("+")[0]]["saturated_pps"]
        for name in by
        if "+" in name
    }
    report = xgbench.report("metrics scrape cost, 64-byte UDP, one queue") | {
        "results": results,
        "scraped_over_unscraped": ratios,
    }
    xgbench.write_report(report, args.json)

    print(
        f"{'config':<18}{'saturated':>12}{'vs unscraped':>14}{'scrapes':>9}{'median':>9}{'max':>9}"
    )
    for r in results:
        ratio = f"{ratios[r['name']]:.3f}" if r["name"] in ratios else "-"
        med = f"{r['scrape_median_ms']:.1f} ms" if r["scrapes"] else "-"
        worst = f"{r['scrape_max_ms']:.1f} ms" if r["scrapes"] else "-"
        print(
            f"{r['name']:<18}{r['saturated_pps'] / 1e6:>9.3f} Mp{ratio:>14}"
            f"{r['scrapes']:>9}{med:>9}{worst:>9}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
