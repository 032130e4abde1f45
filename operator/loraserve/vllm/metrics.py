"""vLLM's Prometheus metrics, parsed into the few numbers the operator and router use. Pure: no I/O.

What vLLM (0.32, V1 engine) exports and how it is read here:

- `vllm:num_requests_running` / `vllm:num_requests_waiting`: gauges labelled `engine` and `model_name`;
  summed over all samples (one per engine).
- `vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}`: a gauge whose *labels*
  carry comma-separated adapter names and whose *value* is the Unix time it was last set. Every label
  combination ever seen stays in the output, so the current state is the sample with the largest value.
  The two adapter labels list the adapters that have at least one request in flight (vLLM puts each such
  adapter in both, with its count, possibly zero, left out); they do not list adapters that are merely
  loaded: that is `/v1/models`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
LORA_INFO = "vllm:lora_requests_info"
# The starts of the lines of the three families read here: samples, and their HELP and TYPE comments. vLLM's
# /metrics is some 50 KB, mostly histograms: parsing all of it took 15 ms of CPU per replica at each autoscaler
# look, these lines alone 0.6 ms.
_READ_LINES = tuple(
    f"{comment}{name}{after}"
    for name in (RUNNING, WAITING, LORA_INFO)
    for comment in ("", "# HELP ", "# TYPE ")
    for after in "{ "
)


class MetricsParseError(ValueError):
    """The text is not Prometheus exposition format, or it lacks vLLM's request gauges."""


@dataclass(frozen=True)
class VllmMetrics:
    requests_running: int
    requests_waiting: int
    running_lora_adapters: frozenset[str] = field(default_factory=frozenset)
    waiting_lora_adapters: frozenset[str] = field(default_factory=frozenset)
    max_lora: int | None = None  # None: the server runs without --enable-lora (no lora_requests_info)

    @property
    def load(self) -> int:
        """Requests on the server: running plus waiting (what the autoscaler compares to its target)."""
        return self.requests_running + self.requests_waiting

    @property
    def active_lora_adapters(self) -> frozenset[str]:
        """Adapters with any request running or waiting."""
        return self.running_lora_adapters | self.waiting_lora_adapters


def _names(label: str) -> frozenset[str]:
    return frozenset(name for name in (part.strip() for part in label.split(",")) if name)


def _int(value: float, metric: str) -> int:
    if value != value or value < 0:  # NaN or negative
        raise MetricsParseError(f"{metric} has value {value}")
    return round(value)


def parse_metrics(text: str) -> VllmMetrics:
    """Parse the body of vLLM's /metrics. Raises MetricsParseError on text that is not a vLLM server's."""
    sums: dict[str, float] = {}
    lora_sample: dict[str, str] | None = None
    lora_time = float("-inf")
    try:
        read = "".join(f"{line}\n" for line in text.splitlines() if line.startswith(_READ_LINES))
        families: list[Metric] = list(text_string_to_metric_families(read))
    except ValueError as e:
        raise MetricsParseError(f"not Prometheus text: {e}") from e
    for family in families:
        for sample in family.samples:
            if sample.name in (RUNNING, WAITING):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
            elif sample.name == LORA_INFO and sample.value > lora_time:
                lora_time = sample.value
                lora_sample = dict(sample.labels)
    missing = [m for m in (RUNNING, WAITING) if m not in sums]
    if missing:
        raise MetricsParseError(f"no {' or '.join(missing)} in the metrics: is this a vLLM server?")
    max_lora: int | None = None
    running: frozenset[str] = frozenset()
    waiting: frozenset[str] = frozenset()
    if lora_sample is not None:
        running = _names(lora_sample.get("running_lora_adapters", ""))
        waiting = _names(lora_sample.get("waiting_lora_adapters", ""))
        raw_max = lora_sample.get("max_lora", "")
        try:
            max_lora = int(raw_max)
        except ValueError as e:
            raise MetricsParseError(f"{LORA_INFO} has max_lora={raw_max!r}") from e
    return VllmMetrics(
        requests_running=_int(sums[RUNNING], RUNNING),
        requests_waiting=_int(sums[WAITING], WAITING),
        running_lora_adapters=running,
        waiting_lora_adapters=waiting,
        max_lora=max_lora,
    )
