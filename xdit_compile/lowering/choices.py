"""Inductor fusion heuristics for graphs with copy-engine transfers (xdit.a2a_start / a2a_wait)."""
from __future__ import annotations

import torch
from torch._inductor.choices import InductorChoices

from ..runtime import ce_a2a  # noqa: F401  (registers torch.ops.xdit.a2a_start)


def _feeds_start(snode) -> bool:
    start = torch.ops.xdit.a2a_start.default
    for n in snode.get_nodes():
        for buf in n.get_outputs():
            for use in buf.users:
                if getattr(getattr(use.node, "node", None), "op_overload", None) is start:
                    return True
    return False


class StartChoices(InductorChoices):
    """Inductor's heuristics, except that a kernel whose output feeds an xdit.a2a_start is never fused
    horizontally (with an independent kernel that shares its reads). Otherwise k's norm + rotary merges with
    q's, which must follow q's projection, so k's transfer starts only after q is projected (FLUX's double
    blocks: both transfers then run with nothing beside them)."""

    @staticmethod
    def can_fuse_horizontal(scheduler, node1, node2, shared_data_score):
        if _feeds_start(node1) or _feeds_start(node2):
            return False
        return InductorChoices.can_fuse_horizontal(scheduler, node1, node2, shared_data_score)

    def uuid(self) -> str:      # what keys the FX graph cache (config.inductor_choices_class)
        return "xdit-no-horizontal-fusion-into-a2a_start-2"   # -2: a2a_wait outputs never reused
