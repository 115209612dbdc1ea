"""DPO of Llama 3 8B (Instruct) on TPU v5p-64 (32 chips, 8 hosts): the recipe at real scale.

    # Plan first, on any machine with libtpu (no TPU, weights or data needed):
    jaxalign train --config configs/dpo/llama3_8b.py --compile_only --topology v5p-64

    # Train; run on every worker of the slice (launch/tpu_pod.py does this):
    jaxalign train --config configs/dpo/llama3_8b.py:hf=/mnt/llama3-8b-instruct,data=/mnt/prefs \\
        --workdir gs://my-bucket/runs/dpo-llama3-8b

Arguments (`configs/dpo/llama3_8b.py:key=value,...`):
  hf    a Hugging Face model directory on every worker (config.json, *.safetensors,
        tokenizer.json), e.g. meta-llama/Meta-Llama-3-8B-Instruct downloaded with
        `huggingface-cli download` to local disk or a gcsfuse mount. The weights load straight into
        their shardings (`model.init_from="hf:DIR"`); the tokenizer is DIR/tokenizer.json.
  data  a directory on every worker with train.jsonl and eval.jsonl preference pairs
        ({"prompt": ..., "chosen": ..., "rejected": ...}, see the data guide), e.g. UltraFeedback
        binarized (~61k pairs: 1000 steps of 64 pairs is about one epoch).
  steps optimizer updates (default 1000).

Layout: fsdp over all 32 chips (parameters, gradients and AdamW state sharded ZeRO-3 style; the
frozen reference shares the policy's shardings), float32 master weights, bfloat16 activations,
full rematerialisation of each layer. 64 pairs x 2048 tokens per step = 128 sequences, 4 per chip,
262,144 tokens/step. On v5p-256 (128 chips) raise data.batch_size to a multiple of 128
(`--config.data.batch_size=128`): every chip needs whole rows and whole pairs.
"""

from jaxalign.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, hf="/path/to/Meta-Llama-3-8B-Instruct", data="/path/to/prefs", steps=1000)
    c = base_config()
    c.trainer = "paired"
    c.model.preset = "llama3-8b"  # the architecture used when planning without the weights
    c.model.init_from = f"hf:{arg.hf}"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.tokenizer = f"{arg.hf}/tokenizer.json"

    c.data.train = f"{arg.data}/train.jsonl"
    c.data.eval = f"{arg.data}/eval.jsonl"
    c.data.template = "llama3"
    c.data.batch_size = 64  # pairs per step, global (each host reads 64 / processes)
    c.data.max_len = 2048
    c.data.max_prompt_len = 1024

    c.loss.name = "dpo"
    c.loss.beta = 0.1
    c.loss.label_smoothing = 0.0

    c.optimizer.lr = 5e-7
    c.optimizer.warmup_steps = 150
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
    c.checkpoint.every = 500
    c.checkpoint.keep = 2
    c.lock()
    return c
