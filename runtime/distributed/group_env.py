"""Where a rank group comes from: explicit values, else a LeaderWorkerSet pod's environment.

LeaderWorkerSet (kubernetes-sigs/lws, >= 0.6) sets on every pod of a group:
  LWS_LEADER_ADDRESS  the leader pod's stable DNS name (rank 0's node: the rendezvous host)
  LWS_GROUP_SIZE      pods in the group (our nnodes)
  LWS_WORKER_INDEX    this pod's index, 0 for the leader (our node_rank)
Plain Python (no torch): the CLI and the operator's tests read it cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

LWS_LEADER_ADDRESS = "LWS_LEADER_ADDRESS"
LWS_GROUP_SIZE = "LWS_GROUP_SIZE"
LWS_WORKER_INDEX = "LWS_WORKER_INDEX"


@dataclass(frozen=True)
class GroupPlacement:
    """This node's place in a (possibly multi-node) group; None fields: not given."""

    nnodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None


def placement_from_env(environ: Mapping[str, str]) -> GroupPlacement:
    """The group a LeaderWorkerSet pod belongs to (all None outside one)."""
    return GroupPlacement(
        nnodes=_int_env(environ, LWS_GROUP_SIZE),
        node_rank=_int_env(environ, LWS_WORKER_INDEX),
        master_addr=environ.get(LWS_LEADER_ADDRESS) or None,
    )


def merge_placement(explicit: GroupPlacement, environ: Mapping[str, str]) -> GroupPlacement:
    """Each explicit value wins; a missing one comes from the LeaderWorkerSet environment."""
    env = placement_from_env(environ)
    return GroupPlacement(
        nnodes=explicit.nnodes if explicit.nnodes is not None else env.nnodes,
        node_rank=explicit.node_rank if explicit.node_rank is not None else env.node_rank,
        master_addr=explicit.master_addr or env.master_addr,
    )


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"${name}={text!r} is not an integer.") from None
