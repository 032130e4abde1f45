"""Pure autoscaling decisions: windowed policy, scale to zero, idle GC, GPU-second metering (no I/O)."""

from loraserve.autoscale.policy import (
    Decision,
    GpuMeter,
    Reason,
    ScalingPolicy,
    ScalingSettings,
    idle_gc_at,
    idle_gc_due,
    next_look,
)

__all__ = [
    "Decision",
    "GpuMeter",
    "Reason",
    "ScalingPolicy",
    "ScalingSettings",
    "idle_gc_at",
    "idle_gc_due",
    "next_look",
]
