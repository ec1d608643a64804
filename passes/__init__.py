"""Graph passes, one per file, each a function `(GraphModule, CompileContext) -> GraphModule`.

Imported as `prunec.passes` (see pyproject's package-dir). The compiler runs them in this order:
"""
from .eliminate_dead_code import eliminate_dead_code
from .fuse_gathers import fuse_gathers
from .insert_prune_ops import insert_prune_ops
from .locate_sites import locate_sites
from .propagate_tokens import propagate_tokens
from .verify import verify

PIPELINE = (locate_sites, insert_prune_ops, propagate_tokens, eliminate_dead_code, fuse_gathers, verify)

__all__ = ["PIPELINE", "eliminate_dead_code", "fuse_gathers", "insert_prune_ops", "locate_sites", "propagate_tokens", "verify"]
