"""Live merge: a peft LoRA adapter folded into its base model's weights, so vLLM serves one fine-tune with no
adapter overhead. Exact or refused: what the merge does for each adapter layout, and what it refuses, is in
`loraserve.merge.plan`; the whole plan is made from file headers before anything is written, so a refused
adapter leaves nothing behind.

    loraserve-fetch merge --base DIR --adapter-uri URI [--digest sha256:...] [--base-digest sha256:...] --out DIR

Streamed: each output shard is written tensor by tensor, and each changed tensor a block of rows at a time
(`tensors.CHUNK_BYTES`), so memory stays near one block, whatever the size of a shard. numpy only: bf16 is
converted by hand (see `loraserve.merge.tensors`), so the image needs no torch for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from loraserve.merge.errors import MergeRefused

if TYPE_CHECKING:
    from loraserve.merge.plan import Plan

__all__ = ["MergeRefused", "merge", "plan_merge"]


# numpy is imported only when a merge runs: the operator imports loraserve.merge.pin, not the merge.
def merge(base_dir: Path, adapter_dir: Path, out_dir: Path, base_digest: str | None = None) -> list[str]:
    """Write the merged model to out_dir (replacing it, all at once at the end); returns the names of the
    weights that changed. `base_digest`: the pinned sha256 of the base directory, refused when it differs."""
    from loraserve.merge import execute

    return execute.merge(base_dir, adapter_dir, out_dir, base_digest)


def plan_merge(base_dir: Path, adapter_dir: Path) -> Plan:
    """The merge plan, or MergeRefused naming what cannot be merged exactly. Reads headers only."""
    from loraserve.merge import execute

    return execute.plan_merge(base_dir, adapter_dir)
