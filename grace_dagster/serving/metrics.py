"""Prometheus counters of the embedded server (`/metrics`), in the text exposition format."""

import threading
from collections import defaultdict

HELP = {
    "grace_server_requests_total": "HTTP requests served, by route and status code.",
    "grace_server_errors_total": "Requests that ended in an error response, by route and status code.",
    "grace_server_prompt_tokens_total": "Prompt tokens received.",
    "grace_server_generation_tokens_total": "Tokens generated, also for requests whose client left before the answer.",
    "grace_server_tokens_evaluated_total": "Tokens the engine evaluated (a prefix reused from its cache counts once).",
    "grace_server_logits_rows_total": "Logits rows the engine computed (scored positions, sampled tokens).",
    "grace_server_abandoned_total": "Requests cancelled because their client disconnected before the answer was ready.",
}


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        with self._lock:
            self._counters[(name, tuple(sorted(labels.items())))] += amount

    def render(self, gauges: dict[str, float]) -> str:
        with self._lock:
            counters = dict(self._counters)
        counters.update({(name, ()): value for name, value in gauges.items()})
        lines = []
        for name in sorted({name for name, _ in counters}):
            lines.append(f"# HELP {name} {HELP.get(name, name)}")
            lines.append(f"# TYPE {name} counter")
            for (metric, labels), value in sorted(counters.items()):
                if metric == name:
                    label_text = ",".join(f'{k}="{v}"' for k, v in labels)
                    lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")
        return "\n".join(lines) + "\n"
