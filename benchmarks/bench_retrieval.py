"""Top-k retrieval and recall@k over a large gallery against their matmul floor, with peak memory.

    python benchmarks/bench_retrieval.py                                    # CPU-sized default: 8k x 40k, D=256
    python benchmarks/bench_retrieval.py --queries 200000 --gallery 1000000 --dtype bfloat16   # the issue's GPU size

* floor: the same blocks' matrix products and nothing else (what any exact top-k must at least compute).
* topk_similarity: blocks + running top-k. Target (GPU): within 3x of the floor.
* chunked_retrieval_metrics: recall@1/5/10 both ways (n_images x n_texts, `--captions` texts per image); it scores
  the blocks holding positives once more, then every block, so its floor is the floor of that matrix plus one pass.
Embeddings are random unit vectors (the speed does not depend on their values). Results: results/retrieval.json.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _common import PeakMemory, machine, pick_device, print_table, synchronize, timed, write_results

from hf_align.evaluation import retrieval_metrics
from hf_align.functional.retrieval import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_QUERY_CHUNK_SIZE,
    chunked_retrieval_metrics,
    topk_similarity,
)


def unit(n: int, dim: int, seed: int, device, dtype) -> torch.Tensor:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return F.normalize(x, dim=-1).to(device=device, dtype=dtype)


def matmul_floor(queries, gallery, chunk_size: int, query_chunk_size: int) -> None:
    """The block products alone, same shapes as the blocked top-k, results thrown away."""
    for g in range(0, gallery.shape[0], chunk_size):
        block = gallery[g : g + chunk_size]
        for q in range(0, queries.shape[0], query_chunk_size):
            queries[q : q + query_chunk_size] @ block.t()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=8_000)
    parser.add_argument("--gallery", type=int, default=40_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--captions", type=int, default=5, help="texts per image for the recall benchmark")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--query-chunk-size", type=int, default=DEFAULT_QUERY_CHUNK_SIZE)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs after one warm-up")
    args = parser.parse_args()
    device, dtype = pick_device(args.device), getattr(torch, args.dtype)
    queries = unit(args.queries, args.dim, 0, device, dtype)
    gallery = unit(args.gallery, args.dim, 1, device, dtype)
    flops = 2 * args.queries * args.gallery * args.dim
    blocks = (args.chunk_size, args.query_chunk_size)
    rows = []

    floor = timed(lambda: matmul_floor(queries, gallery, *blocks), device, args.repeat)
    rows.append({"stage": "matmul floor (blocks only)", **floor, "TFLOP/s": flops / floor["best_s"] / 1e12})
    with PeakMemory(device) as memory:
        topk = timed(lambda: topk_similarity(queries, gallery, args.k, *blocks), device, args.repeat)
    rows.append(
        {
            "stage": f"topk_similarity k={args.k}",
            **topk,
            "x floor": topk["best_s"] / floor["best_s"],
            "peak MiB": memory.peak_mib,
            "rise MiB": memory.rise_mib,
        }
    )

    # recall@k: args.queries images, args.captions texts each (texts = noisy copies of their image)
    n_texts = args.queries * args.captions
    owner = torch.arange(args.queries, device=device).repeat_interleave(args.captions)
    texts = F.normalize(queries[owner].float() + 0.05 * unit(n_texts, args.dim, 2, device, torch.float32), dim=-1).to(
        dtype
    )
    pair_flops = 2 * args.queries * n_texts * args.dim
    pair_floor = timed(lambda: matmul_floor(queries, texts, *blocks), device, args.repeat)
    rows.append(
        {
            "stage": f"matmul floor {args.queries}x{n_texts}",
            **pair_floor,
            "TFLOP/s": pair_flops / pair_floor["best_s"] / 1e12,
        }
    )
    with PeakMemory(device) as memory:
        recall = timed(
            lambda: chunked_retrieval_metrics(queries, texts, owner, chunk_size=blocks[0], query_chunk_size=blocks[1]),
            device,
            args.repeat,
        )
    rows.append(
        {
            "stage": "chunked_retrieval_metrics",
            **recall,
            "x floor": recall["best_s"] / pair_floor["best_s"],
            "peak MiB": memory.peak_mib,
            "rise MiB": memory.rise_mib,
        }
    )

    # correctness on a slice small enough for the dense matrix
    small = slice(0, min(2000, args.queries))
    dense_top = (queries[small].float() @ gallery.float().t()).topk(args.k, dim=1)
    blocked_top = topk_similarity(queries[small], gallery, args.k, *blocks)
    agree = (blocked_top[1] == dense_top.indices).float().mean().item()
    sub_owner = owner[: small.stop * args.captions]
    dense_recall = retrieval_metrics(queries[small].float() @ texts[: len(sub_owner)].float().t(), sub_owner)
    blocked_recall = chunked_retrieval_metrics(queries[small].float(), texts[: len(sub_owner)].float(), sub_owner)
    synchronize(device)

    dense_bytes = args.queries * args.gallery * 4
    block_bytes = args.chunk_size * args.query_chunk_size * torch.finfo(dtype).bits // 8
    print_table(
        f"Retrieval, {args.queries} x {args.gallery}, D={args.dim}, {args.dtype}, "
        f"blocks {blocks[1]}x{blocks[0]}, {device}",
        rows,
        ["stage", "best_s", "median_s", "x floor", "TFLOP/s", "peak MiB", "rise MiB"],
    )
    print(
        f"\nfull fp32 score matrix would be {dense_bytes / 2**20:.0f} MiB; one block is {block_bytes / 2**20:.0f} MiB"
    )
    print(f"top-{args.k} indices equal to the dense top-k on {small.stop} queries: {100 * agree:.2f}% of entries")
    print(f"chunked recall == dense recall on {small.stop} images: {blocked_recall == dense_recall}")
    write_results(
        "retrieval",
        {
            "machine": machine(device),
            "args": vars(args),
            "rows": rows,
            "dense_matrix_mib": dense_bytes / 2**20,
            "block_mib": block_bytes / 2**20,
            "topk_agreement_with_dense": agree,
            "chunked_recall_equals_dense": blocked_recall == dense_recall,
        },
    )


if __name__ == "__main__":
    main()
