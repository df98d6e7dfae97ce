"""ulysses_dtensor: PyTorch-native Ulysses sequence parallelism.

Sequence-sharded q/k/v -> one all-to-all -> head-sharded attention over the whole sequence with
any kernel -> one all-to-all -> sequence-sharded output. Exact, with minimal communication.
"""

from .attention import ulysses_attention
from .comm import head_to_seq, seq_to_head
from .comm_counter import CollectiveCounter
from .dtensor_rule import register, unregister
from .layout import UlyssesLayout, head_ranges, kv_head_ranges, seq_shard_sizes

__all__ = [
    "CollectiveCounter",
    "UlyssesLayout",
    "head_ranges",
    "head_to_seq",
    "kv_head_ranges",
    "register",
    "unregister",
    "seq_shard_sizes",
    "seq_to_head",
    "ulysses_attention",
]

register()
