"""ulysses_dtensor: PyTorch-native Ulysses sequence parallelism.

Sequence-sharded q/k/v -> one all-to-all -> head-sharded attention over the whole sequence with
any kernel -> one all-to-all -> sequence-sharded output. Exact, with minimal communication.
"""

from .attention import ulysses_attention
from .comm import head_to_seq, seq_to_head
from .comm_counter import CollectiveCounter
from .explain import explain
from .documents import Documents
from .hybrid import choose_ring_degree, hybrid_attention
from .dtensor_rule import dtensor_attention_rule, register, unregister
from .inputs import gather_sequence, shard_batch
from .layout import UlyssesLayout, head_ranges, kv_head_ranges, seq_shard_sizes
from .mesh import init_mesh
from .parallelize import UlyssesConfig, parallelize_module
from .loss import chunked_linear_cross_entropy, token_weighted_cross_entropy
from .style import UlyssesAttention

__all__ = [
    "CollectiveCounter",
    "Documents",
    "UlyssesAttention",
    "UlyssesConfig",
    "UlyssesLayout",
    "choose_ring_degree",
    "chunked_linear_cross_entropy",
    "dtensor_attention_rule",
    "hybrid_attention",
    "explain",
    "gather_sequence",
    "init_mesh",
    "parallelize_module",
    "shard_batch",
    "token_weighted_cross_entropy",
    "head_ranges",
    "head_to_seq",
    "kv_head_ranges",
    "register",
    "unregister",
    "seq_shard_sizes",
    "seq_to_head",
    "ulysses_attention",
]
