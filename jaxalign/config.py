"""The base run configuration and the helpers that configs/ files use.

Every key a run reads is defined here with its default and a comment; a config file starts from
`base_config()`, changes what it needs and locks the result, so a mistyped key fails loudly both in
the file and on the command line (`--config.optimizer.lr=1e-6`).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib

import ml_collections
from ml_collections import ConfigDict

from jaxalign.errors import ConfigError


def base_config() -> ConfigDict:
    c = ConfigDict()
    # The trainer family (jaxalign.train.families): sft | paired (any paired loss or mix, pair
    # data; "dpo" is an alias) | unpaired (kto, bco, npo: {prompt, completion, label} or
    # forget-set SFT records) | reward (scalar-head reward model, Bradley-Terry on pairs) |
    # reward_multi (k-output reward model regressed on rated responses) | cut (CUT on
    # {prompt, response, judgment} records)
    c.trainer = "paired"
    c.seed = 0  # parameter init and any sampling
    c.steps = 1000  # optimizer updates
    c.log_every = 10  # metrics to console, metrics.jsonl and TensorBoard every N steps
    c.eval_every = 100  # held-out evaluation every N steps (0 = only at the end)
    c.eval_batches = 8  # batches per evaluation (0 = the whole eval file)
    # token log-prob kernel: auto | reference | xla | pallas_tpu | pallas_gpu
    c.logprob_impl = "auto"

    c.model = ConfigDict()
    c.model.preset = "tiny-64"  # a name in jaxalign.models.PRESETS
    # Where the initial weights come from: "" = random init from `seed`,
    # "checkpoint:DIR" = params of the latest checkpoint of another run (its workdir),
    # "hf:DIR" = a Hugging Face model directory.
    c.model.init_from = ""
    c.model.dtype = ""  # activation dtype override ("" = the preset's), e.g. bfloat16
    c.model.remat = ""  # rematerialisation override ("" = the preset's): none | full | dots
    c.model.attention = ""  # attention ("" = the preset's, "auto"): auto|xla|cudnn|splash
    # the layer stack's loop ("" = the preset's, "auto": unrolled on CPU, scanned elsewhere):
    # auto | scan | unroll
    c.model.layer_loop = ""

    # LoRA (Hu et al. 2021; jaxalign.models.lora): rank 0 = off (full fine-tuning). With rank
    # r > 0 only the adapters (and a family's head) train: the optimizer state and checkpoints
    # hold them alone, the base weights of model.init_from are loaded (never saved) and stay
    # frozen, and the reference policy is the base with adapters off (one copy of the base).
    c.lora = ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0  # adapter output scaled by alpha / rank
    c.lora.dropout = 0.0  # dropout on the adapter input, training steps only
    # regex searched in attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj ("proj" = all seven)
    c.lora.targets = "q_proj|v_proj"

    c.tokenizer = "data/demo/tokenizer.model"  # SentencePiece .model or HF tokenizer.json

    c.data = ConfigDict()
    # The training split: a JSONL, Parquet, Arrow or ArrayRecord file, a `datasets` directory
    # (save_to_disk), or a directory or glob of shards; local, gs://, s3:// (jaxalign.data.sources)
    c.data.train = ""
    c.data.eval = ""  # the held-out split, any of the same ("" = no evaluation)
    # Prompt/chat template: plain | chatml | llama3 | raw, or "tokenizer" for the tokenizer's own
    # Jinja chat_template (tokenizer_config.json next to `tokenizer`; jaxalign.data.templates)
    c.data.template = "plain"
    # Global examples (pairs for preference training) per optimizer step, over all hosts and
    # micro-batches; each host reads batch_size / (grad_accum * processes) per micro-batch.
    c.data.batch_size = 8
    c.data.max_len = 128  # tokens per row
    c.data.max_prompt_len = 64  # prompts longer than this are cut from the left
    c.data.pack = False  # pack several sequences per row (segment ids) instead of padding
    c.data.shuffle_seed = 0  # data order; fixed so a resumed run sees the same stream
    c.data.skip_bad_records = False  # skip and count malformed records instead of failing
    # Numeric record fields carried into every batch under their own names, where losses read
    # them: e.g. ("margin",) for bradley_terry, ("beta_feature",) for mm_dpo,
    # ("chosen_margins", "rejected_margins") (lists of M numbers) for modpo.
    c.data.extra_fields = ()
    # D2O (loss.name="d2o"): the self-generated responses K per negatives record
    # {prompt, rejected, samples: [K]}; a record with another count is an error.
    c.data.num_samples = 2
    # AFT (loss.name="aft"): the correct P and incorrect N responses per ranked record
    # {prompt, correct: [P], incorrect: [N]}; a record with other counts is an error.
    c.data.num_correct = 2
    c.data.num_incorrect = 2
    # The loss mask covers the prompt tokens too (joint preference, DOVE / JPO joint=True).
    c.data.train_on_prompt = False
    # Direction-conditioned data (DPA, jaxalign.data.transforms.direction_system): names of the k
    # objectives, e.g. ("helpfulness", "verbosity"); when set, each record's "direction" field
    # (k numbers, normalised) is written into its system message with this template.
    c.data.direction_objectives = ()
    c.data.direction_template = (
        "You are a helpful assistant. Your response should maximize weighted rating = {weighted}"
    )
    # Cached reference log-probs (`jaxalign cache-ref`, a JSONL file; "" = compute them): the
    # dpo trainer then runs no reference forward and holds no reference weights.
    c.data.ref_logps = ""
    # unpaired trainer: an SFT JSONL retain set read alongside the forget set (NPO+GD), a batch
    # of the same size per step, fed to a mix term as `retain_logps` / `retain_lengths`.
    c.data.retain = ""

    # The loss: `name` from jaxalign.losses.names(), the other keys its hyperparameters (checked
    # against its signature; replace the whole `c.loss` for a loss without beta / label_smoothing).
    # A mix: name = "mix" and terms = ((name, weight[, hyper[, rename]]), ...), e.g. MPO
    # (("dpo", 0.8, {"beta": 0.1}), ("bco_pair", 0.2, {}), ("sft", 1.0, {})).
    c.loss = ConfigDict()
    c.loss.name = "dpo"
    c.loss.beta = 0.1
    c.loss.label_smoothing = 0.0

    # The reference policy of the offline families that use one (jaxalign.train.reference): by
    # default the initial policy, fixed. `soup`: a tuple of "checkpoint:DIR" / "hf:DIR" models
    # whose average is the reference instead (SALSA). `update`: TR-DPO, after every `every`-th
    # step ref <- alpha * policy + (1 - alpha) * ref ("soft") or ref <- policy ("hard"); the
    # reference is then checkpointed with the run. "" keeps it fixed.
    c.reference = ConfigDict()
    c.reference.soup = ()
    c.reference.update = ""
    c.reference.alpha = 0.6
    c.reference.every = 512

    c.optimizer = ConfigDict()
    c.optimizer.lr = 1e-4  # peak learning rate
    c.optimizer.warmup_steps = 0  # linear warmup from 0
    c.optimizer.end_lr_ratio = 0.1  # cosine decays to lr * end_lr_ratio at the last step
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0  # AdamW decoupled weight decay (not on norms or biases)
    c.optimizer.clip_norm = 1.0  # global gradient-norm clipping (0 = off)
    c.optimizer.grad_accum = 1  # micro-batches per update; the batch size stays the total
    # 0: a non-finite loss or gradient stops the run (before anything is saved). k > 0: skip an
    # update whose gradients are not finite (params and optimizer state unchanged, counted as
    # `updates_skipped`), and stop only after more than k such updates in a row.
    c.optimizer.skip_nonfinite = 0

    c.mesh = ConfigDict()
    c.mesh.data = 1  # mesh axis sizes; -1 fills with the remaining devices
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    # Multi-slice TPU (or multi-host GPU) runs: how many slices (hosts) each mesh axis spans over
    # the data-centre network; `mesh` is then the shape within one slice (jaxalign.sharding.
    # make_mesh). All 1 = one slice. E.g. 2 slices of v5p-128: dcn_mesh.data=2.
    c.dcn_mesh = ConfigDict()
    c.dcn_mesh.data = 1
    c.dcn_mesh.fsdp = 1
    c.dcn_mesh.tensor = 1
    c.sharding = "fsdp"  # ShardingRules preset: dp | fsdp | fsdp_tp

    # Where metrics go besides the console, WORKDIR/metrics.jsonl and TensorBoard
    # (jaxalign.train.metrics). Weights & Biases needs the [wandb] extra; only process 0 logs.
    c.metrics = ConfigDict()
    c.metrics.wandb = ConfigDict()
    c.metrics.wandb.project = ""  # W&B project ("" = no W&B)
    c.metrics.wandb.entity = ""  # W&B team or user ("" = your default entity)
    c.metrics.wandb.name = ""  # run name ("" = the workdir's name)
    c.metrics.wandb.mode = ""  # online | offline | disabled ("" = $WANDB_MODE, else online)

    # Multi-objective reward model (trainer reward_multi; Wang et al. 2024, DPA): records
    # {"prompt", "response", "ratings": [k numbers]} regressed by a k-output reward head. The
    # Bradley-Terry trainer "reward" has one output.
    c.reward = ConfigDict()
    c.reward.num_objectives = 1  # k

    # Online RL (trainers ppo, grpo, rloo, reinforce_pp, online_dpo, rft, spa, hc_rlhf, gkd).
    # data.train holds prompt records ({"prompt": ..., more fields the rewards read, e.g.
    # "answer"}); data.batch_size is the prompts per step (global), each sampled rl.group_size
    # times; data.eval's prompts are scored the same way (greedy and sampled) at every evaluation.
    c.rl = ConfigDict()
    c.rl.group_size = 4  # completions per prompt (G); groups of a prompt are contiguous rows
    c.rl.max_new_tokens = 32
    c.rl.temperature = 1.0  # sampling temperature; old/reference log-probs use the same one
    c.rl.top_p = 1.0  # nucleus sampling (1 = off); the importance ratio ignores truncation
    c.rl.top_k = 0  # top-k sampling (0 = off)
    c.rl.stop_strings = ()  # cut completions at these strings (host side), besides EOS
    c.rl.epochs = 1  # passes over each rollout
    c.rl.minibatches = 1  # updates per pass: the rollout is split into this many minibatches
    c.rl.eval_samples = 1  # completions per data.eval prompt for reward/sampled (averaged)
    # Rule rewards (jaxalign.rl.rewards): (name, weight[, params]) terms, summed.
    c.rl.rewards = (("demo_judge", 1.0),)
    c.rl.reward_model = ""  # workdir of a reward-trainer run: its score is added to the rewards
    c.rl.reward_model_weight = 1.0
    # A multi-objective reward model (k outputs) scores r_v = v . r: the user's direction v, k
    # numbers, normalised to unit length (DPA). () for a one-output reward model.
    c.rl.reward_direction = ()
    c.rl.reward_scale = False  # divide rewards by their running std (PPO-max)
    c.rl.reward_clip = 0.0  # then clip them to [-c, c] (0 = off)
    c.rl.overlong_buffer = 0  # DAPO soft overlong penalty over the last N new tokens (0 = off)
    c.rl.dynamic_sampling = 0  # DAPO: up to N extra sampling rounds to replace groups whose
    # rewards are all equal (no signal); 0 = off
    # The policy loss (ppo, grpo, rloo, reinforce_pp): clipped ratio, per token ("token") or per
    # sequence ("sequence", GSPO); losses.policy.aggregate mode; KL and entropy terms.
    c.rl.ratio = "token"
    c.rl.clip_low = 0.2
    c.rl.clip_high = 0.2  # DAPO clip-higher: 0.28
    c.rl.dual_clip = 0.0  # dual clip c > 1 for negative advantages (0 = off)
    c.rl.aggregation = "seq-mean-token-mean"
    c.rl.scale_rewards = "group"  # grpo: group | batch | none (Dr.GRPO)
    c.rl.kl_coef = 0.04  # KL to the reference: a k3 loss term (grpo), k1 in the reward (others)
    c.rl.kl_target = 0.0  # > 0: adaptive KL coefficient (Ziegler et al.) aiming at this KL
    c.rl.kl_horizon = 10000
    c.rl.entropy_coef = 0.0  # entropy bonus
    c.rl.tis_cap = 0.0  # truncated importance sampling of sampler/trainer differences (0 = off)
    # GRAO (grpo family, losses.grao): + pair_coef * mean over groups of the pairwise term
    # -logsig(pair_beta (l_i - l_j)) over (better, worse) pairs, l = length-normalised logp.
    c.rl.pair_coef = 0.0
    c.rl.pair_beta = 1.0
    # PPO: GAE, a value head on the policy's hidden states (value loss weighted by value_coef),
    # advantage whitening; value_init: a reward run whose head initialises the value head.
    c.rl.gamma = 1.0
    c.rl.lam = 0.95
    c.rl.value_coef = 0.5
    c.rl.value_clip = 0.2
    c.rl.value_init = ""
    c.rl.whiten_advantages = True
    # rft: fine-tune on each prompt's best completion when its reward reaches this.
    c.rl.rft_min_reward = 0.5
    # rft self-alignment (I-SHEEP): rank and keep by the policy's judgment of its own answers
    # instead of rl.rewards (then only logged): "confidence", the mean token log-prob at
    # temperature 1 (rft_min_reward a log-prob <= 0); "consistency", the share of the group's
    # samples giving the same completion (rft_min_reward in (0, 1]); "" off.
    c.rl.rft_self_judge = ""
    # hc_rlhf (safety-constrained RLHF, jaxalign.rl.constrained): maximise the reward subject to
    # E[cost] <= safety.tau. Costs: rule terms in rl.rewards syntax (summed) and/or the score of a
    # reward-trainer run trained on cost pairs (chosen = the costlier response).
    c.rl.costs = ()
    c.rl.cost_model = ""
    c.rl.safety = ConfigDict()
    c.rl.safety.tau = 0.0  # the cost limit
    c.rl.safety.delta = 0.1  # the tests' confidence is 1 - delta
    c.rl.safety.c1 = 4.0  # pessimistic bound: weight of the batch's own t-interval
    c.rl.safety.c2 = 2.0  # ... and of the safety test's
    c.rl.safety.n = 100  # safety test: one sampled completion on each of the first n prompts
    c.rl.safety.prompts = ""  # held-out prompts of the safety test ("" = data.eval)
    c.rl.safety.lambda_lr = 0.1  # multiplier step: lambda <- max(0, lambda + lr * bound)
    # spa: a self-labelled pair trains when its confidence |sigmoid(loss.beta * (s_1 - s_2)) - 0.5|
    # exceeds this (s = the policy's implicit reward log pi - log pi_ref); rl.rewards are logged.
    c.rl.spa_min_confidence = 0.1

    # Distillation (trainer gkd; jaxalign.train.distill). data.train holds {prompt, completion}
    # records; rl.* sets the student's sampling (rl.group_size 1 is usual).
    c.distill = ConfigDict()
    # The teacher: "preset:NAME" (random init from seed + 1; tests, smoke runs),
    # "checkpoint:DIR" (a run's workdir) or "hf:DIR"; any width, the student's vocabulary.
    c.distill.teacher = ""
    c.distill.beta = 0.5  # JSD_beta: 0 = forward KL(teacher || student), 1 = reverse KL
    c.distill.lmbda = 0.5  # fraction of steps whose responses the student samples (on-policy)
    c.distill.temperature = 1.0  # on both distributions in the JSD
    # ADPA (trainer adpa, pair records): the teacher's own reference (the model it was DPO-trained
    # from; same specs as distill.teacher), DPO's beta on the student, and alpha, the weight of
    # the token-level regression of the student's log-ratio onto the teacher's advantage.
    c.distill.teacher_ref = ""
    c.distill.dpo_beta = 0.1
    c.distill.alpha = 1.0

    c.checkpoint = ConfigDict()
    c.checkpoint.every = 100  # save every N steps (and at the end, and on SIGTERM)
    c.checkpoint.keep = 3  # keep the newest K checkpoints
    c.checkpoint.async_save = True  # write in the background while training goes on
    return c


def parse_arg(arg: str | None, **defaults) -> ConfigDict:
    """Parse a config-file argument `key=value,key=value` over typed defaults.

    `configs/dpo/tiny.py:steps=50,smoke=True` calls `get_config("steps=50,smoke=True")`.
    Values are Python literals; a key not in `defaults` is an error.
    """
    out = ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f'config argument "{item}": expected key=value')
        if key not in defaults:
            raise ConfigError(
                f'config argument "{key}" is unknown (known: {", ".join(sorted(defaults))})'
            )
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        kind = type(defaults[key])
        try:
            out[key] = kind(value) if defaults[key] is not None else value
        except (TypeError, ValueError):
            raise ConfigError(
                f'config argument "{item}": expected {kind.__name__} for "{key}"'
            ) from None
    return out


def load_config(spec: str) -> ConfigDict:
    """Load `path/to/config.py[:arg]` by calling its `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"{path}: config file not found")
    module_spec = importlib.util.spec_from_file_location(f"_jaxalign_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config(arg)")
    config = module.get_config(arg or None)
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
    return config


def _suggest(config: ConfigDict, dotted: str) -> str:
    """' (did you mean "a.b"?)' by spelling or initials (learning_rate -> lr), else the keys."""
    prefix, _, leaf = dotted.rpartition(".")
    node = config
    for part in prefix.split(".") if prefix else []:
        if not isinstance(node, ConfigDict) or part not in node:
            return ""
        node = node[part]
    keys = list(node.keys())
    initials = "".join(word[:1] for word in leaf.split("_"))
    close = difflib.get_close_matches(leaf, keys, n=1) or [k for k in keys if k == initials]
    if close:
        return f' (did you mean "{prefix + "." if prefix else ""}{close[0]}"?)'
    return f" (known: {', '.join(sorted(keys))})"


def apply_overrides(config: ConfigDict, overrides: list[str], source: str = "") -> ConfigDict:
    """Apply `key.sub=value` overrides; an unknown key names itself and the nearest known key."""
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f'override "{item}": expected --config.key=value')
        node = config
        parts = dotted.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ConfigDict) or part not in node:
                where = f"{source}: " if source else ""
                raise ConfigError(f'{where}unknown key "{dotted}"{_suggest(config, dotted)}')
            if depth < len(parts) - 1:
                node = node[part]
        leaf = parts[-1]
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        current = node[leaf]
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(current, str) and not isinstance(value, str):
            value = raw
        try:
            node[leaf] = value
        except (TypeError, KeyError) as e:
            raise ConfigError(f"{dotted}={raw}: {e}") from None
    return config


def check_known_keys(config: ConfigDict, reference: ConfigDict | None = None, prefix="") -> None:
    """Fail on a key the base config does not define (a typo in a config file).

    `loss` is exempt below its name: each loss has its own hyperparameters, checked against the
    loss function's signature when the run starts.
    """
    reference = base_config() if reference is None else reference
    for key in config.keys():
        dotted = f"{prefix}{key}"
        if dotted.startswith("loss."):
            continue
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference.keys()), n=1)
            hint = f' (did you mean "{prefix}{close[0]}"?)' if close else ""
            raise ConfigError(f'unknown key "{dotted}"{hint}')
        if isinstance(config[key], ConfigDict) and isinstance(reference[key], ConfigDict):
            check_known_keys(config[key], reference[key], prefix=f"{dotted}.")


def to_dict(config: ConfigDict) -> dict:
    return ml_collections.ConfigDict(config).to_dict()
