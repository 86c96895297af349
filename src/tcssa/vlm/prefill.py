"""Language-model prefill cost with K slot tokens against N patch tokens (``tcssa vqa prefill``).

The slide occupies T positions of the prompt (T = 32 slot tokens, or one token per patch). For each T
this measures, on the language model alone (the projector and compressor cost is not included):

- FLOPs of one prefill forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls
  plus scaled-dot-product attention; causal masking is not subtracted, as torch's formula counts it);
- time of that pass (median of ``repeats`` after one warm-up), in inference mode: on a GPU wall
  time between synchronisations; on a CPU this process's CPU time, which other jobs on a shared
  machine do not inflate (run it with one thread so that CPU time is the time a core spends).

Only the last position's logits are computed, as in generation's prefill.

The offline default LM (hidden 128, 2 layers) is far smaller than a real one, so its ratios do not
transfer. Per layer the projections and MLP cost about 2 T D (2 D + 2 D_kv + 3 I) and attention 4 T^2 D:
attention, the part quadratic in T, overtakes the linear part once T > D + D_kv + 1.5 I: soon in
the toy (T > 768) but only at 8,320 (Qwen2.5-0.5B) or 32,512 (Qwen2.5-7B) in real models. So at
N = 38,400 patches against K = 32 slots (64 text tokens in both prompts, sequence lengths 400x apart)
the toy reports 18,084x the FLOPs, Qwen2.5-0.5B 2,219x and Qwen2.5-7B 871x.
``prefill_flops_table`` therefore gives the FLOPs for the published Qwen2.5-0.5B and Qwen2.5-7B
architectures (``PUBLISHED_LM_CONFIGS``), both in closed form (``analytic_prefill_flops``) and counted
by the same FlopCounterMode on a model built on the meta device (``counted_prefill_flops``: no weights,
no memory, no time measured). ``run_prefill_benchmark`` does that when ``lm_path`` is one of those names
and not a local folder (``tcssa vqa prefill --lm Qwen2.5-7B``).
"""

from __future__ import annotations

# transformers comes with the optional `vlm` extra: imported where it is used.
import csv
import inspect
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm.auto import tqdm

from tcssa.vlm.checkpoint import load_base_lm
from tcssa.vlm.language_models import resolve_lm
from tcssa.vlm.tiny_lm import TinyLMConfig

TEXT_TOKENS = 64  # the question and options around the slide span
LONG_PREFILL = 2048  # sequences longer than this are timed without a warm-up pass


@dataclass
class PrefillMeasurement:
    slide_tokens: int
    sequence_length: int
    gflops: float
    seconds: float
    flops_ratio_vs_first: float
    time_ratio_vs_first: float


#: The architecture fields of the published configs (config.json of huggingface.co/Qwen/Qwen2.5-0.5B and
#: huggingface.co/Qwen/Qwen2.5-7B; the -Instruct models share them). Prefill FLOPs depend on nothing else.
PUBLISHED_LM_CONFIGS: dict[str, dict] = {
    "Qwen2.5-0.5B": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "max_position_embeddings": 32768,
    },
    "Qwen2.5-7B": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
    },
}


def published_lm_name(name: str | Path | None) -> str | None:
    """The key of ``PUBLISHED_LM_CONFIGS`` that ``name`` spells (any case, optional ``Qwen/``), else None."""
    if name is None:
        return None
    text = str(name).strip().lower().removeprefix("qwen/")
    return next((key for key in PUBLISHED_LM_CONFIGS if key.lower() == text), None)


def published_lm_config(name: str):
    """A ``transformers.Qwen2Config`` with a published model's architecture."""
    from transformers import Qwen2Config  # the optional vlm extra

    key = published_lm_name(name)
    if key is None:
        raise ValueError(f"unknown published LM {name!r}; choose from {sorted(PUBLISHED_LM_CONFIGS)}")
    return Qwen2Config(**PUBLISHED_LM_CONFIGS[key])


def analytic_prefill_flops(config, sequence_length: int, logits_to_keep: int = 1) -> int:
    """FLOPs of one prefill pass of a Qwen2/Llama-style decoder, counted as FlopCounterMode counts them.

    2 m n k per matmul (a bias add, norms, RoPE, activations are not counted): per layer the q, k, v, o
    projections and the three MLP matmuls, 2 T D (2 D + 2 D_kv) + 6 T D I, and attention's QK^T and PV,
    4 T^2 D (torch's formula; the causal half is not subtracted); then the vocabulary projection of the
    ``logits_to_keep`` last positions, 2 L D V. T = sequence_length, D hidden, I intermediate, D_kv the
    key/value width (heads_kv x head_dim).
    """
    t, d, i = sequence_length, config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q_width = config.num_attention_heads * head_dim
    kv_width = config.num_key_value_heads * head_dim
    projections = 2 * t * d * (2 * q_width + 2 * kv_width)
    mlp = 6 * t * d * i
    attention = 4 * t * t * q_width
    lm_head = 2 * min(logits_to_keep, t) * d * config.vocab_size
    return config.num_hidden_layers * (projections + mlp + attention) + lm_head


def meta_lm(config):
    """The causal LM of ``config`` on the meta device: shapes only, no weights and no memory."""
    from transformers import AutoModelForCausalLM  # the optional vlm extra

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).eval()


@torch.inference_mode()
def counted_prefill_flops(lm, sequence_length: int, logits_to_keep: int = 1) -> int:
    """FlopCounterMode's count for one prefill pass of ``lm`` (e.g. from ``meta_lm``) on T positions.

    An empty KV cache is passed, as generation's prefill does; it also keeps transformers from reading
    values of the position ids (a packed-sequence check), which meta tensors do not have.
    """
    from transformers import DynamicCache  # the optional vlm extra

    param = next(lm.parameters())
    embeds = torch.zeros(1, sequence_length, lm.config.hidden_size, dtype=param.dtype, device=param.device)
    cache_argument = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    counter = FlopCounterMode(display=False, custom_mapping=_attention_flop_mapping())
    with counter:
        lm(
            inputs_embeds=embeds,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{cache_argument: DynamicCache()},
        )
    return counter.get_total_flops()


@dataclass
class PrefillFlops:
    model: str
    patch_tokens: int  # N, one token per patch
    slot_tokens: int  # K
    text_tokens: int  # the question around the slide span, in both prompts
    flops_slots: int  # prefill of K + text tokens
    flops_patches: int  # prefill of N + text tokens
    ratio: float  # flops_patches / flops_slots
    counted: bool  # True: FlopCounterMode on the meta model (equal to the closed form); False: closed form


def prefill_flops_table(
    models: Sequence[str] = tuple(PUBLISHED_LM_CONFIGS),
    patch_counts: Sequence[int] = (1_000, 10_000, 38_400),
    slot_tokens: int = 32,
    text_tokens: int = TEXT_TOKENS,
    count: bool = True,
) -> list[PrefillFlops]:
    """Prefill FLOPs with K slot tokens against N patch tokens for published LM architectures.

    With ``count`` each value is counted by FlopCounterMode on the meta-device model, and checked
    against ``analytic_prefill_flops`` (a mismatch raises: the closed form would be wrong for this
    transformers version); without it the closed form alone is used (instant).
    """
    rows = []
    for name in models:
        config = published_lm_config(name)
        lm = meta_lm(config) if count else None

        base = _checked_flops(name, config, lm, slot_tokens + text_tokens)
        for n in patch_counts:
            total = _checked_flops(name, config, lm, n + text_tokens)
            key = published_lm_name(name)
            rows.append(PrefillFlops(key, n, slot_tokens, text_tokens, base, total, total / base, count))
    return rows


def _checked_flops(name: str, config, lm, length: int) -> int:
    """The closed form; with a meta model also the count, which must equal it."""
    expected = analytic_prefill_flops(config, length)
    if lm is None:
        return expected
    counted = counted_prefill_flops(lm, length)
    if counted != expected:
        raise RuntimeError(
            f"{name}, T = {length}: FlopCounterMode counts {counted:,} FLOPs, the closed form "
            f"{expected:,}; the model's layers differ from what analytic_prefill_flops assumes"
        )
    return counted


def _print_flops_table(rows: Sequence[PrefillFlops]) -> None:
    print("| model | N patches | TFLOPs, K slots | TFLOPs, N patches | x FLOPs |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.model} | {r.patch_tokens:,} | {r.flops_slots / 1e12:,.3f} | {r.flops_patches / 1e12:,.1f} "
            f"| {r.ratio:,.1f} |"
        )


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_flop_mapping() -> dict:
    # torch's counter knows its CUDA attention kernels; the CPU kernel does the same arithmetic.
    cpu_kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {cpu_kernel: _cpu_attention_flops} if cpu_kernel is not None else {}


def default_small_lm():
    """The offline default model's architecture (hidden 128, 2 layers), randomly initialised."""
    from transformers import AutoModelForCausalLM, Qwen2Config  # the optional vlm extra

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
def measure_prefill(
    lm,
    slide_token_counts: list[int],
    repeats: int = 3,
    progress: bool = True,
    max_timed_tokens: int | None = None,
):
    """FLOPs and time per slide-token count; counts above ``max_timed_tokens`` get their FLOPs counted
    on a meta-device copy of the architecture and no time (a 38,400-token prefill of even a 135M LM
    takes the better part of an hour on two CPU cores)."""
    lm.eval()
    param = next(lm.parameters())
    hidden = lm.config.hidden_size
    results = []
    for count in tqdm(slide_token_counts, desc="prefill", disable=not progress):
        length = count + TEXT_TOKENS
        if max_timed_tokens is not None and count > max_timed_tokens:
            results.append((count, length, counted_prefill_flops(meta_lm(lm.config), length) / 1e9, math.nan))
            continue
        embeds = torch.randn(1, length, hidden, dtype=param.dtype, device=param.device)
        if length > LONG_PREFILL:
            # Minutes per pass: the FLOPs come from the meta-device copy (the same count, no compute),
            # and a pass this long needs no warm-up to be timed fairly.
            flops = counted_prefill_flops(meta_lm(lm.config), length)
        else:
            counter = FlopCounterMode(display=False, custom_mapping=_attention_flop_mapping())
            with counter:
                lm(inputs_embeds=embeds, use_cache=False, logits_to_keep=1)
            flops = counter.get_total_flops()
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
        results.append((count, length, flops / 1e9, statistics.median(times)))
    base_flops, base_time = results[0][2], results[0][3]
    return [PrefillMeasurement(c, n, g, s, g / base_flops, s / base_time) for c, n, g, s in results]


def run_prefill_benchmark(
    lm_path: str | Path | None,
    slide_token_counts: list[int],
    out: str | Path | None,
    repeats: int = 3,
    threads: int | None = None,
    max_timed_tokens: int | None = None,
) -> list[PrefillMeasurement]:
    if threads:
        torch.set_num_threads(threads)
    published = published_lm_name(lm_path)
    if published is not None and not Path(lm_path).exists():
        return _published_prefill(published, slide_token_counts, out)
    if lm_path:
        lm, _ = load_base_lm(resolve_lm(lm_path))
    else:
        lm = default_small_lm()
    counts = sorted(set(slide_token_counts))
    measurements = measure_prefill(lm, counts, repeats, max_timed_tokens=max_timed_tokens)
    print("| slide tokens | sequence | GFLOPs | x FLOPs | time (s) | x time |")
    print("|---:|---:|---:|---:|---:|---:|")
    for m in measurements:
        print(
            f"| {m.slide_tokens:,} | {m.sequence_length:,} | {m.gflops:,.2f} | {m.flops_ratio_vs_first:,.1f} "
            f"| {m.seconds:.4f} | {m.time_ratio_vs_first:,.1f} |"
        )
    if out:
        _write_csv(out, measurements)
    return measurements


def _published_prefill(name: str, slide_token_counts: list[int], out) -> list[PrefillMeasurement]:
    """``run_prefill_benchmark`` for a published architecture: FLOPs counted on the meta device, no time."""
    counts = sorted(set(slide_token_counts))
    config = published_lm_config(name)
    lm = meta_lm(config)
    flops = [counted_prefill_flops(lm, c + TEXT_TOKENS) for c in counts]
    measurements = [
        PrefillMeasurement(c, c + TEXT_TOKENS, f / 1e9, math.nan, f / flops[0], math.nan)
        for c, f in zip(counts, flops, strict=True)
    ]
    print(f"{name} (published architecture, meta device: FLOPs only, no weights, nothing timed)")
    print("| slide tokens | sequence | GFLOPs | x FLOPs |")
    print("|---:|---:|---:|---:|")
    for m in measurements:
        print(
            f"| {m.slide_tokens:,} | {m.sequence_length:,} | {m.gflops:,.2f} "
            f"| {m.flops_ratio_vs_first:,.1f} |"
        )
    if out:
        _write_csv(out, measurements)
    return measurements


def _write_csv(out, measurements: list[PrefillMeasurement]) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(measurements[0])))
        writer.writeheader()
        writer.writerows(asdict(m) for m in measurements)
