"""Decoding diagnostics (METHODS.md section 8): branching factor, token distribution shift and a
decoding sweep, each a table of plain numbers (JSON) and a plot (PNG).

- Branching factor (Yang & Holtzman 2025, "How Alignment Shrinks the Generative Horizon"):
  BF = exp(mean per-token entropy) along sampled continuations, H_t = -sum_v p(v) log p(v) of the
  model's own next-token distribution (temperature 1, full vocabulary, from the log-prob kernel)
  before each generated token. By position t: BF_t = exp(mean over rows still generating at t of
  H_t); overall: exp(mean over every generated token). The continuations are drawn with the
  given `SamplingOptions` (default: temperature 1, no truncation, i.e. from that distribution).
- Token distribution shift (Lin et al. 2024, "The Unlocking Spell on Base LLMs"): the aligned
  model decodes (typically greedy); each of its tokens y_t is ranked under the base model given
  the same prefix, rank = 1 + #{v : z_base(v) > z_base(y_t)} (ties rank high). Unshifted: rank 1,
  marginal: rank 2-3, shifted: rank > 3; fractions overall and by position.
- Decoding sweep (Huang et al. 2024, "Catastrophic Jailbreak of Open-source LLMs via Exploiting
  Generation"): n samples per prompt under every (temperature, top-p, top-k) of a grid, scored by
  a reward ``reward(record, text)``; per setting the mean reward, the worst-of-n (mean over
  prompts of the lowest of its n rewards) and the minimum; over the grid the worst case per
  prompt (its lowest reward under any setting, averaged over prompts: what an attacker who tries
  every setting gets) and the settings with the lowest and highest mean. Every setting is a
  traced value of one compiled loop: the sweep compiles once.

Positions count generated tokens from 0. Row arrays are ``[R, M]`` (R rows of `GenerateResult`,
M = max_new_tokens) with 0 after each row's end.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import pathlib
import tempfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxalign import models as M
from jaxalign.kernels import token_logprobs
from jaxalign.sampling.best_of_n import Reward, score_completions
from jaxalign.sampling.engine import generate
from jaxalign.sampling.options import SamplingOptions
from jaxalign.sampling.result import GenerateResult

SHIFT_BINS = (("unshifted", 1, 1), ("marginal", 2, 3), ("shifted", 4, None))  # rank ranges


_forward = jax.jit(M.forward, static_argnums=0)


def completion_hidden(
    config: M.ModelConfig, params: M.Params, prompts: dict, result: GenerateResult
) -> tuple[Float[Array, "R M D"], np.ndarray]:
    """The model's hidden states before each generated token of ``result`` (one full forward of
    every row's left-padded prompt + completion) and the mask of generated tokens ``[R, M]``."""
    rows = result.prompt_index
    tokens = np.asarray(prompts["prompt_tokens"])[rows]
    R, Tp = tokens.shape
    steps = result.tokens.shape[1]
    mask = np.arange(steps)[None] < result.lengths[:, None]
    lengths = np.asarray(prompts["prompt_lengths"])[rows]
    full = np.concatenate([tokens, np.where(mask, result.tokens, 0)], axis=1).astype(np.int32)
    segments = np.concatenate(
        [np.asarray(prompts["prompt_segment_ids"])[rows], mask.astype(np.int32)], axis=1
    )
    positions = np.concatenate(
        [np.asarray(prompts["prompt_positions"])[rows], lengths[:, None] + np.arange(steps)],
        axis=1,
    ).astype(np.int32)
    hidden = _forward(config, params, full, positions, segments)
    return hidden[:, Tp - 1 : Tp - 1 + steps], mask


def token_entropies(
    config: M.ModelConfig, params: M.Params, prompts: dict, result: GenerateResult
) -> Float[np.ndarray, "R M"]:
    """H_t = -sum_v p(v) log p(v) (nats) of the model's next-token distribution before each
    generated token (temperature 1, full vocabulary, `jaxalign.kernels.token_logprobs`); 0
    after each row's end."""
    hidden, mask = completion_hidden(config, params, prompts, result)
    targets = np.where(mask, result.tokens, 0)
    _, extras = token_logprobs(
        hidden,
        M.unembedding(config, params),
        targets,
        mask=mask,
        return_entropy=True,
        softcap=config.final_logit_softcap,
    )
    return np.asarray(extras["entropy"], np.float64)


@functools.partial(jax.jit, static_argnums=0)
def _ranks(config, params, hidden, targets):
    def one_row(args):  # [M, V] logits of one row at a time, not [R, M, V]
        h, y = args
        z = M.logits(config, params, h[None])[0]
        z_y = jnp.take_along_axis(z, y[:, None], axis=-1)
        return 1 + jnp.sum(z > z_y, axis=-1, dtype=jnp.int32)

    return jax.lax.map(one_row, (hidden, targets))


def token_ranks(
    config: M.ModelConfig, params: M.Params, prompts: dict, result: GenerateResult
) -> Int[np.ndarray, "R M"]:
    """Rank of each generated token under this model given the same prefix: 1 + the number of
    tokens with a strictly larger logit (1 = the model's own greedy choice); 0 after the end."""
    hidden, mask = completion_hidden(config, params, prompts, result)
    ranks = _ranks(config, params, hidden, jnp.asarray(np.where(mask, result.tokens, 0)))
    return np.where(mask, np.asarray(ranks), 0).astype(np.int32)


def _mean_or_none(total: np.ndarray, count: np.ndarray) -> list:
    return [float(t / c) if c else None for t, c in zip(total, count, strict=True)]


def branching_factor(entropies: np.ndarray, lengths: np.ndarray) -> dict:
    """BF table from per-token entropies ``[R, M]`` and generated lengths ``[R]``: by position
    (rows still generating, mean entropy, exp of it; None where no row reached it) and overall
    (exp of the mean over every generated token)."""
    mask = np.arange(entropies.shape[1])[None] < np.asarray(lengths)[:, None]
    count = mask.sum(0)
    total = np.where(mask, entropies, 0.0).sum(0)
    mean = _mean_or_none(total, count)
    overall = float(total.sum() / max(count.sum(), 1))
    return {
        "position": list(range(entropies.shape[1])),
        "rows": count.tolist(),
        "mean_entropy": mean,
        "branching_factor": [None if m is None else float(np.exp(m)) for m in mean],
        "overall": {
            "tokens": int(count.sum()),
            "mean_entropy": overall,
            "branching_factor": float(np.exp(overall)),
        },
    }


def shift_table(ranks: np.ndarray, lengths: np.ndarray) -> dict:
    """Token-shift table from ranks ``[R, M]`` under the base model and lengths ``[R]``: the
    fraction of tokens unshifted (rank 1), marginal (2-3) and shifted (> 3), overall and by
    position (None where no row reached it)."""
    mask = np.arange(ranks.shape[1])[None] < np.asarray(lengths)[:, None]
    count = mask.sum(0)
    table = {"position": list(range(ranks.shape[1])), "rows": count.tolist(), "overall": {}}
    for name, lo, hi in SHIFT_BINS:
        hit = mask & (ranks >= lo) & (ranks <= (hi if hi is not None else np.inf))
        table[name] = _mean_or_none(hit.sum(0), count)
        table["overall"][name] = float(hit.sum() / max(count.sum(), 1))
    table["overall"]["tokens"] = int(count.sum())
    return table


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of a decoding sweep (temperature 0 = greedy, where top-p/top-k do nothing)."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0


def sweep_grid(
    temperatures: Sequence[float], top_ps: Sequence[float], top_ks: Sequence[int]
) -> list[Setting]:
    """Every (temperature, top-p, top-k) combination, in that nesting order."""
    return [Setting(t, p, k) for t, p, k in itertools.product(temperatures, top_ps, top_ks)]


def decoding_sweep(
    config: M.ModelConfig,
    params: M.Params,
    batches: Sequence[dict],
    *,
    reward: Reward,
    settings: Sequence[Setting],
    rng: Array,
    options: SamplingOptions,
    tokenizer,
    names: Callable[[int], Sequence[str]] | None = None,
) -> dict:
    """Rewards of ``options.n`` samples per prompt under every setting (module docstring).

    ``batches``: prompt batches carrying "records" (`make_prompt_pipeline` batches; empty slots
    have record None and are left out). Setting s of batch b samples with key
    ``fold_in(fold_in(rng, s), b)`` and ``options`` with that temperature, top-p and top-k.
    ``names(b)``: the names of batch b's records for reward errors.
    """
    n = options.n
    rows, per_prompt = [], []  # per setting: its table row; its [P, n] rewards
    for s, setting in enumerate(settings):
        opts = dataclasses.replace(
            options, temperature=setting.temperature, top_p=setting.top_p, top_k=setting.top_k
        )
        scores = []
        for b, batch in enumerate(batches):
            key = jax.random.fold_in(jax.random.fold_in(rng, s), b)
            result = generate(config, params, batch, rng=key, options=opts, tokenizer=tokenizer)
            got = score_completions(
                reward, batch["records"], result, names=names(b) if names else None
            )
            got = got.reshape(-1, n)
            scores.append(got[~np.isnan(got[:, 0])])
        scores = np.concatenate(scores)
        per_prompt.append(scores)
        rows.append(
            dataclasses.asdict(setting)
            | {
                "mean": float(scores.mean()),
                "worst_of_n": float(scores.min(axis=1).mean()),
                "min": float(scores.min()),
            }
        )
    worst = np.min(np.stack([s.min(axis=1) for s in per_prompt]), axis=0)
    by_mean = sorted(range(len(rows)), key=lambda i: rows[i]["mean"])
    return {
        "n": n,
        "prompts": int(per_prompt[0].shape[0]),
        "settings": rows,
        "worst_case": float(worst.mean()),
        "lowest_mean": rows[by_mean[0]],
        "highest_mean": rows[by_mean[-1]],
    }


def write_json(table: dict, path: str | os.PathLike) -> None:
    """``table`` as indented JSON, written to a temporary file beside ``path`` and renamed."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _save_figure(fig, path: str | os.PathLike) -> None:
    """The figure as PNG through a temporary file and a rename."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_branching(tables: dict[str, dict], path: str | os.PathLike) -> None:
    """BF by position, one line per model (``tables``: label -> `branching_factor` table)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, table in tables.items():
        bf = [np.nan if x is None else x for x in table["branching_factor"]]
        overall = table["overall"]["branching_factor"]
        ax.plot(table["position"], bf, marker="o", ms=3, label=f"{label} (overall {overall:.2f})")
    ax.set_xlabel("generated token position")
    ax.set_ylabel("branching factor exp(H)")
    ax.set_yscale("log")
    ax.set_title("Branching factor along sampled continuations")
    ax.legend(fontsize=7)
    _save_figure(fig, path)
    plt.close(fig)


def plot_shift(table: dict, path: str | os.PathLike, title: str = "") -> None:
    """Stacked fractions of unshifted / marginal / shifted tokens by position."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = np.zeros(len(table["position"]))
    for name, _, _ in SHIFT_BINS:
        frac = np.array([0.0 if x is None else x for x in table[name]])
        share = table["overall"][name]
        ax.bar(table["position"], frac, bottom=bottom, label=f"{name} ({share:.1%})")
        bottom += frac
    ax.set_xlabel("generated token position")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(title or "Aligned tokens ranked under the base model", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save_figure(fig, path)
    plt.close(fig)


def plot_sweep(table: dict, path: str | os.PathLike) -> None:
    """Mean, worst-of-n and minimum reward for every setting of the sweep."""
    plt = _pyplot()
    rows = table["settings"]
    labels = [f"T={r['temperature']:g} p={r['top_p']:g} k={r['top_k']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows)), 3.8))
    for key in ("mean", "worst_of_n", "min"):
        ax.plot(x, [r[key] for r in rows], marker="o", ms=3, label=key)
    ax.axhline(table["worst_case"], color="k", ls=":", label="worst case over the sweep")
    ax.set_xticks(x, labels, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel(f"reward (n = {table['n']} samples per prompt)")
    ax.set_title("Decoding sweep")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save_figure(fig, path)
    plt.close(fig)
