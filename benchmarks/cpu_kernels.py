"""Single-kernel timings behind #19's CPU decisions, each against its alternative, in one process.

    python benchmarks/cpu_kernels.py adam        # chunked 8-bit AdamW (by chunk size) vs bitsandbytes' step
    python benchmarks/cpu_kernels.py attention   # CPU flash attention by length; a blocked backward
    python benchmarks/cpu_kernels.py head        # the loss head's chunk size (qlora.loss.CHUNK_TOKENS)
    python benchmarks/cpu_kernels.py lora-fold   # B's GEMM folded into the base GEMM's K

Median milliseconds of repeated calls after warm-ups; nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from matmul4bit import best_ms  # noqa: E402

BF16 = torch.bfloat16


def ms(f, reps: int = 10) -> float:
    """Median milliseconds of `reps` calls after 2 warm-ups."""
    return round(best_ms(f, reps, warmup=2, pick=statistics.median), 2)


def adam() -> None:
    """One step over LoRA factor shapes: SmolLM2's 30 layers, and 8 layers of 65B's (r 16)."""
    import bitsandbytes as bnb
    from qlora import cpu_adam
    from qlora.optim import build_optimizer
    warnings.filterwarnings("ignore")  # bitsandbytes: paged optimizers fall back on CPU
    d, f, kv, r = 576, 1536, 192, 16
    smol = [(r, d), (d, r), (r, d), (kv, r), (r, d), (kv, r), (r, d), (d, r),
            (r, d), (f, r), (r, d), (f, r), (r, f), (d, r)] * 30
    d, f = 8192, 22016
    big = ([(r, d), (d, r)] * 4 + [(r, d), (f, r)] * 2 + [(r, f), (d, r)]) * 8
    for name, shapes in (("smollm2 (30 layers)", smol), ("65b (8 layers)", big)):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(BF16) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(BF16)
        theirs = bnb.optim.PagedAdamW8bit(params, lr=1e-4)  # the same tensors, its own state
        cells = []
        for chunk in (1 << 14, 1 << 16, cpu_adam.CHUNK, 1 << 20):  # qlora's CHUNK, and around it
            default, cpu_adam.CHUNK = cpu_adam.CHUNK, chunk
            cells.append(f"{chunk >> 10}K {ms(build_optimizer(params, 'paged_adamw_8bit', 1e-4, 0.0).step)} ms")
            cpu_adam.CHUNK = default
        print(f"{name}: {len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.1f}M params; "
              f"bitsandbytes {ms(theirs.step)} ms; chunked, by chunk elements: " + ", ".join(cells))


def _blocked_attention_backward(q, k, v, go, out, lse, scale, rows: int = 64):
    """Causal attention's (dq, dk, dv) from the forward's lse, `rows` queries at a time, every
    head in one bmm; scores and dP in fp32 GEMMs (CPU bf16 GEMMs cannot write fp32)."""
    _, h, t, e = q.shape
    hkv = k.shape[1]
    g = h // hkv
    qg, dog = q[0].view(hkv, g, t, e), go[0].view(hkv, g, t, e)  # query heads by their KV head
    kf, vf = k[0].float(), v[0].float()  # (hkv, t, e)
    lseg = lse[0].view(hkv, g, t)
    delta = (go[0].float() * out[0].float()).sum(-1).view(hkv, g, t)  # rowsum(dO * O)
    dq = torch.empty_like(qg)
    dk, dv = torch.zeros(hkv, t, e), torch.zeros(hkv, t, e)
    for a in range(0, t, rows):
        b = min(t, a + rows)
        n = b - a
        qb, dob = qg[:, :, a:b].reshape(hkv, g * n, e), dog[:, :, a:b].reshape(hkv, g * n, e)
        p = torch.bmm(qb.float(), kf[:, :b].transpose(1, 2)).view(hkv, g, n, b)  # scores
        p.mul_(scale).sub_(lseg[:, :, a:b, None]).exp_()
        p[..., a:].masked_fill_(torch.ones(n, n, dtype=torch.bool).triu_(1), 0.0)
        dv[:, :b] += torch.bmm(p.to(BF16).view(hkv, g * n, b).transpose(1, 2), dob).float()
        ds = torch.bmm(dob.float(), vf[:, :b].transpose(1, 2)).view(hkv, g, n, b)
        ds = ds.sub_(delta[:, :, a:b, None]).mul_(p).to(BF16).view(hkv, g * n, b)
        dq[:, :, a:b] = torch.bmm(ds, k[0][:, :b]).mul_(scale).view(hkv, g, n, e)
        dk[:, :b] += torch.bmm(ds.transpose(1, 2), qb).float()
    return dq.view(1, h, t, e), dk.mul_(scale).to(BF16)[None], dv.to(BF16)[None]


def attention() -> None:
    """The CPU flash kernel (the one sdpa runs in both stacks) by length; a blocked backward."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    for h, hkv, e, lengths in ((9, 3, 64, (191, 192, 512, 767, 768)), (16, 16, 128, (512,))):
        for t in lengths:
            q, go = torch.randn(1, h, t, e, dtype=BF16), torch.randn(1, h, t, e, dtype=BF16)
            k, v = torch.randn(1, hkv, t, e, dtype=BF16), torch.randn(1, hkv, t, e, dtype=BF16)
            scale = e ** -0.5
            out, lse = flash(q, k, v, 0.0, True, scale=scale)  # grouped KV heads, as the models run it
            fwd = ms(lambda: flash(q, k, v, 0.0, True, scale=scale))
            bwd = ms(lambda: flash_bwd(go, q, k, v, out, lse, 0.0, True, scale=scale))
            blocked = ms(lambda: _blocked_attention_backward(q, k, v, go, out, lse, scale))
            print(f"heads {h}/{hkv} x {e}, {t} tokens: flash forward {fwd} ms, backward {bwd} ms; "
                  f"blocked backward {blocked} ms")


def head() -> None:
    """The loss head + cross-entropy (forward and its gradient) by chunk size."""
    from qlora import loss
    for vocab, width in ((49152, 576), (32000, 2048)):
        h = torch.randn(511, width, dtype=BF16)
        w = torch.randn(vocab, width, dtype=BF16) * 0.02
        y = torch.randint(0, vocab, (511,))
        cells = []
        for rows in (64, 128, 256, 512):
            loss.CHUNK_TOKENS = rows
            cells.append(f"{rows}: {ms(lambda: loss._HeadCrossEntropy.apply(h, w, None, y))} ms")
        print(f"vocab {vocab} x {width}, 511 tokens: " + ", ".join(cells))


def lora_fold() -> None:
    """One 2048 x 2048 tile at 512 tokens, r 16: the base GEMM with B's GEMM before it (qlora),
    and folded into K as [x | a] @ [W | B]^T, with the tile already in rows of k + r or copied there."""
    m, k, n, r = 512, 2048, 2048, 16
    x, a = torch.randn(m, k, dtype=BF16), torch.randn(m, r, dtype=BF16)
    w, b = torch.randn(n, k, dtype=BF16) * 0.02, torch.randn(n, r, dtype=BF16) * 0.02
    y = torch.empty(m, n, dtype=BF16)
    xa, wb = torch.cat([x, a], 1), torch.cat([w, b], 1)
    buf = torch.empty(n, k + r, dtype=BF16)

    def copied():
        buf[:, :k].copy_(w)
        buf[:, k:].copy_(b)
        torch.mm(xa, buf.t(), out=y)

    print(f"base GEMM alone {ms(lambda: torch.mm(x, w.t(), out=y), 20)} ms; "
          f"B GEMM then addmm_ {ms(lambda: (torch.mm(a, b.t(), out=y), y.addmm_(x, w.t())), 20)} ms; "
          f"folded {ms(lambda: torch.mm(xa, wb.t(), out=y), 20)} ms; folded with the copy {ms(copied, 20)} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("adam", "attention", "head", "lora-fold"))
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    {"adam": adam, "attention": attention, "head": head, "lora-fold": lora_fold}[args.what]()
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
