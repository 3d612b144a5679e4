"""Train many SAEs in one jitted step: the SAE axis is vmapped and sharded over the mesh's ``model`` axis,
the token batch over its ``data`` axis.

A job is (source, `SAEConfig`, `SAETrainConfig`, one L1 coefficient (0 for architectures without an L1
penalty) and one seed per SAE). The SAE axis is whatever the source stacks: adapters x layers x L1
coefficients x seeds flattened. Per SAE, the RMS scale
``s = sqrt(mean_t ||x_t||^2 / d)`` (1 with ``normalize: none``) and b_dec are estimated from the first
``scale_batches`` batches of its own stream, then fixed. Output directory::

    out_dir/checkpoints/   orbax steps (state + JSON meta with the config hash)
    out_dir/metrics.csv    one row per (logged step, SAE); metrics.png the curves; the rows of the last step
                           are the job's final metrics (also when a rerun finds the job already finished)
    out_dir/saes/<name>/   each trained SAE in our format (`_formats.save_sae`)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from jax.sharding import Mesh

from lgeo_jax.config import to_plain
from lgeo_jax.files import atomic_directory, json_hash
from lgeo_jax.sae._config import Arch, BDecInit, Normalize, SAEConfig, SAETrainConfig
from lgeo_jax.sae._formats import save_sae
from lgeo_jax.sae._log import MetricsCSV, plot_metrics, read_metrics
from lgeo_jax.sae._models import SAE, init_params
from lgeo_jax.sae._source import Batch, BatchSource
from lgeo_jax.sae._step import (
    SAEState,
    geometric_median,
    held_out_metrics,
    make_optimizer,
    resample_dead,
    train_step,
)
from lgeo_jax.sharding import DEFAULT_RULES, make_mesh


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """Trained SAEs (in source order), the metrics logged at the last step per SAE (read back from
    ``metrics.csv``), and where everything was written."""

    saes: tuple[SAE, ...]
    final_metrics: tuple[dict, ...]
    out_dir: pathlib.Path


def default_mesh(n_sae: int) -> Mesh:
    """All devices: as many on the SAE (``model``) axis as divide the SAE count, the rest on ``data``."""
    n_dev = jax.device_count()
    model = math.gcd(n_sae, n_dev)
    return make_mesh(data=n_dev // model, model=model)


_geometric_medians = jax.jit(jax.vmap(geometric_median))


def check_batch(batch: Batch, names: Sequence[str], d_in: int, step: int) -> None:
    """Reject wrong shapes and non-finite values, naming the SAE's source and the rows that carry them."""
    if batch.x.ndim != 3 or batch.x.shape[0] != len(names) or batch.x.shape[2] != d_in:
        raise ValueError(f"batch at step {step} has shape {batch.x.shape}, expected [{len(names)}, batch, {d_in}] "
                         f"(n_sae, batch, d_in)")
    finite = np.isfinite(batch.x).all(axis=-1)  # [S, B]
    if not finite.all():
        s, b = np.argwhere(~finite)[0]
        bad = batch.rows[s][~finite[s]]
        raise ValueError(f"non-finite values (NaN/Inf) in the batch for SAE {names[s]!r} at step {step}: source rows "
                         f"{bad.min()}..{bad.max()} ({bad.size} bad of the rows "
                         f"{batch.rows[s].min()}..{batch.rows[s].max()} served)")


def _shardings(tree, mesh: Mesh):
    """Shard every leaf's leading SAE axis on the mesh (falls back to replication where it does not divide)."""

    def one(leaf):
        return DEFAULT_RULES.sharding(("sae",) + (None,) * (leaf.ndim - 1), mesh, leaf.shape)

    return jax.tree.map(one, tree)


def _validate(source: BatchSource, sae_cfg: SAEConfig, train_cfg: SAETrainConfig, l1_coeffs: Sequence[float],
              seeds: Sequence[int]) -> None:
    n = len(source.names)
    if (train_cfg.architecture, train_cfg.k) != (sae_cfg.architecture, sae_cfg.k):
        raise ValueError(f"SAETrainConfig is for architecture '{train_cfg.architecture.value}' (k={train_cfg.k}), "
                         f"the SAEConfig '{sae_cfg.architecture.value}' (k={sae_cfg.k}); build both for the same "
                         "architecture (SAETrainConfig.sae_config does)")
    if source.d_in != sae_cfg.d_in:
        raise ValueError(f"SAEConfig.d_in={sae_cfg.d_in} does not match the data's d={source.d_in}")
    if len(l1_coeffs) != n or len(seeds) != n:
        raise ValueError(f"need one L1 coefficient and one seed per SAE: {n} SAEs ({source.names}), got "
                         f"{len(l1_coeffs)} coefficients and {len(seeds)} seeds")
    relu = sae_cfg.architecture is Arch.RELU
    bad = [(name, c) for name, c in zip(source.names, l1_coeffs, strict=True) if (c <= 0 if relu else c != 0)]
    if bad:
        rule = "must be > 0 for a ReLU SAE" if relu else (
            f"must be 0 for architecture '{sae_cfg.architecture.value}' (it has no L1 penalty)")
        raise ValueError(f"L1 coefficient {rule}; got {bad}")
    if len(set(source.names)) != n:
        raise ValueError(f"SAE names must be unique (they name output folders): {source.names}")


def _init_state(source: BatchSource, sae_cfg: SAEConfig, train_cfg: SAETrainConfig, seeds: Sequence[int],
                optimizer) -> SAEState:
    """Scale, b_dec and random weights per SAE, from the first ``scale_batches`` batches of each stream."""
    sample = []
    for step in range(train_cfg.scale_batches):
        batch = source.batch(step, train_cfg.batch_size)
        check_batch(batch, source.names, source.d_in, step)
        sample.append(batch.x)
    x = np.concatenate(sample, axis=1).astype(np.float64)  # [S, N, D]
    scale = np.sqrt(np.mean(np.sum(x**2, axis=-1), axis=-1) / source.d_in)  # [S]
    if train_cfg.normalize is Normalize.NONE:
        scale = np.ones_like(scale)
    if not (scale > 0).all():
        zero = [n for n, s in zip(source.names, scale, strict=True) if not s > 0]
        raise ValueError(f"RMS scale is 0 for SAEs {zero}: their first {x.shape[1]} training rows are all zero")
    xn = jnp.asarray(x / scale[:, None, None], jnp.float32)  # [S, N, D]
    if train_cfg.b_dec_init is BDecInit.GEOMETRIC_MEDIAN:
        b_dec = _geometric_medians(xn)  # [S, D]
    elif train_cfg.b_dec_init is BDecInit.MEAN:
        b_dec = jnp.mean(xn, axis=1)
    else:
        b_dec = jnp.zeros(xn.shape[::2], jnp.float32)
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    params = jax.vmap(lambda k: init_params(k, sae_cfg))(keys)
    params["b_dec"] = b_dec
    if sae_cfg.architecture is Arch.JUMPRELU:
        params["threshold"] = jnp.full_like(params["threshold"], train_cfg.jumprelu_init_threshold)
    return SAEState(params=params, opt_state=jax.vmap(optimizer.init)(params),
                    steps_since_fired=jnp.zeros((len(seeds), sae_cfg.d_sae), jnp.int32),
                    scale=jnp.asarray(scale, jnp.float32))


def initial_decoder(sae_cfg: SAEConfig, seed: int) -> np.ndarray:
    """The decoder ``[F, D]`` an SAE of this job with init seed ``seed`` starts from (training-health's reference:
    how far each row moved)."""
    return np.asarray(init_params(jax.random.key(seed), sae_cfg)["W_dec"])


def job_hash(source: BatchSource, sae_cfg: SAEConfig, train_cfg: SAETrainConfig, l1_coeffs, seeds) -> str:
    """Identifies a job (stored in its checkpoints, so a resume with anything changed is refused)."""
    return json_hash({"sae": to_plain(sae_cfg), "train": to_plain(train_cfg, results_only=True),
                      "l1": [float(c) for c in l1_coeffs], "seeds": [int(s) for s in seeds],
                      "names": list(source.names), "d_in": source.d_in, "n_rows": source.n_rows})


def open_job(out_dir: pathlib.Path, keep: int, chash: str, abstract, state_sh, init, *, what: str = "a job"):
    """A job's checkpoint manager and its state: restored from the latest checkpoint (laid out as `state_sh`),
    or `init()` placed there when none exists, with the step to start from. A checkpoint written by another
    config (`chash` differs) is refused, naming both hashes."""
    manager = ocp.CheckpointManager(out_dir.resolve() / "checkpoints", options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True))
    start = manager.latest_step()
    if start is None:
        return manager, jax.device_put(init(), state_sh), 0
    meta = manager.restore(start, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta["config_hash"] != chash:
        raise ValueError(f"{out_dir}: checkpoint was written by {what} with config hash {meta['config_hash']}, "
                         f"this job's is {chash}; use a new out_dir or restore the original config")
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, state_sh)
    state = manager.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    return manager, state, start


def train_saes(source: BatchSource, sae_cfg: SAEConfig, train_cfg: SAETrainConfig, l1_coeffs: Sequence[float],
               seeds: Sequence[int], out_dir: str | pathlib.Path, mesh: Mesh | None = None,
               progress: bool = True, stop_after: int | None = None, plot: bool = True) -> TrainResult:
    """Train one SAE per source stream, all in one vmapped, sharded step; resumes from ``out_dir`` if present.

    Loss per architecture as in `_losses` (ReLU: squared error summed over d and averaged over tokens plus
    ``l1 * mean_tokens sum_i f_i``; TopK / BatchTopK: plus AuxK; JumpReLU: plus the L0 penalty), unit-norm
    decoder rows unless ``sparsity: decoder_norm``. ``l1_coeffs`` are the ReLU L1 coefficients (0 for the
    other architectures); ``seeds`` seed each SAE's initialisation (and its dead-latent resampling).
    Resuming with any change to the configs, coefficients, seeds or source identity raises `ValueError`.
    ``stop_after`` ends this run at that global step (checkpointed), e.g. to fit a job into time slices;
    the SAEs written then are the partial ones, and calling again continues exactly. ``plot=False`` skips
    ``metrics.png`` (about a second of matplotlib; `plot_metrics` draws it later from the CSV).
    """
    _validate(source, sae_cfg, train_cfg, l1_coeffs, seeds)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mesh = default_mesh(len(source.names)) if mesh is None else mesh
    total = train_cfg.total_steps(source.n_rows)
    dead_steps = train_cfg.dead_window_steps(total)
    optimizer, abstract, state_sh, step_fn, eval_fn, resample_fn = _compiled(sae_cfg, train_cfg, total, mesh,
                                                                             len(seeds))
    chash = job_hash(source, sae_cfg, train_cfg, l1_coeffs, seeds)
    manager, state, start = open_job(out_dir, train_cfg.keep_checkpoints, chash, abstract, state_sh,
                                     lambda: _init_state(source, sae_cfg, train_cfg, seeds, optimizer))

    x_sh = DEFAULT_RULES.sharding(("sae", "batch", None), mesh, (len(seeds), train_cfg.batch_size, sae_cfg.d_in))
    per_sae = _shardings(jnp.zeros(len(seeds)), mesh)
    l1 = jax.device_put(jnp.asarray(l1_coeffs, jnp.float32), per_sae)
    seed_arr = jax.device_put(jnp.asarray(seeds, jnp.uint32), per_sae)
    held = None
    if train_cfg.eval_rows > 0:
        held = source.held_out(train_cfg.eval_rows)  # [S, N, D]
        held = jax.device_put(held, DEFAULT_RULES.sharding(("sae", None, None), mesh, held.shape))

    log = MetricsCSV(out_dir / "metrics.csv", resume_step=start if start else None)
    bar = tqdm.tqdm(total=total * train_cfg.batch_size * len(seeds), initial=start * train_cfg.batch_size * len(seeds),
                    unit="tok", unit_scale=True, disable=not progress, desc=f"{len(seeds)} SAEs")
    t0, tokens0 = time.perf_counter(), 0
    end = total if stop_after is None else min(total, stop_after)
    done = start
    for step in range(start, end):
        batch = source.batch(step, train_cfg.batch_size)
        check_batch(batch, source.names, source.d_in, step)
        x = jax.device_put(batch.x, x_sh)
        state, metrics = step_fn(state, x, l1, jnp.asarray(step, jnp.int32))
        done = step + 1
        # ReLU resampling: at every dead window through the first half of the run (latents revived later would
        # have too little training left to become features)
        if train_cfg.resample_dead and done % dead_steps == 0 and done <= total // 2:
            state = resample_fn(state, x, seed_arr, jnp.asarray(done, jnp.int32))
        bar.update(train_cfg.batch_size * len(seeds))
        tokens0 += train_cfg.batch_size * len(seeds)
        if done % train_cfg.log_every == 0 or done % train_cfg.eval_every == 0 or done == end:
            host = jax.device_get(metrics)
            host["dead_frac"] = np.mean(np.asarray(state.steps_since_fired) >= dead_steps, axis=-1)
            if held is not None and (done % train_cfg.eval_every == 0 or done == end):
                host.update(jax.device_get(eval_fn(state.params, state.scale, held)))
            rate = tokens0 / (time.perf_counter() - t0)
            log.append([{"step": done, "sae": i, "name": name, "l1_coeff": float(l1_coeffs[i]), "tokens_per_s": rate,
                         **{k: float(v[i]) for k, v in host.items()}} for i, name in enumerate(source.names)])
        if done % train_cfg.checkpoint_every == 0 or done == end:
            manager.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave({"config_hash": chash, "step": done})))
    bar.close()
    manager.wait_until_finished()
    manager.close()
    if plot:
        plot_metrics(out_dir / "metrics.csv", out_dir / "metrics.png")

    host_state = jax.device_get(state)
    saes = []
    for i, name in enumerate(source.names):
        sae = SAE(sae_cfg, {k: np.asarray(v[i]) for k, v in host_state.params.items()}, float(host_state.scale[i]))
        with atomic_directory(out_dir / "saes" / name, overwrite=True) as tmp:  # never half an SAE on disk
            save_sae(tmp, sae, {"name": name, "l1_coeff": float(l1_coeffs[i]), "seed": int(seeds[i]), "steps": done,
                                "config_hash": chash})
        saes.append(sae)
    return TrainResult(tuple(saes), _metrics_at(out_dir, done, source.names), out_dir)


def _metrics_at(out_dir: pathlib.Path, step: int, names: Sequence[str]) -> tuple[dict, ...]:
    """Each SAE's logged row at ``step``, from ``metrics.csv``: the same whether this call trained up to it or
    found it already checkpointed (a rerun after a kill late in a job, or of a finished job)."""
    rows = {r["name"]: r for r in read_metrics(out_dir / "metrics.csv") if r["step"] == step}
    missing = [n for n in names if n not in rows]
    if missing:
        raise ValueError(f"{out_dir / 'metrics.csv'}: no metrics logged at step {step} for SAEs {missing}, although "
                         f"the checkpoint is at that step; delete {out_dir} to retrain this job")
    return tuple(rows[n] for n in names)


@functools.lru_cache(maxsize=16)
def _compiled(sae_cfg: SAEConfig, train_cfg: SAETrainConfig, total: int, mesh: Mesh, n_sae: int):
    """Optimizer, state shapes/shardings and jitted step / eval / resample for a job shape; cached so that
    repeated jobs of one shape (sweeps, one-at-a-time comparisons) trace and compile once."""
    optimizer = make_optimizer(train_cfg, total)
    dead_steps = train_cfg.dead_window_steps(total)
    abstract = jax.eval_shape(lambda: _init_state_shapes(n_sae, sae_cfg, optimizer))
    state_sh = _shardings(abstract, mesh)
    step_fn = jax.jit(functools.partial(_multi_step, sae_cfg=sae_cfg, train_cfg=train_cfg, optimizer=optimizer,
                                        dead_steps=dead_steps),
                      out_shardings=(state_sh, None), donate_argnums=0)
    eval_fn = jax.jit(jax.vmap(functools.partial(held_out_metrics, cfg=sae_cfg)))

    def resample(state, x, seeds, step):
        keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(seeds)
        one = functools.partial(resample_dead, sae_cfg=sae_cfg, dead_steps=dead_steps)
        return jax.vmap(one)(state, x, keys)

    resample_fn = jax.jit(resample, out_shardings=state_sh, donate_argnums=0)
    return optimizer, abstract, state_sh, step_fn, eval_fn, resample_fn


def _init_state_shapes(n: int, sae_cfg: SAEConfig, optimizer) -> SAEState:
    """Same pytree as `_init_state` (for shapes/shardings only; values are never used)."""
    params = jax.vmap(lambda k: init_params(k, sae_cfg))(jax.random.split(jax.random.key(0), n))
    return SAEState(params, jax.vmap(optimizer.init)(params), jnp.zeros((n, sae_cfg.d_sae), jnp.int32),
                    jnp.ones(n, jnp.float32))


def _multi_step(state: SAEState, x, l1, step, sae_cfg, train_cfg, optimizer, dead_steps):
    """`train_step` vmapped over the SAE axis (x [S, B, D], l1 [S]; the step number is shared). TopK / BatchTopK
    skip the AuxK pass while no SAE of the job has a dead latent (its term is exactly 0 then, as SAELens skips
    it); the branch is taken outside the vmap, where a cond still chooses instead of computing both."""

    def run(with_auxk: bool):
        one = functools.partial(train_step, sae_cfg=sae_cfg, train_cfg=train_cfg, optimizer=optimizer,
                                dead_steps=dead_steps, with_auxk=with_auxk)
        return lambda *args: jax.vmap(one, in_axes=(0, 0, 0, None))(*args)

    if not sae_cfg.architecture.uses_k:
        return run(True)(state, x, l1, step)
    any_dead = jnp.any(state.steps_since_fired >= dead_steps)
    return jax.lax.cond(any_dead, run(True), run(False), state, x, l1, step)
