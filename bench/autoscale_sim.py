"""Replay a seeded, bursty, day-long request trace through autoscaling policies and compare them.

Run by hand (prints, asserts nothing):

    .venv/bin/python bench/autoscale_sim.py                 # one seed, default windows
    .venv/bin/python bench/autoscale_sim.py --tune          # + KPA with its zero grace tuned to our GPU-seconds
    .venv/bin/python bench/autoscale_sim.py --seeds 5 --tune

Policies:
  ours   loraserve.autoscale.ScalingPolicy, by default with the spec defaults (up 30s, down 10m, zero 1h; change
         them with --up/--down/--zero), ticking every 2s, woken at once by the router when a request arrives at
         zero replicas.
  fixed  maxReplicas replicas all day, always warm.
  kpa    Knative-KPA-style: stable window 60s and panic window 6s (10%) of average concurrency, panic when the
         panic-window demand is >= 2x the ready pods (no scale-down while panicking, panic ends a stable window
         after the last over-threshold tick), max scale-down rate 2 per tick, max scale-up rate 1000, 2s tick,
         target utilization 100% (the same target per replica as ours), scale to zero once the stable-window
         demand has been 0 for `grace` seconds (scale-to-zero-grace-period, default 30s), activator wakes at once.

Serving model: a replica becomes ready `--startup` seconds after it is asked for and holds `--slots` concurrent
requests; beyond that requests queue (FIFO). GPU-seconds bill every replica asked for, starting or ready.
The "1st repl" column is the GPU-seconds of the first replica (what the idle timeout costs), "extra" the rest
(what scale-up and the scale-down delay cost). A cold start is a request that arrives while the deployment is
at zero replicas (it triggers a wake); "at 0 ready" also counts the requests that arrive while that first
replica is still starting.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from loraserve.autoscale import ScalingPolicy, ScalingSettings
from loraserve.durations import parse_window

DAY = 86400.0
TICK = 2.0


# ---- trace ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    arrival: float
    duration: float


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:  # normal approximation, never reached by the default trace
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def make_trace(seed: int) -> tuple[list[Request], str]:
    """A working day: sparse night pings, a diurnal base rate, two idle gaps of hours, bursts."""
    rng = random.Random(seed)

    def base_rate(t: float) -> float:
        h = t / 3600
        if 7 <= h < 22:
            return 0.05 + 0.55 * math.sin(math.pi * (h - 7) / 15) ** 2
        return 1 / 5400  # a stray request every ~90 minutes at night

    gaps: list[tuple[float, float]] = []
    while len(gaps) < 2:
        start = rng.uniform(8, 19) * 3600
        length = rng.uniform(1.5, 3.0) * 3600
        if all(start > b + 1800 or start + length + 1800 < a for a, b in gaps):
            gaps.append((start, start + length))
    bursts: list[tuple[float, float, float]] = []
    for _ in range(12):
        start = rng.uniform(7, 23) * 3600
        bursts.append((start, start + rng.uniform(60, 600), rng.uniform(1.5, 4.0)))

    requests: list[Request] = []
    for second in range(int(DAY)):
        t = float(second)
        if any(a <= t < b for a, b in gaps):
            continue
        rate = base_rate(t) + sum(r for a, b, r in bursts if a <= t < b)
        for _ in range(_poisson(rng, rate)):
            duration = min(180.0, max(0.5, rng.lognormvariate(math.log(8.0), 0.8)))
            requests.append(Request(t + rng.random(), duration))
    requests.sort(key=lambda r: r.arrival)
    desc = (
        f"{len(requests)} requests; idle gaps "
        + ", ".join(f"{a / 3600:.1f}h-{b / 3600:.1f}h" for a, b in sorted(gaps))
        + f"; {len(bursts)} bursts of 1-10 min at +1.5-4 req/s; night 22h-7h ~1 req/90 min"
    )
    return requests, desc


# ---- scalers -------------------------------------------------------------------------------------------


class Scaler(Protocol):
    name: str

    def tick(self, now: float, load: float, arrivals: int, current: int, ready: int) -> int: ...

    def wake(self, now: float, current: int) -> int: ...


class Ours:
    def __init__(self, settings: ScalingSettings) -> None:
        self.name = "ours"
        self.policy = ScalingPolicy(settings, created_at=0.0)

    def tick(self, now: float, load: float, arrivals: int, current: int, ready: int) -> int:
        self.policy.observe(now, load, arrivals)
        return self.policy.desired(now, current).replicas

    def wake(self, now: float, current: int) -> int:
        self.policy.record_request(now)
        return self.policy.desired(now, current).replicas


class Fixed:
    def __init__(self, replicas: int) -> None:
        self.name = "fixed"
        self.replicas = replicas

    def tick(self, now: float, load: float, arrivals: int, current: int, ready: int) -> int:
        return self.replicas

    def wake(self, now: float, current: int) -> int:
        return self.replicas


@dataclass
class Kpa:
    min_replicas: int
    max_replicas: int
    target: float
    grace: float = 30.0
    stable_window: float = 60.0
    panic_window: float = 6.0
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    name: str = "kpa"
    _samples: deque[tuple[float, float]] = field(default_factory=deque)
    _panic_time: float | None = None
    _max_panic_pods: int = 0
    _zero_since: float | None = None

    def _avg(self, now: float, window: float) -> float:
        values = [v for t, v in self._samples if t > now - window]
        return sum(values) / len(values) if values else 0.0

    def tick(self, now: float, load: float, arrivals: int, current: int, ready: int) -> int:
        self._samples.append((now, load))
        while self._samples and self._samples[0][0] <= now - self.stable_window:
            self._samples.popleft()
        ready_pods = max(1.0, float(ready))
        max_up = math.ceil(self.max_scale_up_rate * ready_pods)
        max_down = math.floor(ready_pods / self.max_scale_down_rate)
        dspc = math.ceil(self._avg(now, self.stable_window) / self.target)
        dppc = math.ceil(self._avg(now, self.panic_window) / self.target)
        stable_pods = min(max(dspc, max_down), max_up)
        panic_pods = min(max(dppc, max_down), max_up)
        over = dppc / ready_pods >= self.panic_threshold
        if over:
            self._panic_time = now
        elif self._panic_time is not None and now > self._panic_time + self.stable_window:
            self._panic_time, self._max_panic_pods = None, 0
        desired = stable_pods
        if self._panic_time is not None:
            desired = max(desired, panic_pods, self._max_panic_pods)
            self._max_panic_pods = desired
        desired = min(max(desired, self.min_replicas), self.max_replicas)
        if desired == 0 and current > 0:
            # scale-to-zero-grace-period: the last replica goes only after `grace` of zero demand
            if self._zero_since is None:
                self._zero_since = now
            if now - self._zero_since < self.grace:
                return 1
            return 0
        if desired > 0:
            self._zero_since = None
        return desired

    def wake(self, now: float, current: int) -> int:
        self._zero_since = None
        return max(current, 1)


# ---- serving model -------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    gpu_seconds: float = 0.0
    gpu_first: float = 0.0  # of which: the first replica (the idle-timeout cost)
    cold_starts: int = 0
    at_zero_ready: int = 0
    waited: int = 0
    served: int = 0
    waits: list[float] = field(default_factory=list)
    scale_changes: int = 0

    def wait_quantile(self, q: float) -> float:
        if not self.waits:
            return 0.0
        ordered = sorted(self.waits)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Config:
    max_replicas: int = 4
    min_replicas: int = 0
    target: int = 8
    slots: int = 16
    startup: float = 90.0
    accelerators: int = 1


_DONE, _READY, _ARRIVAL, _TICK = 0, 1, 2, 3  # same-instant order: free slots, add capacity, then arrive, tick


def simulate(trace: list[Request], scaler: Scaler, cfg: Config, initial: int = 1) -> Result:
    res = Result(scaler.name)
    events: list[tuple[float, int, int, float]] = []
    for i, req in enumerate(trace):
        events.append((req.arrival, _ARRIVAL, i, req.duration))
    t = 0.0
    while t < DAY:
        events.append((t, _TICK, 0, 0.0))
        t += TICK
    heapq.heapify(events)

    requested, ready = initial, initial
    starting: dict[int, float] = {}  # replica id -> ready time
    next_id = 0
    queue: deque[tuple[float, float]] = deque()
    in_flight = 0
    arrivals = 0
    last_t = 0.0

    def apply(now: float, want: int) -> None:
        nonlocal requested, ready, next_id
        if want != requested:
            res.scale_changes += 1
        while requested < want:
            starting[next_id] = now + cfg.startup
            heapq.heappush(events, (now + cfg.startup, _READY, next_id, 0.0))
            next_id += 1
            requested += 1
        while requested > want:
            if starting:  # drop the replica with the least progress first
                victim = max(starting, key=lambda k: starting[k])
                del starting[victim]
            else:
                ready -= 1
            requested -= 1

    def start_waiting(now: float) -> None:
        nonlocal in_flight
        while queue and in_flight < ready * cfg.slots:
            arrival, duration = queue.popleft()
            in_flight += 1
            wait = now - arrival
            if wait > 0:
                res.waited += 1
                res.waits.append(wait)
            res.served += 1
            heapq.heappush(events, (now + duration, _DONE, 0, 0.0))

    while events:
        now, kind, ident, duration = heapq.heappop(events)
        if now >= DAY:
            break
        res.gpu_seconds += (now - last_t) * requested * cfg.accelerators
        res.gpu_first += (now - last_t) * min(requested, 1) * cfg.accelerators
        last_t = now
        if kind == _DONE:
            in_flight -= 1
            start_waiting(now)
        elif kind == _READY:
            if ident in starting:
                del starting[ident]
                ready += 1
                start_waiting(now)
        elif kind == _ARRIVAL:
            arrivals += 1
            if requested == 0:
                res.cold_starts += 1
                apply(now, scaler.wake(now, 0))
            if ready == 0:
                res.at_zero_ready += 1
            queue.append((now, duration))
            start_waiting(now)
        else:
            apply(now, scaler.tick(now, in_flight + len(queue), arrivals, requested, ready))
            arrivals = 0
            start_waiting(now)
    res.gpu_seconds += (DAY - last_t) * requested * cfg.accelerators
    res.gpu_first += (DAY - last_t) * min(requested, 1) * cfg.accelerators
    return res


# ---- reporting -----------------------------------------------------------------------------------------


def table(results: list[Result], fixed: Result) -> str:
    head = (
        f"{'policy':<22}{'GPU-s':>10}{'1st repl':>10}{'extra':>9}{'vs fixed':>10}{'cold starts':>13}{'at 0 ready':>12}"
        f"{'waited':>9}{'waited %':>10}{'p99 wait s':>12}{'max wait s':>12}{'changes':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        ratio = r.gpu_seconds / fixed.gpu_seconds if fixed.gpu_seconds else float("nan")
        pct = 100 * r.waited / r.served if r.served else 0.0
        lines.append(
            f"{r.name:<22}{r.gpu_seconds:>10.0f}{r.gpu_first:>10.0f}{r.gpu_seconds - r.gpu_first:>9.0f}"
            f"{ratio:>10.3f}{r.cold_starts:>13}{r.at_zero_ready:>12}"
            f"{r.waited:>9}{pct:>9.2f}%{r.wait_quantile(0.99):>12.1f}{max(r.waits, default=0.0):>12.1f}"
            f"{r.scale_changes:>9}"
        )
    return "\n".join(lines)


def tune_grace(trace: list[Request], cfg: Config, goal: float, make: Callable[[float], Kpa]) -> tuple[float, Result]:
    """Bisect the KPA zero grace until its GPU-seconds match `goal` (they grow with the grace).

    If even a grace longer than any idle gap of the day (6h: it never goes to zero) stays below `goal`, that
    run is returned: KPA cannot spend as much as we do by idling longer.
    """
    lo, hi = 0.0, 6 * 3600.0
    best = simulate(trace, make(hi), cfg)
    if best.gpu_seconds < goal:
        return hi, best
    best_grace = hi
    for _ in range(18):
        mid = (lo + hi) / 2
        r = simulate(trace, make(mid), cfg)
        if abs(r.gpu_seconds - goal) < abs(best.gpu_seconds - goal):
            best, best_grace = r, mid
        if r.gpu_seconds < goal:
            lo = mid
        else:
            hi = mid
        if abs(r.gpu_seconds - goal) <= 0.002 * goal:
            break
    return best_grace, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=1, help="run seeds seed..seed+N-1 and print a summary")
    ap.add_argument("--tune", action="store_true", help="tune KPA's zero grace to our GPU-seconds")
    ap.add_argument("--max-replicas", type=int, default=4)
    ap.add_argument("--target", type=int, default=8)
    ap.add_argument("--slots", type=int, default=16, help="concurrent requests one replica serves")
    ap.add_argument("--startup", type=float, default=90.0, help="seconds from asking for a replica to ready")
    ap.add_argument("--up", default="30s", help="our scaleUpWindow (Go duration)")
    ap.add_argument("--down", default="10m", help="our scaleDownWindow (Go duration)")
    ap.add_argument("--zero", default="1h", help="our scaleToZeroWindow (Go duration)")
    args = ap.parse_args()
    cfg = Config(max_replicas=args.max_replicas, target=args.target, slots=args.slots, startup=args.startup)
    settings = ScalingSettings(
        min_replicas=0,
        max_replicas=cfg.max_replicas,
        target_load_per_replica=cfg.target,
        scale_up_window=parse_window(args.up),
        scale_down_window=parse_window(args.down),
        scale_to_zero_window=parse_window(args.zero),
    )

    def kpa(grace: float) -> Kpa:
        return Kpa(cfg.min_replicas, cfg.max_replicas, float(cfg.target), grace=grace)

    summary: list[str] = []
    for seed in range(args.seed, args.seed + args.seeds):
        trace, desc = make_trace(seed)
        print(f"\n=== seed {seed}: {desc}")
        print(
            f"    maxReplicas {cfg.max_replicas}, target {cfg.target}/replica, {cfg.slots} slots/replica, "
            f"startup {cfg.startup:g}s, tick {TICK:g}s; ours: up {args.up}, down {args.down}, zero {args.zero}"
        )
        fixed = simulate(trace, Fixed(cfg.max_replicas), cfg, initial=cfg.max_replicas)
        ours = simulate(trace, Ours(settings), cfg)
        kpa_default = simulate(trace, kpa(30.0), cfg)
        kpa_default.name = "kpa (grace 30s)"
        results = [fixed, ours, kpa_default]
        tuned: Result | None = None
        grace = 0.0
        if args.tune:
            grace, tuned = tune_grace(trace, cfg, ours.gpu_seconds, kpa)
            tuned.name = f"kpa (grace {grace:.0f}s)"
            results.append(tuned)
        print(table(results, fixed))
        ratio = ours.gpu_seconds / fixed.gpu_seconds
        line = f"seed {seed}: ours/fixed GPU-s = {ratio:.3f} ({'<=' if ratio <= 0.5 else '>'} 0.5)"
        if tuned is not None:
            verdict = "fewer" if ours.cold_starts < tuned.cold_starts else "NOT fewer"
            gap = tuned.gpu_seconds / ours.gpu_seconds - 1
            equal = "equal GPU-s" if abs(gap) <= 0.01 else f"KPA's closest GPU-s ({100 * gap:+.1f}%)"
            line += (
                f"; at {equal} (KPA grace {grace:.0f}s, {tuned.gpu_seconds:.0f} vs {ours.gpu_seconds:.0f}): "
                f"cold starts ours {ours.cold_starts} vs KPA {tuned.cold_starts} ({verdict}), "
                f"at 0 ready {ours.at_zero_ready} vs {tuned.at_zero_ready}, "
                f"waited {ours.waited} vs {tuned.waited}"
            )
        print(line)
        summary.append(line)
    if len(summary) > 1:
        print("\n=== summary")
        print("\n".join(summary))


if __name__ == "__main__":
    main()
