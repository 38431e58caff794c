"""What `GET /metrics` shows, in Prometheus' text format (prometheus-client): requests, tokens in
and out, queue depth, batch size, time to first token, and output tokens per second."""
from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()   # one per server: tests run several in a process
        self.requests = Counter("llamaforge_requests", "HTTP requests to the API", ["endpoint", "status"], registry=r)
        self.prompt = Counter("llamaforge_prompt_tokens", "prompt tokens received", registry=r)
        self.generated = Counter("llamaforge_generation_tokens", "tokens generated", registry=r)
        self.queue = Gauge("llamaforge_queue_depth", "requests waiting for a slot", registry=r)
        self.batch = Gauge("llamaforge_batch_size", "sequences running", registry=r)
        self.ttft = Histogram("llamaforge_time_to_first_token_seconds", "from arrival to the first token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=r)
        self.rate = Gauge("llamaforge_generation_tokens_per_second", "output tokens per second, over the last "
                          "ten seconds", registry=r)
        self._lock = threading.Lock()
        self._recent: list[tuple[float, int]] = []

    def request(self, endpoint: str, status: int):
        self.requests.labels(endpoint, str(status)).inc()

    def prompt_tokens(self, n: int):
        self.prompt.inc(n)

    def token(self, first_after: float | None = None):
        """One token generated (the first of its request `first_after` seconds after arrival)."""
        self.generated.inc()
        if first_after is not None:
            self.ttft.observe(first_after)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, 1))
            while self._recent and self._recent[0][0] < now - 10:
                self._recent.pop(0)
            span = max(now - self._recent[0][0], 1e-3) if len(self._recent) > 1 else None
            if span:
                self.rate.set(len(self._recent) / span)

    def step(self, running: int, waiting: int):
        self.batch.set(running)
        self.queue.set(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
