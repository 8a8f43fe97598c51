"""DeepSeek-V3 / Kimi-K2 forward math in plain torch (fp32 compute). No I/O, threads or device policy here.

Shapes: T tokens of one sequence, H hidden, nh heads, dn/dr/dv the nope/rope/value head dims, C kv_lora_rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from cpu_kernels import mla

from .config import ModelConfig, yarn_mscale
from .device import on_device
from .formats import Int4Weight
from .fp8 import Fp8Weight, bf16_matmul_cpu, codes, fp8_matmul_cpu
from .profile import PROFILE


Weight = Fp8Weight | Int4Weight | torch.Tensor  # a linear's weight as its checkpoint format stores it


def dense(w: Weight) -> torch.Tensor:
    """A linear's weight in fp32: quantized weights are dequantized on the fly, float ones (bf16, training) cast."""
    return w.dequantize() if isinstance(w, (Fp8Weight, Int4Weight)) else w.float()


FUSED_MAX_TOKENS = 4  # up to here a CPU fp8 linear streams the codes; beyond, dequantize once and matmul
GPU_FUSED_MAX_TOKENS = 16  # up to here a GPU fp8 linear reads the codes (Triton); beyond, dequantize and matmul


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """y = x W^T in fp32 (the one place a linear's path is chosen)."""
    if x.dim() == 2 and not x.requires_grad:
        if x.shape[0] <= FUSED_MAX_TOKENS and _fused_cpu(x, w):
            return fp8_matmul_cpu(x, w)
        bf16 = isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 and not w.requires_grad
        if x.shape[0] <= FUSED_MAX_TOKENS and not on_device(x) and bf16:
            return bf16_matmul_cpu(x, w)  # the lm_head, INT4 checkpoints' bf16 linears: no fp32 copy
        if x.shape[0] <= GPU_FUSED_MAX_TOKENS and on_device(x) and isinstance(w, Fp8Weight):
            from .gpu_kernels import fp8_linear

            return fp8_linear(x.float(), w.q, w.scale)
        if x.shape[0] <= GPU_FUSED_MAX_TOKENS and on_device(x) and bf16:
            from .gpu_kernels import bf16_linear

            return bf16_linear(x.float(), w)  # INT4 checkpoints' bf16 linears: no fp32 copy of the weight
        if on_device(x) and isinstance(w, Int4Weight):  # the hot-expert cache and streamed prefill (any rows)
            from .gpu_kernels import int4_linear

            return int4_linear(x.float(), w.packed, w.scale)
    return F.linear(x, dense(w))


def _fused_cpu(x: torch.Tensor, w) -> bool:
    return isinstance(w, Fp8Weight) and not on_device(x) and not x.requires_grad


def absorb_query(q_nope: torch.Tensor, kv_b: Weight, dv: int) -> torch.Tensor:
    """MLA decode: q_nope [nh, dn] -> [nh, C], the query against the latent cache (kv_b's key half absorbed)."""
    nh, dn = q_nope.shape
    if _fused_cpu(q_nope, kv_b):
        return torch.from_numpy(mla.absorb_query(q_nope.float().numpy(), *_codes_and_scales(kv_b), dv))
    return torch.einsum("hd,hdc->hc", q_nope, dense(kv_b).view(nh, dn + dv, -1)[:, :dn])


def absorb_value(ctx: torch.Tensor, kv_b: Weight, dn: int) -> torch.Tensor:
    """MLA decode: attention-weighted latents ctx [nh, C] -> [nh, dv] (kv_b's value half absorbed)."""
    nh, C = ctx.shape
    if _fused_cpu(ctx, kv_b):
        return torch.from_numpy(mla.absorb_value(ctx.float().contiguous().numpy(), *_codes_and_scales(kv_b), dn))
    return torch.einsum("hc,hvc->hv", ctx, dense(kv_b).view(nh, -1, C)[:, dn:])


def _codes_and_scales(w: Fp8Weight):
    return codes(w.q), w.scale.float().contiguous().numpy()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rope dims and the cos/sin multiplier (YaRN as transformers computes it)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0 / pos_freqs, 1.0

    if rs.attention_factor is not None:
        attention_factor = rs.attention_factor
    elif rs.mscale and rs.mscale_all_dim:
        attention_factor = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(rs.factor)

    def correction_dim(rotations: float) -> float:
        orig = rs.original_max_position_embeddings
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a hard switch between kept and scaled frequencies
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    inv_freq = (1.0 / (rs.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3)...; cos/sin are [T, dr/2] and broadcast over heads.

    The result is laid out [rotated evens | rotated odds] as transformers does; dot products are unchanged.
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class KVCache:
    """MLA latent cache: per layer and token the normalised latent c (C) and the rotated shared key (dr)."""

    def __init__(self, cfg: ModelConfig, capacity: int, dtype: torch.dtype = torch.float32, zeros=torch.zeros):
        """zeros(shape, dtype=) allocates on the cache's device (torch.zeros: host; a GPU Device's zeros)."""
        # one tensor per layer: a write to one layer's cache never touches what another layer read (autograd)
        layers = range(cfg.num_hidden_layers)
        self.c = [zeros((capacity, cfg.kv_lora_rank), dtype=dtype) for _ in layers]
        self.pe = [zeros((capacity, cfg.qk_rope_head_dim), dtype=dtype) for _ in layers]
        self.capacity = capacity


@dataclass
class Attention:
    cfg: ModelConfig
    layer: int
    q_a: Weight | None
    q_a_norm: torch.Tensor | None
    q_b: Weight  # q_b_proj, or q_proj when q_lora_rank is None
    kv_a: Weight
    kv_a_norm: torch.Tensor
    kv_b: Weight
    o: Weight

    def __call__(self, x, start: int, cache: KVCache, cos, sin) -> torch.Tensor:
        cfg, T = self.cfg, x.shape[0]
        nh, dn, dr, dv, C = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                             cfg.v_head_dim, cfg.kv_lora_rank)  # fmt: skip
        q_in = x if self.q_a is None else rms_norm(linear(x, self.q_a), self.q_a_norm, cfg.rms_norm_eps)
        q = linear(q_in, self.q_b).view(T, nh, dn + dr)
        q_nope, q_pe = q[..., :dn], apply_rope(q[..., dn:], cos[:, None], sin[:, None])
        kv = linear(x, self.kv_a)
        end, cached_c, cached_pe = start + T, cache.c[self.layer], cache.pe[self.layer]
        c_new, pe_new = rms_norm(kv[:, :C], self.kv_a_norm, cfg.rms_norm_eps), apply_rope(kv[:, C:], cos, sin)
        cached_c[start:end], cached_pe[start:end] = c_new, pe_new
        bf16_kv_b = isinstance(self.kv_b, torch.Tensor) and self.kv_b.dtype == torch.bfloat16
        if T == 1 and on_device(x) and (isinstance(self.kv_b, Fp8Weight) or bf16_kv_b):  # one Triton path
            from .gpu_kernels import mla_decode

            kv_b, scale = (self.kv_b.q, self.kv_b.scale) if isinstance(self.kv_b, Fp8Weight) else (self.kv_b, None)
            out = mla_decode(q_nope[0], q_pe[0], kv_b, scale, cached_c, cached_pe, end, cfg.softmax_scale, dv)
            return linear(out.reshape(T, nh * dv), self.o)
        # the chunk's own latents at full precision, earlier ones as cached (bf16 on a GPU): with a bf16 cache read
        # back, near-tie routing flips made random-weight prefill logits differ by up to 30% from fp32
        c = c_new if start == 0 else torch.cat([cached_c[:start].float(), c_new])
        pe = pe_new if start == 0 else torch.cat([cached_pe[:start].float(), pe_new])

        if T == 1:  # absorbed decode: never expand the cache into per-head keys and values
            q_abs = absorb_query(q_nope[0], self.kv_b, dv)[None]
            scores = torch.einsum("thc,sc->hts", q_abs, c) + torch.einsum("thr,sr->hts", q_pe, pe)
            p = torch.softmax(scores * cfg.softmax_scale, dim=-1, dtype=torch.float32)
            out = absorb_value(torch.einsum("hts,sc->thc", p, c)[0], self.kv_b, dn)[None]
        else:  # prefill: expand the latents once per chunk, then fused attention (flash kernels on the GPU)
            w_kvb = dense(self.kv_b).view(nh, dn + dv, C)
            kvb = F.linear(c, w_kvb.view(-1, C)).view(end, nh, dn + dv)
            k = torch.cat([kvb[..., :dn], pe[:, None].expand(end, nh, dr)], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)
            # SDPA's is_causal aligns the mask top-left, which is only right for a chunk starting at position 0
            mask = None if start == 0 else x.new_ones((T, end), dtype=torch.bool).tril(start)  # key j <= start + i
            out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), kvb[..., dn:].transpose(0, 1),
                                                 attn_mask=mask, is_causal=start == 0, scale=cfg.softmax_scale)
            out = out.transpose(0, 1)
        return linear(out.reshape(T, nh * dv), self.o)


@dataclass
class MLP:
    """SwiGLU: down(silu(gate x) * up x). Dense layers and the shared expert."""

    gate: Weight
    up: Weight
    down: Weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.silu(linear(x, self.gate)) * linear(x, self.up), self.down)


@dataclass
class Router:
    cfg: ModelConfig
    weight: torch.Tensor  # [E, H]
    bias: torch.Tensor  # e_score_correction_bias [E], used for selection only

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """noaux_tc routing: (expert ids [T, k], weights [T, k])."""
        return self.route(self.scores(x))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid affinity of every token to every expert [T, E]."""
        return torch.sigmoid(F.linear(x.float(), self.weight.float()))

    def route(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        choice = scores + self.bias.float()
        if cfg.n_group > 1:
            per_group = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
            group_scores = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(per_group.shape[-1], dim=1), float("-inf"))
        idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        w = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * cfg.routed_scaling_factor


class RoutedExperts(Protocol):
    """Backend for the routed experts of one layer: sum_k w[t, k] * expert_{idx[t, k]}(x[t])."""

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor: ...


@dataclass
class LoopExperts:
    """Reference backend: a plain per-expert loop, each expert dequantized when used."""

    experts: list[MLP]

    def __call__(self, x, idx, w):
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            rows, slot = torch.where(idx == e)
            out.index_add_(0, rows, self.experts[e](x[rows]) * w[rows, slot, None])
        return out


@dataclass
class MoE:
    router: Router
    experts: RoutedExperts
    shared: MLP | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with PROFILE("router"):
            idx, w = self.router(x)
        submit = getattr(self.experts, "submit", None)
        if submit is None:  # a synchronous backend
            y = self.experts(x, idx, w)
            return y if self.shared is None else y + self.shared(x)
        pending = submit(x, idx, w)  # routed experts start on the CPU worker...
        with PROFILE("shared expert"):
            shared = None if self.shared is None else self.shared(x)  # ...while the shared expert runs here
        with PROFILE("expert wait"):
            y = pending.result()
        return y if shared is None else y + shared


@dataclass
class Block:
    attn_norm: torch.Tensor
    attn: Attention
    ffn_norm: torch.Tensor
    ffn: MLP | MoE
    eps: float
    after_attention: Callable[[torch.Tensor], None] | None = None  # sees the residual stream (the prefetcher)

    def __call__(self, x, start, cache, cos, sin):
        with PROFILE("attention"):
            h = x + self.attn(rms_norm(x, self.attn_norm, self.eps), start, cache, cos, sin)
        if self.after_attention is not None:
            self.after_attention(h)
        if isinstance(self.ffn, MoE):
            return h + self.ffn(rms_norm(h, self.ffn_norm, self.eps))
        with PROFILE("dense MLP"):
            return h + self.ffn(rms_norm(h, self.ffn_norm, self.eps))


class Transformer:
    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, blocks: list[Block], norm: torch.Tensor,
                 lm_head: torch.Tensor):  # fmt: skip
        self.cfg, self.embed, self.blocks, self.norm, self.lm_head = cfg, embed, blocks, norm, lm_head
        inv_freq, self.rope_mult = rope_frequencies(cfg)
        # on the blocks' device (norm's); the embedding table may stay in host RAM
        self.inv_freq = norm.new_empty(inv_freq.shape, dtype=torch.float32).copy_(inv_freq)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, start: int, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Logits [T, vocab] (or [1, vocab]) for tokens ids [T] at positions start.. start+T-1."""
        return self.forward_train(ids, start, cache, last_only)

    def forward_train(self, ids: torch.Tensor, start: int, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """`forward` with autograd on (the demo model is trained through this exact code)."""
        T = ids.shape[0]
        if start + T > cache.capacity:
            raise ValueError(f"sequence of {start + T} tokens exceeds the KV cache capacity {cache.capacity}")
        angles = self.inv_freq.new_tensor(range(start, start + T))[:, None] * self.inv_freq
        cos, sin = angles.cos() * self.rope_mult, angles.sin() * self.rope_mult
        x = self.embed[ids].to(self.inv_freq)  # fp32 rows, moved to the blocks' device when the table is on the host
        for block in self.blocks:
            x = block(x, start, cache, cos, sin)
        if last_only:
            x = x[-1:]
        with PROFILE("lm_head"):
            return linear(rms_norm(x, self.norm, self.cfg.rms_norm_eps), self.lm_head)
