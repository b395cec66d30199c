"""Keys and values of recent prompts, reused by the next prompt that starts the same way.

A conversation's next turn repeats everything before it: the system prompt, the earlier turns, their images.
The LM is frozen, so the keys and values it made for those positions are the same the next time, and only
the new part needs a forward (vLLM calls this automatic prefix caching). A prompt matches an entry as far as
their input embeddings are equal, position by position, whatever made them (token ids, an image's mapped
tokens), so a change of the trainable mappings (training, another checkpoint's weights) stops the match where
their tokens start. Equal means equal to float rounding (`RTOL`): an image's tokens come out a few ulps
apart when it is mapped in a batch of another size, and keys and values that far apart are the same read.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from transformers import DynamicCache

RTOL, ATOL = 1e-5, 1e-6


def common_length(stored: torch.Tensor, embeds: torch.Tensor) -> int:
    """How many leading positions of stored (S, D) and embeds (T, D) are equal (to float rounding)."""
    n = min(len(stored), len(embeds))
    same = torch.isclose(stored[:n], embeds[:n], rtol=RTOL, atol=ATOL).all(-1)              # (n,)
    return n if bool(same.all()) else int(same.long().argmin())


class PrefixCache:
    """Prompts' (inputs_embeds, keys and values) in least-recently-used order, up to `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]] = OrderedDict()
        self._bytes: dict[int, int] = {}
        self._next_id = 0
        self._lock = threading.Lock()  # sessions share one model

    def __len__(self) -> int:
        return len(self._entries)

    def reuse(self, embeds: torch.Tensor, limit: int) -> tuple[int, DynamicCache]:
        """embeds (T, D) of a prompt -> how many of its first positions are known (at most `limit`) and a new
        cache holding their keys and values (empty when none are)."""
        with self._lock:
            best, found = 0, None
            for key, (stored, _) in self._entries.items():
                n = min(common_length(stored, embeds), limit)
                if n > best:
                    best, found = n, key
            if found is None:
                return 0, DynamicCache()
            self._entries.move_to_end(found)
            layers = self._entries[found][1]
        cache = DynamicCache()
        for i, (keys, values) in enumerate(layers):
            cache.update(keys[:, :, :best], values[:, :, :best], i)                        # copies: (1, H, best, D)
        return best, cache

    def add(self, embeds: torch.Tensor, cache: DynamicCache) -> None:
        """Remember a prompt: embeds (T, D) and the cache after reading exactly them (batch of one). An entry
        that is a prefix of it goes: this one answers for both."""
        if cache.get_seq_length() != len(embeds):
            raise ValueError(f"the cache holds {cache.get_seq_length()} positions, the prompt {len(embeds)}")
        layers = [(layer.keys.detach().clone(), layer.values.detach().clone()) for layer in cache.layers]
        size = embeds.nbytes + sum(k.nbytes + v.nbytes for k, v in layers)
        if size > self.max_bytes:
            return
        with self._lock:
            for key, (stored, _) in list(self._entries.items()):
                if len(stored) <= len(embeds) and common_length(stored, embeds) == len(stored):
                    self._drop(key)
            key, self._next_id = self._next_id, self._next_id + 1
            self._entries[key], self._bytes[key] = (embeds.detach().clone(), layers), size
            while sum(self._bytes.values()) > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes.clear()

    def _drop(self, key: int) -> None:
        del self._entries[key], self._bytes[key]
