"""Prefix KV cache: the latent KV of finished requests, kept so a request that starts the same way (the next turn
of a chat, an agent resending its context) prefills only its new tokens.

A radix tree over token ids: each node holds one run of tokens and their latents for every layer, [layers, run,
kv_lora_rank + rope dim] in the engine's KV dtype, in host RAM. A lookup walks the longest exact match (a
different token ends the match: nothing after it is shared). Eviction removes the least recently used leaf, a
whole suffix, until the cache fits its budget. With a directory (`PrefixStore`), evicted suffixes and, at close,
everything left are written to disk with the model's identity and read back on a later hit, across restarts.

Host RAM, not VRAM: the plan gives free VRAM to the hot-expert cache, which is what decode speed depends on; a
hit costs one host-to-device copy of ~70 KB per cached token (K2, bf16), ~30 ms for 10K tokens over PCIe 4.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from .model import KVCache
from .prefix_store import common_prefix


@dataclass(eq=False)
class _Node:
    tokens: np.ndarray  # int64 [run]
    kv: torch.Tensor | None  # [layers, run, C + dr]; None for the root
    parent: "_Node | None" = None
    children: dict[int, "_Node"] = field(default_factory=dict)
    last_used: int = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()


@dataclass
class PrefixStats:
    lookups: int = 0
    hit_tokens: int = 0  # tokens whose prefill a lookup saved
    lookup_tokens: int = 0  # prompt tokens looked up
    evicted_tokens: int = 0
    disk_loads: int = 0


class PrefixCache:
    def __init__(self, budget_bytes: int, store=None):
        """budget_bytes: host RAM for cached latents; store: a PrefixStore for the disk tier, or None."""
        self.budget, self.store = budget_bytes, store
        self.root = _Node(np.empty(0, np.int64), None)
        self.nbytes = 0
        self.stats = PrefixStats()
        self._clock = itertools.count(1)

    @property
    def tokens(self) -> int:
        return sum(len(n.tokens) for n in self._nodes())

    def _nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node is not self.root:
                yield node
            stack.extend(node.children.values())

    def _walk(self, ids: np.ndarray) -> tuple[list[tuple[_Node, int]], int]:
        """The path of (node, tokens of it matched) for the longest cached prefix of ids, and its length."""
        path, node, n = [], self.root, 0
        while n < len(ids) and (child := node.children.get(int(ids[n]))) is not None:
            same = common_prefix(child.tokens, ids[n:])
            path.append((child, same))
            n += same
            if same < len(child.tokens):
                break
            node = child
        return path, n

    def match(self, ids: list[int], cache: KVCache, limit: int) -> int:
        """Copy the latents of the longest cached prefix of ids (at most `limit` tokens) into cache; return its
        length. A longer prefix on disk is loaded first."""
        arr = np.asarray(ids, np.int64)
        path, n = self._walk(arr)
        if self.store is not None and (found := self.store.longest(arr, min_length=n + 1)) is not None:
            tokens, kv = found
            self.insert_kv(tokens, kv)
            self.stats.disk_loads += 1
            path, n = self._walk(arr)
        n = min(n, limit)
        self.stats.lookups += 1
        self.stats.lookup_tokens += len(ids)
        self.stats.hit_tokens += n
        pos, now = 0, next(self._clock)
        for node, same in path:
            take = min(same, n - pos)
            if take <= 0:
                break
            node.last_used = now
            seg = node.kv[:, :take]
            for layer in range(seg.shape[0]):
                C = cache.c[layer].shape[1]
                cache.c[layer][pos : pos + take].copy_(seg[layer, :, :C], non_blocking=True)
                cache.pe[layer][pos : pos + take].copy_(seg[layer, :, C:], non_blocking=True)
            pos += take
        return n

    def insert(self, ids: list[int], cache: KVCache) -> None:
        """Remember the latents of ids (positions 0..len(ids)-1 of cache, all computed), then fit the budget."""
        if not ids:
            return

        def latents(start: int, end: int) -> torch.Tensor:
            return torch.stack([torch.cat([c[start:end], pe[start:end]], dim=1).cpu()
                                for c, pe in zip(cache.c, cache.pe)])  # fmt: skip

        self._insert(np.asarray(ids, np.int64), latents)

    def insert_kv(self, tokens: np.ndarray, kv: torch.Tensor) -> None:
        """Remember latents given as one [layers, len(tokens), C + dr] tensor (a disk entry)."""
        self._insert(np.asarray(tokens, np.int64), lambda start, end: kv[:, start:end].clone())

    def _insert(self, arr: np.ndarray, latents) -> None:
        path, n = self._walk(arr)
        now = next(self._clock)
        node = self.root
        for child, same in path:
            child.last_used = now
            if same < len(child.tokens):
                self._split(child, same)
            node = child
        if n < len(arr):
            leaf = _Node(arr[n:].copy(), latents(n, len(arr)), node, last_used=now)
            node.children[int(arr[n])] = leaf
            self.nbytes += leaf.nbytes
        self._fit()

    def _split(self, node: _Node, at: int) -> None:
        """Cut node after `at` tokens: it keeps the head, a new child takes the tail and the children."""
        tail = _Node(node.tokens[at:].copy(), node.kv[:, at:].clone(), node, node.children, node.last_used)
        for child in tail.children.values():
            child.parent = tail
        node.tokens, node.kv, node.children = node.tokens[:at].copy(), node.kv[:, :at].clone(), {int(tail.tokens[0]): tail}

    def _fit(self) -> None:
        while self.nbytes > self.budget:
            leaves = [n for n in self._nodes() if not n.children]
            victim = min(leaves, key=lambda n: n.last_used)
            if self.store is not None:
                self.store.save(*self._full(victim))
            self._remove(victim)

    def _full(self, leaf: _Node) -> tuple[np.ndarray, torch.Tensor]:
        """The whole prefix ending at leaf: its tokens and latents from the root."""
        chain = []
        node = leaf
        while node is not self.root:
            chain.append(node)
            node = node.parent
        chain.reverse()
        return np.concatenate([n.tokens for n in chain]), torch.cat([n.kv for n in chain], dim=1)

    def _remove(self, leaf: _Node) -> None:
        del leaf.parent.children[int(leaf.tokens[0])]
        self.nbytes -= leaf.nbytes
        self.stats.evicted_tokens += len(leaf.tokens)

    def close(self) -> None:
        """Write every cached prefix to the disk tier (if any), so the next start begins warm."""
        if self.store is None:
            return
        for leaf in [n for n in self._nodes() if not n.children]:
            self.store.save(*self._full(leaf))

    def report(self) -> str:
        s = self.stats
        rate = s.hit_tokens / s.lookup_tokens if s.lookup_tokens else 0.0
        return (f"prefix cache: {s.hit_tokens:,} of {s.lookup_tokens:,} prompt tokens reused ({rate:.0%}), "
                f"{self.tokens:,} tokens cached in {self.nbytes / 2**20:.1f} MiB of {self.budget / 2**20:.0f} MiB"
                + (f", {s.disk_loads} loaded from disk" if self.store is not None else ""))  # fmt: skip
