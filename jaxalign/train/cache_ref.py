"""`jaxalign cache-ref`: the reference policy's sequence log-probs of a dataset, once.

    jaxalign cache-ref --config configs/dpo/tiny.py --out runs/dpo-tiny/ref_logps.jsonl \\
        --config.model.init_from=checkpoint:runs/sft-tiny
    jaxalign train --config configs/dpo/tiny.py --workdir runs/dpo-tiny \\
        --config.model.init_from=checkpoint:runs/sft-tiny \\
        --config.data.ref_logps=runs/dpo-tiny/ref_logps.jsonl

The reference is what training would use: the initial weights (`model.init_from`, else the random
init from `seed`), or the soup of `reference.soup`; a TR-DPO reference (`reference.update`)
changes during the run and cannot be cached. Both splits (`data.train` and `data.eval`) go into
one file, keyed by record content (`jaxalign.data.ref_cache`), with chosen / rejected sums and
their LD-DPO common-prefix sums. Training with `data.ref_logps` joins them back per record, so
it works with shuffling, packing and streaming, runs no reference forward and holds no reference
weights. Single-process: run it on one host (it reads every record).

The cache walks each file exactly as a single-process run's first epoch does (the run's pipeline:
same seed, batch size, packing and mesh), so for that epoch the cached numbers are bit-identical
to the ones the run would compute on the fly; later epochs batch records differently, and there
they differ from an on-the-fly reference only by float32 rounding of a differently shaped
forward.

The unpaired trainer's single-response records (SFT or `{prompt, completion, label}`) cache one
sum per record, `ref_logps` (`SINGLE_CACHE_FIELDS`); e.g. PoFT's aligned-model scores: with
`reference.soup=("checkpoint:ALIGNED",)` the reference is the aligned model, and the cached sums
divided by the response lengths are its length-normalised scores. A loss with KTO's
mismatched-pair KL sequences cannot be cached.
"""

from __future__ import annotations

import functools

import grain
import jax
from ml_collections import ConfigDict

from jaxalign.config import to_dict
from jaxalign.data import JsonlSource, parse_pair, parse_sft, parse_unpaired, record_key
from jaxalign.data.ref_cache import write_ref_cache
from jaxalign.errors import ConfigError
from jaxalign.train import families, objectives, reference
from jaxalign.train.run import reference_params, setup

PARSERS = {"pair": parse_pair, "sft": parse_sft, "unpaired": parse_unpaired}


def _key(record: dict, parse, extra_fields: tuple[str, ...]) -> str:
    parse(record, extra_fields)  # the training source's validity, so indices line up
    return record_key(record)


def reference_logps(model_config, params, batch, *, mesh=None, implementation=None):
    """Per pair ([P] x 4, the order of `CACHE_FIELDS`): chosen, rejected, chosen prefix, rejected
    prefix reference sums of one global batch (leading micro-batch axis of size 1), by the
    training objective's own `paired_logps`."""
    micro = jax.tree.map(lambda x: x[0], batch)
    sums = objectives.paired_logps(
        model_config, params, micro, 1, with_prefix=True, mesh=mesh, impl=implementation
    )
    return (*sums["logps"], *sums["prefix_logps"])


def single_reference_logps(model_config, params, batch, *, mesh=None, implementation=None):
    """Per response ([E],): the reference sums of a single-response global batch (leading
    micro-batch axis of size 1), by the training objectives' own `sequence_logps`."""
    micro = jax.tree.map(lambda x: x[0], batch)
    E = micro["example_mask"].shape[0]
    logps, _ = objectives.sequence_logps(
        model_config, params, micro, E, 1, mesh=mesh, impl=implementation
    )
    return (logps,)


def cache_reference(config: ConfigDict, out: str) -> dict[str, int]:
    """Write the cache for `data.train` and `data.eval`; returns {split path: records}."""
    if jax.process_count() > 1:
        raise ConfigError("cache-ref runs on one process (it reads every record itself)")
    if not families.get(config.trainer).takes_ref_cache:
        raise ConfigError(f'cache-ref: trainer "{config.trainer}" takes no reference log-probs')
    if reference.update_rule(config):
        raise ConfigError(
            f'cache-ref: reference.update="{reference.update_rule(config)}" changes the reference '
            "during the run; its log-probs cannot be cached"
        )
    plain = ConfigDict(to_dict(config))
    plain.data.ref_logps = ""
    run = setup(plain)
    params = reference_params(run)  # the soup, or the initial decoder (a LoRA run's base)
    impl = None if config.logprob_impl == "auto" else config.logprob_impl
    spec = run.objective.batch
    if spec.kl_sequences:
        raise ConfigError(
            f"cache-ref: loss {config.loss.name!r} reads the reference's mismatched-pair KL "
            "log-probs, which are not cached"
        )
    if spec.records not in PARSERS:
        raise ConfigError(
            f"cache-ref: {spec.records} records (loss {config.loss.name!r}) have no reference "
            "cache; the reference forward runs in the step"
        )
    fields = families.get(config.trainer).ref_cache_fields
    of_batch = reference_logps if spec.records == "pair" else single_reference_logps
    compute = jax.jit(
        functools.partial(of_batch, run.model_config, mesh=run.mesh, implementation=impl)
    )
    counts: dict[str, int] = {}
    key = functools.partial(
        _key, parse=PARSERS[spec.records], extra_fields=tuple(config.data.extra_fields)
    )

    def entries():
        for path in dict.fromkeys(p for p in (config.data.train, config.data.eval) if p):
            keys = JsonlSource(path, key, skip_bad_records=config.data.skip_bad_records)
            # The pipeline's record order (`_index_dataset`): a permutation of (seed, length).
            order = grain.MapDataset.range(len(keys)).shuffle(seed=config.data.shuffle_seed)
            start = 0
            for batch in run.batches(path, train=False):
                n = int(batch["example_mask"].sum())
                values = jax.device_get(compute(params, run.global_batch([batch])))
                for j in range(n):
                    yield keys[order[start + j]], tuple(v[j] for v in values)
                start += n
            counts[path] = start

    write_ref_cache(out, entries(), families.ref_cache_settings(config), fields)
    return counts
