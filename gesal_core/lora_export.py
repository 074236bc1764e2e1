"""Export a node's SVF z as a rank-k LoRA in PEFT's adapter format.

SVF changes each weight by ΔW = U diag(σ (z − 1)) Vᵀ. Keeping the k components with the
largest |σ (z − 1)| gives the best rank-k approximation of that ΔW among its singular
components, and it is exactly a LoRA:

    A = diag(σ_k (z_k − 1)) V_kᵀ   (k × in),     B = U_k   (out × k),     ΔW ≈ B A

so vLLM, SGLang, LoRAX or PEFT can serve a community's adapters without knowing SVF.
With ``lora_alpha = r`` PEFT's scaling is 1, so nothing else needs folding in.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from pathlib import Path

import torch

from .errors import GesalError
from .svf import SVFModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def top_components(svf: SVFModel, z: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Per layer, the indices of the k components with the largest |σ (z − 1)|."""
    if k < 1:
        raise GesalError("the LoRA rank k must be at least 1")
    z = svf.check_z(torch.as_tensor(z, dtype=torch.float32)).to(svf.device)
    out = {}
    for name, layer in svf.layers.items():
        effect = (layer.S.float() * (z[layer.z_slice] - 1)).abs()
        kk = min(k, layer.rank)
        out[name] = torch.topk(effect, kk).indices.sort().values
    return out


def lora_factors(
    svf: SVFModel, z: torch.Tensor, k: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{target name: (A (k × in), B (out × k))} in float32 on the CPU."""
    z = torch.as_tensor(z, dtype=torch.float32).to(svf.device)
    chosen = top_components(svf, z, k)
    factors = {}
    for name, layer in svf.layers.items():
        idx = chosen[name]
        scale = layer.S.float()[idx] * (z[layer.z_slice][idx] - 1)
        a = scale.unsqueeze(1) * layer.Vh.float()[idx]
        b = layer.U.float()[:, idx]
        factors[name] = (a.cpu().contiguous(), b.cpu().contiguous())
    return factors


def truncated_z(svf: SVFModel, z: torch.Tensor, k: int) -> torch.Tensor:
    """The z that the rank-k LoRA is exactly equivalent to: 1 outside the kept components."""
    z = torch.as_tensor(z, dtype=torch.float32).to(svf.device)
    out = torch.ones_like(z)
    for name, idx in top_components(svf, z, k).items():
        sl = svf.layers[name].z_slice
        out[sl][idx] = z[sl][idx]
    return out


def export_lora(
    svf: SVFModel,
    z: torch.Tensor,
    k: int,
    out_dir: str | Path,
    base_model: str,
    meta: dict[str, Hashable] | None = None,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` under ``out_dir``.

    ``base_model`` is what the serving stack should load the adapter onto (a hub id or a
    folder). Only ``nn.Linear``-layout targets are exported (Llama, Qwen, Mistral, Gemma).
    """
    from safetensors.torch import save_file

    factors = lora_factors(svf, z, k)
    rank = max(a.shape[0] for a, _ in factors.values())
    tensors = {}
    for name, (a, b) in factors.items():
        if a.shape[0] < rank:  # a layer with fewer components than k: pad with zeros
            a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,  # scaling = alpha / r = 1: B A is the whole ΔW
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in factors}),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt", **_str(meta)})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _str(meta: dict | None) -> dict[str, str]:
    return {f"gesal_{k}": str(v) for k, v in (meta or {}).items()}


@torch.inference_mode()
def logit_error(svf: SVFModel, z: torch.Tensor, k: int, input_ids: torch.Tensor) -> dict:
    """How far the rank-k LoRA's logits are from the full SVF adapter's.

    ``captured`` is 1 − ‖logits_k − logits_z‖ / ‖logits_base − logits_z‖: the share of the
    adapter's effect on the logits that rank k keeps (1.0 is exact).
    """
    z = torch.as_tensor(z, dtype=torch.float32)
    ids = input_ids.to(svf.device)
    logits = {}
    for name, zz in (("base", svf.ones()), ("full", z), ("k", truncated_z(svf, z, k))):
        with svf.factored(zz):
            logits[name] = svf.model(input_ids=ids).logits.float()
    diff = logits["k"] - logits["full"]
    effect = (logits["base"] - logits["full"]).norm()
    p_full = torch.log_softmax(logits["full"], -1)
    p_k = torch.log_softmax(logits["k"], -1)
    kl = (p_full.exp() * (p_full - p_k)).sum(-1).mean()
    return {
        "k": k,
        "max_abs_logit_error": float(diff.abs().max()),
        "rel_error": float(diff.norm() / effect.clamp_min(1e-12)),
        "captured": float(1 - diff.norm() / effect.clamp_min(1e-12)),
        "kl_full_to_k": float(kl),
    }
