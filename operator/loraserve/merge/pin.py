"""The base a live merge starts from is the one the ModelVersion pins (`spec.baseModel.revision`):

- `sha256:<64 hex>`: the digest of the base's files (`loraserve.digest`, as for adapters): checked after the
  base is fetched, and again by the merge step on whatever directory it reads (a claim, a node path);
- for `hf://` bases, any other revision is the Hub revision (a commit hash, ideally) the files are fetched at;
  a name that carries its own `@revision` must agree with it;
- for other sources (file://, pvc://, s3://, https://) there is no revision to fetch at: a revision that is not
  a digest is a label only ("local"), and only a digest makes the merge check the files.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.merge.errors import MergeRefused


@dataclass(frozen=True)
class PinnedBase:
    uri: str  # what the fetcher downloads
    digest: str | None  # the base directory's sha256, checked by the fetch and by the merge


def pinned_base(name: str, revision: str) -> PinnedBase:
    digest = revision if revision.startswith("sha256:") else None
    if not name.startswith("hf://"):
        return PinnedBase(name, digest)
    repo, at, named = name.partition("@")
    if digest is not None:
        return PinnedBase(name, digest)
    if at and named != revision:
        raise MergeRefused(
            f"spec.baseModel: the name {name!r} pins revision {named!r} but spec.baseModel.revision is {revision!r}"
        )
    return PinnedBase(f"{repo}@{revision}", None)
