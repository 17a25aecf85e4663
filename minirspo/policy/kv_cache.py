"""`GrowingCache`: the KV cache of `HFPolicy`'s decode loop, an HF `Cache` whose layers append in place.

Notation: B rows, H key/value heads, T cached positions, d head dim, n new positions.

HF's `DynamicLayer` concatenates each decode step's keys and values onto everything cached so far: a copy
of the whole cache per new token, O(N²) per response. A `GrowingLayer` writes them into a buffer with room
to spare, doubles the buffer when it is full, and hands attention a view of its filled part. Same values,
so the same attention; at 64 new tokens (qwen3-14m, 128 rows, 2 CPU threads) the copies were 11% of the
decode (benchmarks/README.md, decode_bench). This module imports transformers: import it where a model is
built, as `minirspo.policy.hf` does.
"""
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose `keys`/`values` (B, H, T, d) are views of buffers (B, H, capacity, d).

    Every other `DynamicLayer` method (`batch_select_indices`, `crop`, ...) replaces `keys`/`values` with new
    tensors; the next `update` sees that they are no longer its views and moves them into a fresh buffer."""

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = self.value_buffer = None                  # (B, H, capacity, d) each, from the 1st update
        self.keys_view = None                                       # the `keys` this layer handed out last

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append key/value states (B, H, n, d); return all cached keys and values (B, H, T + n, d)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if self.keys is not self.keys_view or end > self.key_buffer.shape[-2]:  # new, replaced, or full
            capacity = max(end, 2 * start)
            self.key_buffer = _buffer_holding(self.keys, key_states, start, capacity)      # (B, H, capacity, d)
            self.value_buffer = _buffer_holding(self.values, value_states, start, capacity)
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]  # (B, H, T + n, d)
        self.keys_view = self.keys
        return self.keys, self.values


def _buffer_holding(cached: Tensor, new_states: Tensor, length: int, capacity: int) -> Tensor:
    """An uninitialised (B, H, capacity, d) buffer like `new_states` whose first `length` positions hold `cached`."""
    buffer = new_states.new_empty((*new_states.shape[:2], capacity, new_states.shape[-1]))  # (B, H, capacity, d)
    if length:
        buffer[:, :, :length] = cached
    return buffer


class GrowingCache(Cache):
    """An HF `Cache` of `GrowingLayer`s, one per attention layer, made as the model first writes to it."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=GrowingLayer)
