"""GET /metrics: Prometheus figures of one server (its own registry, so apps in one process do not
collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, scheduler, max_batch: int):
        self.registry = r = CollectorRegistry()
        self.scheduler = scheduler
        self.requests = Counter("dsv3_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("dsv3_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.completion_tokens = Counter("dsv3_completion_tokens", "Tokens generated", registry=r)
        self.finished = Counter("dsv3_sequences_finished", "Sequences finished, by reason", ["reason"], registry=r)
        running = Gauge("dsv3_running_sequences", "Sequences in the decode batch (cache slots in use)", registry=r)
        running.set_function(lambda: len(scheduler.running) + len(scheduler.prefilling))
        waiting = Gauge("dsv3_waiting_sequences", "Requests queued for a slot", registry=r)
        waiting.set_function(lambda: len(scheduler.waiting))
        self.batch_size = Histogram("dsv3_batch_size", "Sequences per decode step",
                                    buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.ttft = Histogram("dsv3_time_to_first_token_seconds", "Submit to first token, per request",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("dsv3_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        scheduler.on_step = self.batch_size.observe  # each decode step's batch size, as it runs

    def render(self) -> bytes:
        return generate_latest(self.registry)
