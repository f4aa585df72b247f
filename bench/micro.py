#!/usr/bin/env python
"""Before/after micro-benchmarks of each optimisation in docs/performance.md, interleaved
(before, after, before, after, ...) so machine load hits both alike; medians in ms.

    python bench/micro.py [--threads 2] [--reps 30]

The "before" implementations are the straightforward ones the guards in
tests/test_perf_guards.py compare against.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import common  # noqa: F401  (sys.path)
import torch


def timed(fn: Callable[[], Any], reps: int) -> list[float]:
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def ab(name: str, before: Callable[[], Any], after: Callable[[], Any], reps: int) -> dict[str, Any]:
    b, a = [], []
    for _ in range(3):  # interleave in three blocks
        b += timed(before, reps // 3)
        a += timed(after, reps // 3)
    row = {"case": name, "before_ms": statistics.median(b), "after_ms": statistics.median(a)}
    row["speedup"] = row["before_ms"] / row["after_ms"]
    print(json.dumps(row), flush=True)
    return row


def llama(hidden: int, layers: int, vocab: int = 260) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=512, tie_word_embeddings=False))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from refs import pad_examples_reference, selective_log_softmax_rowloop

    from align import data as D
    from align.ops import entropy_from_logits, masked_mean, selective_log_softmax
    from align.runtime import make_optimizer

    rows = []
    # 1. AdamW: per-tensor loop (torch's CPU default) vs fused, on the H=256 L=4 bench model's parameters
    for h, l in ((64, 2), (256, 4)):
        model = llama(h, l)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        params = list(model.parameters())
        plain = torch.optim.AdamW(params, lr=1e-4, foreach=False, fused=False)
        fused = make_optimizer(params, 1e-4, 0.0, [0.9, 0.999])
        rows.append(ab(f"AdamW step, H={h} L={l} ({sum(p.numel() for p in params) / 1e6:.2f}M params)",
                       plain.step, fused.step, args.reps))

    # 2. SFT collation of a batch of 16 bench-like examples (28-60 tokens)
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(16):
        n = int(torch.randint(28, 61, (1,), generator=g))
        examples.append(D.Example(torch.randint(4, 260, (n,), generator=g).tolist(), [0] * 11 + [1] * (n - 11)))
    rows.append(ab("SFT collate, 16 examples", lambda: pad_examples_reference(examples, 0),
                   lambda: D.pad_examples(examples, 0), args.reps))

    # 3. SFT forward+backward: padded batch with a KV cache built (the old call) vs without, vs packed
    for h, l in ((64, 2), (256, 4)):
        model = llama(h, l).train()
        padded, packed = D.pad_examples(examples, 0), D.pack_examples(examples, 0)

        def step(batch: dict[str, torch.Tensor], **kw: Any) -> None:
            model.zero_grad(set_to_none=True)
            kwargs = ({"position_ids": batch["position_ids"]} if "position_ids" in batch
                      else {"attention_mask": batch["attention_mask"]})
            model(input_ids=batch["input_ids"], **kwargs, **kw).logits.float().mean().backward()

        rows.append(ab(f"SFT fwd+bwd H={h} L={l}: default cache vs use_cache=False", lambda: step(padded),
                       lambda: step(padded, use_cache=False), args.reps))
        rows.append(ab(f"SFT fwd+bwd H={h} L={l}: padded vs padding-free ({padded['input_ids'].numel()} -> "
                       f"{packed['input_ids'].numel()} slots)", lambda: step(padded, use_cache=False),
                       lambda: step(packed, use_cache=False), args.reps))

    # 4. selective_log_softmax: row loop vs the size switch, forward and backward
    for B, T, V in ((8, 16, 260), (8, 28, 260), (64, 144, 260), (8, 64, 32000), (4, 64, 151936)):
        x = torch.randn(B, T, V, requires_grad=True)
        i = torch.randint(0, V, (B, T))
        rows.append(ab(f"selective_log_softmax fwd+bwd B={B} T={T} V={V}",
                       lambda: selective_log_softmax_rowloop(x, i).sum().backward(),
                       lambda: selective_log_softmax(x, i).sum().backward(), max(6, args.reps // 5)))

    # 5. PPO loss backward with the logged entropy in the graph (x 0) vs under no_grad
    for V in (260, 32000):
        x = torch.randn(8, 16, V, requires_grad=True)
        mask = torch.ones(8, 16)

        def loss(in_graph: bool) -> None:
            lp = torch.log_softmax(x, -1)[..., 0]
            if in_graph:
                ent = masked_mean(entropy_from_logits(x), mask)
            else:
                with torch.no_grad():
                    ent = masked_mean(entropy_from_logits(x), mask)
            (masked_mean(lp, mask) - 0.0 * ent).backward()

        rows.append(ab(f"PPO loss fwd+bwd, entropy logged, V={V}", lambda: loss(True), lambda: loss(False),
                       max(6, args.reps // 3)))

    # 6. PPO scoring forward: logits for every position vs only the response's (logits_to_keep)
    from align.bundle import response_logits
    from align.reward import position_ids

    for V in (260, 32000):
        model = llama(256, 4, vocab=V).eval()
        ids = torch.randint(0, V, (8, 64 + 16))
        mask = torch.ones_like(ids)

        def every_position() -> None:
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
                selective_log_softmax(out.logits[:, 63:-1].float() / 0.7, ids[:, 64:])

        def response_only() -> None:
            with torch.no_grad():
                selective_log_softmax(response_logits(model, ids, mask, 64, 0.7), ids[:, 64:])

        rows.append(ab(f"PPO scoring forward H=256 L=4, prompt 64 + response 16, V={V}", every_position,
                       response_only, max(6, args.reps // 3)))

    print()
    print("| optimisation | before (ms) | after (ms) | speedup |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['before_ms']:.2f} | {r['after_ms']:.2f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
