"""Export a training run's adapters: Orbax (adapters only), our safetensors, stock PEFT LoRA,
the original SocialAlign layout (experts and gates), or base weights with the adapters merged in.

Merging folds the adapter into W0 only where the result is the same function of the input:
with gate weights that do not depend on the input, delta = x (sum_i gA_i A_i)(sum_j gB_j B_j) s,
one rank-r product. That holds when each side has one expert (plain LoRA: its softmax is 1)
or is ungated (`uniform` routing: 1/E each). `token` and `pooled` gates read the user and
news spans, so no fixed W' reproduces them; those exports are refused with the reason.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

from socialalign_jax.core.atomic_io import atomic_files_into, write_json
from socialalign_jax.core.errors import UserError
from socialalign_jax.inference.generation import sampling_config, stop_tokens_for
from socialalign_jax.model import pac_lora
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import MODULE_BLOCK, LoraConfig
from socialalign_jax.runs.restore import SKILL_FILE
from socialalign_jax.weights.adapters import (_lora_to_json, _model_dims, input_dependent_gates,
                                              peft_refusal)
from socialalign_jax.weights.resolve import parse_spec, smollm2_path
from socialalign_jax.weights.tokenizer import CHATML_TEMPLATE, ENDOFTEXT, IM_END

if TYPE_CHECKING:
    from socialalign_jax.runs.restore import Run

FORMATS = ("orbax", "safetensors", "peft", "socialalign", "merged")
ORBAX_DIR = "adapters"
ORBAX_META = "adapter_config.json"
ORBAX_FORMAT = "socialalign-orbax-adapters/1"
GENERATION_CONFIG = "generation_config.json"


class ExportError(UserError):
    """A run or adapter that cannot be exported in the requested format (the message says why)."""


# ----------------------------------------------------------------------------- merging


def merge_refusal(lc: LoraConfig) -> str | None:
    """Why these adapters cannot be merged into fixed weights, or None if they can."""

    gated = input_dependent_gates(lc)
    if not gated:
        return None
    return (f"routing {lc.routing!r}: " + " and ".join(gated) + " with weights that depend on the input "
            "(the user/news spans), so no fixed merged weight reproduces it; merging is exact only for plain "
            "LoRA (num_analyze = num_compose = 1) or routing 'uniform'; export --format safetensors or "
            "socialalign instead")


# What `--format socialalign` prints: its files look like a PEFT adapter, and stock PEFT reads them
# without an error but silently wrong (it finds none of its keys, so it runs the base model alone).
SOCIALALIGN_NOTE = ("{out} is the original SocialAlign layout, for the authors' patched PEFT only: stock PEFT loads "
                    "it without an error but computes other outputs (it ignores the experts and gates); for stock "
                    "PEFT export a plain-LoRA or routing 'uniform' run with --format peft")


def base_model_path(cfg) -> str | None:
    """What a stock PEFT adapter_config.json names as its base: the run's hf: directory or GGUF file
    (absolute), or None for random weights, which no stock loader can rebuild."""
    scheme, arg = parse_spec(str(cfg.model.weights))
    if scheme == "hf":
        return str(Path(arg).absolute())
    if scheme == "gguf":
        return str(Path(smollm2_path() if arg == "smollm2" else arg).absolute())
    return None


def peft_base_refusal(cfg, base_model: str | None) -> str | None:
    """Why a peft export of this run cannot name its base (random weights, no --base_model), or None."""
    if base_model or base_model_path(cfg) is not None:
        return None
    return (f"the run's base is {cfg.model.weights} (random weights, saved nowhere a stock loader can read), so "
            "adapter_config.json could not name it and AutoPeftModelForCausalLM would look for it on the hub; pass "
            "--base_model DIR (a Hugging Face checkpoint of those weights), or export --format merged, which holds "
            "the weights themselves")


def merge_adapters(params, adapters, lc: LoraConfig, model_cfg: ModelConfig):
    """Base params with W' = W0 + s mean_i(A_i) mean_j(B_j) per layer and target (float32 sum, base dtype out).

    The mean is the fixed gate weight: 1/E for an ungated side, and 1 (E = 1) for a gated
    single expert whose softmax is constant (`pac_lora.merged_kernel`, which the CPU decode loop
    also uses).
    """

    why = merge_refusal(lc)
    if why:
        raise ExportError(f"cannot merge: {why}")
    out = jax.tree.map(lambda x: x, params)  # new dict containers; untouched leaves are shared
    for target in lc.targets:
        block = MODULE_BLOCK[target]
        lin = out["layers"][block][target]
        lin["kernel"] = pac_lora.merged_kernel(lin["kernel"], adapters["layers"][block][target], lc)  # [L, d_in, d_out]
    return out


# ----------------------------------------------------------------------------- writers


def save_orbax_adapters(adapters, lc: LoraConfig, model_cfg: ModelConfig, out: str | os.PathLike) -> Path:
    """Adapter tree only (no optimizer state) as an Orbax checkpoint, plus its LoraConfig as JSON."""
    import orbax.checkpoint as ocp

    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    target = out / ORBAX_DIR
    if target.exists():
        raise ExportError(f"{target}: already exists; choose an empty --out")
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(target, jax.tree.map(np.asarray, adapters))
    ckpt.wait_until_finished()
    meta = {"format": ORBAX_FORMAT, "lora_config": json.loads(_lora_to_json(lc)),
            "model_dims": _model_dims(model_cfg)}
    write_json(meta, out / ORBAX_META, indent=2, sort_keys=True)
    return target


def is_orbax_export(path: str | os.PathLike) -> bool:
    """A directory `save_orbax_adapters` wrote (its `adapters/` checkpoint): a PEFT or socialalign
    export also has an adapter_config.json, so that file alone says nothing."""
    return (Path(path) / ORBAX_DIR).is_dir()


def load_orbax_adapters(path: str | os.PathLike) -> tuple[dict, LoraConfig]:
    """Read what `save_orbax_adapters` wrote -> (adapter tree of numpy arrays, LoraConfig).
    A damaged or foreign adapter_config.json is one line naming the file and field."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta_path = path / ORBAX_META
    if not meta_path.is_file():
        raise ExportError(f"{meta_path}: not found; not an adapter export made with --format orbax")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"{meta_path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != ORBAX_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ExportError(f"{meta_path}: field 'format': expected {ORBAX_FORMAT!r} (an export made with "
                          f"--format orbax), got {got!r}")
    lc = meta.get("lora_config")
    if not isinstance(lc, dict):
        raise ExportError(f"{meta_path}: field 'lora_config': missing (an export made with --format orbax has it)")
    try:
        lora_cfg = LoraConfig(**dict(lc, targets=tuple(lc.get("targets", ()))))
    except (TypeError, ValueError) as e:
        raise ExportError(f"{meta_path}: field 'lora_config': {e}") from None
    tree = ocp.StandardCheckpointer().restore(path / ORBAX_DIR)
    return jax.tree.map(np.asarray, tree), lora_cfg


def export_run(run: Run, fmt: str, out: str | os.PathLike, *, base_model: str | None = None) -> list[Path]:
    """Write `run`'s adapters to `out` in one of FORMATS; returns the main files written.

    base_model: base_model_name_or_path for the stock PEFT config (default: the run's hf: directory).
    """
    from socialalign_jax.weights import adapters, hf  # lazy: transformers (seconds to import), only for the HF/PEFT formats

    if fmt not in FORMATS:
        raise ExportError(f"unknown --format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out = Path(out)
    lc, mc = run.lora_cfg, run.model_cfg
    if fmt == "orbax":
        return [save_orbax_adapters(run.adapters, lc, mc, out)]
    if fmt == "safetensors":
        return [adapters.save_adapters(run.adapters, lc, mc, out)]
    if fmt == "socialalign":
        return [adapters.export_socialalign(run.adapters, lc, mc, out)]
    if fmt == "peft":
        why = peft_refusal(lc) or peft_base_refusal(run.cfg, base_model)
        if why:
            raise ExportError(f"--format peft: {why}")
        return [adapters.export_peft(run.adapters, lc, mc, out,
                                     base_model_name_or_path=base_model or base_model_path(run.cfg))]
    why = merge_refusal(lc)
    if why:
        raise ExportError(f"--format merged: {why}")
    merged = merge_adapters(run.params, run.adapters, lc, mc)
    tok = run.tokenizer
    token_ids, gen = ({}, None) if tok is None else hf_generation_settings(run.cfg, tok, mc.vocab_size)
    hf.save_hf_checkpoint(merged, mc, out, token_ids=token_ids)
    written = [out / hf.SINGLE_FILE if (out / hf.SINGLE_FILE).exists() else out]
    if "head" in run.adapters:  # the sentiment head is not part of an HF causal LM: keep it beside
        adapters.save_adapters_head(run.adapters["head"], out / adapters.HEAD_FILE)
        written.append(out / adapters.HEAD_FILE)
    if tok is not None:
        if not getattr(tok, "chat_template", None):  # the ChatML every prompt here was trained with
            tok = copy.copy(tok)
            tok.chat_template = CHATML_TEMPLATE
        with atomic_files_into(out) as tmp:  # tokenizer.json etc.: each file whole or absent
            tok.save_pretrained(tmp)
        write_json(gen, str(out / GENERATION_CONFIG), indent=2)
        written.append(out / GENERATION_CONFIG)
    return written


def carry_track_record(workdir: str | os.PathLike, step: int, out: str | os.PathLike) -> list[Path]:
    """Copy the run's forecast_skill.json (evaluation/skill.py) beside an export of the step it describes,
    so `Predictor.from_adapters` prints the same track record and applies the same shrink; an export of
    another step (or of a run without one) carries none, and its forecasts say they are unmeasured."""
    src = Path(workdir) / SKILL_FILE
    try:
        rec = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(rec, dict) or rec.get("step") != step:
        return []
    write_json(rec, str(Path(out) / SKILL_FILE))
    return [Path(out) / SKILL_FILE]


def hf_generation_settings(cfg, tokenizer, vocab_size: int) -> tuple[dict, dict]:
    """(bos/eos/pad ids for config.json, generation_config.json) of a merged export.

    eos stops a reply where our sampler stops it (generation.stop_tokens_for: <|im_end|> first,
    then the tokenizer's eos and <|endoftext|>); pad is the tokenizer's; the sampling defaults
    are the run's `sample` section, so `model.generate(**inputs)` decodes as launch/generate.py.
    """

    def known(name):
        t = tokenizer.convert_tokens_to_ids(name)
        return t if t is not None and t != getattr(tokenizer, "unk_token_id", None) and t < vocab_size else None

    im_end = known(IM_END)
    stops = [t for t in stop_tokens_for(tokenizer) if t < vocab_size]
    stops = sorted(stops, key=lambda t: t != im_end)  # <|im_end|> first: config.json's single eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else known(ENDOFTEXT)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else known(ENDOFTEXT)
    ids = {"bos_token_id": bos, "eos_token_id": stops[0] if stops else None, "pad_token_id": pad}
    s = sampling_config(cfg, tokenizer, pad if pad is not None else 0)
    gen = {"bos_token_id": bos, "eos_token_id": stops, "pad_token_id": pad, "do_sample": not s.greedy,
           "max_new_tokens": s.max_new_tokens, "repetition_penalty": s.repetition_penalty}
    if not s.greedy:
        gen.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    return {k: v for k, v in ids.items() if v is not None}, gen


__all__ = ["FORMATS", "ExportError", "merge_refusal", "peft_refusal", "peft_base_refusal", "SOCIALALIGN_NOTE",
           "merge_adapters", "base_model_path",
           "save_orbax_adapters", "load_orbax_adapters", "is_orbax_export", "export_run"]
