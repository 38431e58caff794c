"""What `GET /metrics` shows, in Prometheus' text format (prometheus-client): requests, tokens in
and out, queue depth, batch size, time to first token, and output tokens per second."""
from __future__ import annotations

import time
from collections import deque

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
        # When each recent token came; the rate is computed when scraped, not at every token (the
        # engine's thread counts 16 tokens a step at 16 clients). Bounded, for a server nobody
        # scrapes: 65,536 tokens in ten seconds is more than a CPU makes.
        self._recent: deque[float] = deque(maxlen=65536)
        self.rate.set_function(self._rate)

    def request(self, endpoint: str, status: int):
        self.requests.labels(endpoint, str(status)).inc()

    def prompt_tokens(self, n: int):
        self.prompt.inc(n)

    def token(self, first_after: float | None = None):
        """One token generated (the first of its request `first_after` seconds after arrival)."""
        self.generated.inc()
        if first_after is not None:
            self.ttft.observe(first_after)
        self._recent.append(time.monotonic())   # a deque's append and popleft are atomic

    def _rate(self) -> float:
        """Tokens a second over the last ten seconds (0 when none came)."""
        now = time.monotonic()
        while self._recent and self._recent[0] < now - 10:
            self._recent.popleft()
        n = len(self._recent)
        return n / max(now - self._recent[0], 1e-3) if n > 1 else 0.0

    def step(self, running: int, waiting: int):
        self.batch.set(running)
        self.queue.set(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
