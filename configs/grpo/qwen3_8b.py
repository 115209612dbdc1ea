"""GRPO of Qwen3-8B on TPU v5p-64 (32 chips, 8 hosts): the online recipe at real scale.

    # Plan first, on any machine with libtpu (no TPU, weights or data needed): the rollout
    # (sampling on the training mesh) and the update, memory per chip and FLOPs.
    jaxalign train --config configs/grpo/qwen3_8b.py --compile_only --topology v5p-64

    # Train; run on every worker of the slice (launch/tpu_pod.py does this):
    jaxalign train --config configs/grpo/qwen3_8b.py:hf=/mnt/qwen3-8b,data=/mnt/math \\
        --workdir gs://my-bucket/runs/grpo-qwen3-8b

Arguments (`configs/grpo/qwen3_8b.py:key=value,...`):
  hf    a Hugging Face model directory on every worker (config.json, *.safetensors,
        tokenizer.json, tokenizer_config.json), e.g. Qwen/Qwen3-8B downloaded with
        `huggingface-cli download`. The weights load straight into their shardings
        (`model.init_from="hf:DIR"`); the tokenizer is DIR/tokenizer.json (EOS `<|im_end|>`).
  data  a directory on every worker with train.jsonl and eval.jsonl prompt records
        ({"prompt": ..., "answer": ...}), e.g. a math set whose answers are short strings.
  steps RL steps (default 500).

The reward is `exact_match` on the record's "answer" (swap in your own rule rewards or a reward
model with `rl.rewards` / `rl.reward_model`). Layout: fsdp over all 32 chips (policy float32 +
AdamW state sharded ZeRO-3 style; the frozen reference for the k3 KL term shares the policy's
shardings), bfloat16 activations, full rematerialisation. A step: 64 prompts x 8 completions =
512 rows of up to 512 prompt + 1024 new tokens, sampled on the training mesh with the params in
their training shardings (nothing is copied or synced), then 4 updates of 128 rows (rl.minibatches)
in 4 micro-batches of 32 rows, one per chip (optimizer.grad_accum). `--compile_only` plans both
programs; the README lists what they need per chip.
"""

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, hf="/path/to/Qwen3-8B", data="/path/to/prompts", steps=500)
    c = base_config()
    c.trainer = "grpo"
    c.model.preset = "qwen3-8b"  # the architecture used when planning without the weights
    c.model.init_from = f"hf:{arg.hf}"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.tokenizer = f"{arg.hf}/tokenizer.json"

    c.data.train = f"{arg.data}/train.jsonl"
    c.data.eval = f"{arg.data}/eval.jsonl"
    c.data.template = "chatml"
    c.data.batch_size = 64  # prompts per step, global
    c.data.max_prompt_len = 512

    c.rl.group_size = 8
    c.rl.max_new_tokens = 1024
    c.rl.temperature = 1.0
    c.rl.rewards = (("exact_match", 1.0, {"field": "answer"}),)
    c.rl.minibatches = 4  # 4 updates of 128 rows per step
    c.rl.epochs = 1
    c.rl.kl_coef = 0.04
    c.rl.clip_low = 0.2
    c.rl.clip_high = 0.2

    c.optimizer.lr = 1e-6
    c.optimizer.warmup_steps = 10
    c.optimizer.end_lr_ratio = 1.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.clip_norm = 1.0
    c.optimizer.grad_accum = 4  # 32 rows per micro-batch: one per chip

    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.sharding = "fsdp"

    c.steps = arg.steps
    c.log_every = 1
    c.eval_every = 50
    c.eval_batches = 4
    c.checkpoint.every = 50
    c.checkpoint.keep = 2
    c.lock()
    return c
