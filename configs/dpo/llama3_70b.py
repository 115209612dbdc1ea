"""DPO of Llama 3.1 70B (Instruct) on TPU v5p-256 (128 chips, 32 hosts).

    # Plan first, on any machine with libtpu (no TPU, weights or data needed):
    jaxalign train --config configs/dpo/llama3_70b.py --compile_only --topology v5p-256

    # Train; run on every worker of the slice (launch/tpu_pod.py does this):
    jaxalign train --config configs/dpo/llama3_70b.py:hf=/mnt/llama-70b,data=/mnt/prefs \\
        --workdir gs://my-bucket/runs/dpo-llama3-70b

Arguments (`configs/dpo/llama3_70b.py:key=value,...`), as in configs/dpo/llama3_8b.py:
  hf    a Hugging Face model directory on every worker (config.json, *.safetensors,
        tokenizer.json), e.g. meta-llama/Llama-3.1-70B-Instruct; loaded straight into its
        shardings (`model.init_from="hf:DIR"`), tokenizer DIR/tokenizer.json.
  data  a directory on every worker with train.jsonl and eval.jsonl preference pairs.
  steps optimizer updates (default 500).

Layout: fsdp over all 128 chips, float32 master weights and AdamW state, the frozen reference in
the same shardings, bfloat16 activations, full rematerialisation. 128 pairs x 2048 tokens per step
= 256 sequences, 2 per chip, 524,288 tokens/step. Run the compile-only command above to see the
memory per chip before asking for the slice (the README's table lists it).
"""

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, hf="/path/to/Llama-3.1-70B-Instruct", data="/path/to/prefs", steps=500)
    c = base_config()
    c.trainer = "paired"
    c.model.preset = "llama3.1-70b"  # the architecture used when planning without the weights
    c.model.init_from = f"hf:{arg.hf}"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.tokenizer = f"{arg.hf}/tokenizer.json"

    c.data.train = f"{arg.data}/train.jsonl"
    c.data.eval = f"{arg.data}/eval.jsonl"
    c.data.template = "llama3"
    c.data.batch_size = 128  # pairs per step, global (each host reads 128 / processes)
    c.data.max_len = 2048
    c.data.max_prompt_len = 1024

    c.loss.name = "dpo"
    c.loss.beta = 0.1
    c.loss.label_smoothing = 0.0

    c.optimizer.lr = 2e-7
    c.optimizer.warmup_steps = 50
    c.optimizer.end_lr_ratio = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.clip_norm = 1.0

    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.sharding = "fsdp"

    c.steps = arg.steps
    c.log_every = 10
    c.eval_every = 250
    c.eval_batches = 16
    c.checkpoint.every = 250
    c.checkpoint.keep = 2
    c.lock()
    return c
