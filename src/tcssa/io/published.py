"""The published TC-SSA code's checkpoint layout, read and written.

The published code keeps a ``gate`` linear layer and one ``experts.{k}.net`` MLP per slot
(``0``: fc D->H, ``3``: fc H->D, ``4``: LayerNorm), with fc weights stored (out, in).
``tcssa.TCSSA`` stacks the K experts into single tensors stored (in, out) so that one batched
matmul applies them all; this module converts between the two, so published checkpoints load
(``from_published``, ``load_published``) and ours export back (``to_published``).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from tcssa.method.compressor import TCSSA

_EXPERT_KEY = re.compile(r"^experts\.(\d+)\.net\.(0|3|4)\.(weight|bias)$")
_STACKED = ("w1", "b1", "w2", "b2", "ln_weight", "ln_bias")
_TRANSPOSED = ("w1", "w2")  # (out, in) in the published layout, (in, out) in ours


def to_published(model: TCSSA, prefix: str = "") -> dict[str, Tensor]:
    """``model``'s weights under the published code's names, each a fresh tensor."""
    e = model.experts
    out = {
        f"{prefix}gate.weight": model.gate.weight.detach().clone(),
        f"{prefix}gate.bias": model.gate.bias.detach().clone(),
    }
    for k in range(model.num_slots):
        base = f"{prefix}experts.{k}.net."
        out[base + "0.weight"] = e.w1[k].detach().t().contiguous()
        out[base + "0.bias"] = e.b1[k].detach().clone()
        out[base + "3.weight"] = e.w2[k].detach().t().contiguous()
        out[base + "3.bias"] = e.b2[k].detach().clone()
        out[base + "4.weight"] = e.ln_weight[k].detach().clone()
        out[base + "4.bias"] = e.ln_bias[k].detach().clone()
    return out


def load_published(model: TCSSA, state_dict: dict) -> TCSSA:
    """Copy a published-code checkpoint into ``model`` (its D, K and H must match); returns ``model``.

    Accepts the bare compressor keys, keys under a prefix such as ``compressor.``, and a
    training checkpoint that wraps them in ``model_state_dict`` or ``state_dict``.
    """
    weights = read_published(state_dict)
    num_slots, hidden, dim = weights["w1"].shape
    if (dim, num_slots, hidden) != (model.dim, model.num_slots, model.experts.hidden):
        raise ValueError(
            f"reference checkpoint has D={dim}, K={num_slots}, H={hidden}, but this TCSSA has "
            f"D={model.dim}, K={model.num_slots}, H={model.experts.hidden}"
        )
    with torch.no_grad():
        model.gate.weight.copy_(weights["gate_weight"])
        model.gate.bias.copy_(weights["gate_bias"])
        for name in _STACKED:
            value = weights[name]
            getattr(model.experts, name).copy_(value.transpose(1, 2) if name in _TRANSPOSED else value)
    return model


def from_published(state_dict: dict, **config) -> TCSSA:
    """A TCSSA with D, K and H read off a published-code checkpoint, its weights loaded."""
    num_slots, hidden, dim = read_published(state_dict)["w1"].shape
    return load_published(TCSSA(dim, num_slots=num_slots, expert_hidden=hidden, **config), state_dict)


def read_published(state_dict: dict) -> dict[str, Tensor]:
    """The gate and the K experts of a published-code checkpoint, experts stacked (K, out, in).

    Finds the compressor under any prefix and inside a ``model_state_dict``/``state_dict``/``model``
    wrapper; raises ValueError naming what is missing or inconsistent.
    """
    for wrapper in ("model_state_dict", "state_dict", "model"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    # The compressor's prefix is the one under which both the gate and expert 0 live (a
    # classifier in the same checkpoint may have a "gate" of its own).
    prefixes = {
        key[: -len("gate.weight")]
        for key in state_dict
        if key.endswith("gate.weight") and key[: -len("gate.weight")] + "experts.0.net.0.weight" in state_dict
    }
    if len(prefixes) != 1:
        found = "none" if not prefixes else f"several: {sorted(prefixes)}"
        raise ValueError(
            "not a TC-SSA reference checkpoint: expected one '[prefix]gate.weight' with "
            f"'[prefix]experts.0.net.0.weight' beside it, found {found}"
        )
    prefix = prefixes.pop()
    experts: dict[int, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        match = _EXPERT_KEY.match(key[len(prefix) :])
        if match:
            k, layer, kind = match.groups()
            experts.setdefault(int(k), {})[f"{layer}.{kind}"] = value
    if not experts or sorted(experts) != list(range(len(experts))):
        raise ValueError(
            f"reference checkpoint under prefix {prefix!r} has expert indices {sorted(experts)}; "
            "expected experts.0 .. experts.K-1"
        )
    gate_weight = state_dict[prefix + "gate.weight"]
    gate_bias = state_dict.get(prefix + "gate.bias")
    if gate_bias is None:
        gate_bias = torch.zeros(gate_weight.shape[0], dtype=gate_weight.dtype)
    if len(experts) != gate_weight.shape[0]:
        raise ValueError(
            f"reference checkpoint has a gate for {gate_weight.shape[0]} slots but {len(experts)} experts"
        )
    needed = ("0.weight", "0.bias", "3.weight", "3.bias", "4.weight", "4.bias")
    for k, parts in experts.items():
        missing = [n for n in needed if n not in parts]
        if missing:
            raise ValueError(f"reference checkpoint: expert {k} lacks {missing} (prefix {prefix!r})")
    stack = lambda name: torch.stack([experts[k][name] for k in range(len(experts))])  # noqa: E731
    return {
        "gate_weight": gate_weight,
        "gate_bias": gate_bias,
        "w1": stack("0.weight"),
        "b1": stack("0.bias"),
        "w2": stack("3.weight"),
        "b2": stack("3.bias"),
        "ln_weight": stack("4.weight"),
        "ln_bias": stack("4.bias"),
    }
