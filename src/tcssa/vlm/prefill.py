"""Language-model prefill cost with K slot tokens against N patch tokens (``tcssa vqa prefill``).

The slide occupies T positions of the prompt (T = 32 slot tokens, or one token per patch). For each T
this measures, on the language model alone (the projector and compressor cost is not included):

- FLOPs of one prefill forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls
  plus scaled-dot-product attention; causal masking is not subtracted, as torch's formula counts it);
- time of that pass (median of ``repeats`` after one warm-up), in inference mode: on a GPU wall
  time between synchronisations; on a CPU this process's CPU time, which other jobs on a shared
  machine do not inflate (run it with one thread so that CPU time is the time a core spends).

Only the last position's logits are computed, as in generation's prefill.
"""

from __future__ import annotations

import csv
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm.auto import tqdm

TEXT_TOKENS = 64  # the question and options around the slide span


@dataclass
class PrefillMeasurement:
    slide_tokens: int
    sequence_length: int
    gflops: float
    seconds: float
    flops_ratio_vs_first: float
    time_ratio_vs_first: float


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_flop_mapping() -> dict:
    # torch's counter knows its CUDA attention kernels; the CPU kernel does the same arithmetic.
    cpu_kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {cpu_kernel: _cpu_attention_flops} if cpu_kernel is not None else {}


def default_small_lm():
    """The offline default model's architecture (hidden 128, 2 layers), randomly initialised."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tcssa.vlm.tiny_lm import TinyLMConfig

    size = TinyLMConfig()
    config = Qwen2Config(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        max_position_embeddings=65_536,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@torch.inference_mode()
def measure_prefill(lm, slide_token_counts: list[int], repeats: int = 3, progress: bool = True):
    lm.eval()
    param = next(lm.parameters())
    hidden = lm.config.hidden_size
    results = []
    for count in tqdm(slide_token_counts, desc="prefill", disable=not progress):
        length = count + TEXT_TOKENS
        embeds = torch.randn(1, length, hidden, dtype=param.dtype, device=param.device)
        counter = FlopCounterMode(display=False, custom_mapping=_attention_flop_mapping())
        with counter:
            lm(inputs_embeds=embeds, use_cache=False, logits_to_keep=1)
        lm(inputs_embeds=embeds, use_cache=False, logits_to_keep=1)  # warm-up, untimed
        clock = time.perf_counter if param.is_cuda else time.process_time
        times = []
        for _ in range(repeats):
            if param.is_cuda:
                torch.cuda.synchronize()
            start = clock()
            lm(inputs_embeds=embeds, use_cache=False, logits_to_keep=1)
            if param.is_cuda:
                torch.cuda.synchronize()
            times.append(clock() - start)
        results.append((count, length, counter.get_total_flops() / 1e9, statistics.median(times)))
    base_flops, base_time = results[0][2], results[0][3]
    return [PrefillMeasurement(c, n, g, s, g / base_flops, s / base_time) for c, n, g, s in results]


def run_prefill_benchmark(
    lm_path: str | Path | None,
    slide_token_counts: list[int],
    out: str | Path | None,
    repeats: int = 3,
    threads: int | None = None,
) -> list[PrefillMeasurement]:
    if threads:
        torch.set_num_threads(threads)
    if lm_path:
        from tcssa.vlm.checkpoint import load_base_lm

        lm, _ = load_base_lm(lm_path)
    else:
        lm = default_small_lm()
    counts = sorted(set(slide_token_counts))
    measurements = measure_prefill(lm, counts, repeats)
    print("| slide tokens | sequence | GFLOPs | x FLOPs | time (s) | x time |")
    print("|---:|---:|---:|---:|---:|---:|")
    for m in measurements:
        print(
            f"| {m.slide_tokens:,} | {m.sequence_length:,} | {m.gflops:,.2f} | {m.flops_ratio_vs_first:,.1f} "
            f"| {m.seconds:.4f} | {m.time_ratio_vs_first:,.1f} |"
        )
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(asdict(measurements[0])))
            writer.writeheader()
            writer.writerows(asdict(m) for m in measurements)
    return measurements
