"""ulysses_dtensor: PyTorch-native Ulysses sequence parallelism.

Sequence-sharded q/k/v -> one all-to-all -> head-sharded attention over the whole sequence with
any kernel -> one all-to-all -> sequence-sharded output. Exact, with minimal communication.

The public API is the names below. Everything else is importable from the module that owns it
(docs/design.md has the table): e.g. ``ulysses_dtensor.comm.seq_to_head`` (the resharding
primitives), ``ulysses_dtensor.comm_counter.CollectiveCounter`` (collectives and bytes counted),
``ulysses_dtensor.documents.Documents`` (packed documents), ``ulysses_dtensor.loss`` (the global
token-weighted losses), ``ulysses_dtensor.layout.UlyssesLayout`` (who holds what). The
applications (CLI, train job, planner, benchmarks, launcher, test harness) live in
``ulysses_dtensor.tools``, which the library never imports.
"""

from .attention import ulysses_attention
from .dtensor_rule import dtensor_attention_rule
from .explain import explain
from .inputs import gather_sequence, shard_batch
from .mesh import init_mesh
from .parallelize import UlyssesConfig, UlyssesHandle, handle_of, parallelize_module
from .style import UlyssesAttention

__all__ = [
    "UlyssesAttention",
    "UlyssesConfig",
    "UlyssesHandle",
    "dtensor_attention_rule",
    "explain",
    "gather_sequence",
    "handle_of",
    "init_mesh",
    "parallelize_module",
    "shard_batch",
    "ulysses_attention",
]

