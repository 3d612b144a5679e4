"""Train many crosscoders in one jitted step: the crosscoder axis vmapped and sharded over the mesh's
``model`` axis, the token batch over ``data`` (as `lgeo_jax.sae.train_saes`), resumable from orbax checkpoints.

A job is a `PairSource` (one (h_base, h_adapted) stream per crosscoder), the `crosscoder` section and one
seed per crosscoder. Output directory::

    out_dir/checkpoints/          orbax steps (state + JSON meta with the job hash)
    out_dir/metrics.csv           one row per (logged step, crosscoder), the SAE package's columns
    out_dir/crosscoders/<name>/   each trained crosscoder (`_formats.save_crosscoder`)
"""

from __future__ import annotations

import dataclasses
import functools
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
from lgeo_jax.crosscoder._config import CrossArch, CrosscoderConfig
from lgeo_jax.crosscoder._formats import Crosscoder, save_crosscoder
from lgeo_jax.crosscoder._models import CrossState, held_out_metrics, init_params, make_optimizer, train_step
from lgeo_jax.files import atomic_directory, json_hash
from lgeo_jax.sae import Batch, BatchSource, MetricsCSV, check_batch, default_mesh, open_job, read_metrics
from lgeo_jax.sharding import DEFAULT_RULES


class PairSource:
    """One (h_base, h_adapted = h_base + delta) stream per crosscoder from a `BatchSource` of base rows and one of
    deltas serving the same rows (corpus rows are aligned across adapters, so the same seed gives the same
    order); rows come out concatenated ``[S, B, 2D]``. Nothing is materialised beyond the batch."""

    def __init__(self, base: BatchSource, delta: BatchSource):
        if (base.d_in, base.n_rows, len(base.names)) != (delta.d_in, delta.n_rows, len(delta.names)):
            raise ValueError(f"PairSource: base (d={base.d_in}, rows={base.n_rows}, streams={len(base.names)}) and "
                             f"delta (d={delta.d_in}, rows={delta.n_rows}, streams={len(delta.names)}) differ")
        self.base, self.delta = base, delta
        self.names, self.d_in, self.n_rows = tuple(delta.names), 2 * delta.d_in, delta.n_rows

    def batch(self, step: int, batch_size: int) -> Batch:
        b, d = self.base.batch(step, batch_size), self.delta.batch(step, batch_size)
        if not np.array_equal(b.rows, d.rows):
            raise ValueError(f"PairSource: base and delta served different rows at step {step}; give both the same "
                             "row order (seed)")
        return Batch(x=np.concatenate([b.x, b.x + d.x], axis=-1), rows=d.rows)  # [S, B, 2D]

    def held_out(self, max_rows: int) -> np.ndarray:
        base = self.base.held_out(max_rows)
        return np.concatenate([base, base + self.delta.held_out(max_rows)], axis=-1)  # [S, N, 2D]


@dataclasses.dataclass(frozen=True)
class CrossResult:
    """Trained crosscoders (source order), each one's metrics at the last step, and where they were written."""

    crosscoders: tuple[Crosscoder, ...]
    final_metrics: tuple[dict, ...]
    out_dir: pathlib.Path


def _shardings(tree, mesh: Mesh):
    return jax.tree.map(lambda leaf: DEFAULT_RULES.sharding(("sae",) + (None,) * (leaf.ndim - 1), mesh, leaf.shape),
                        tree)


def _init_state(source: PairSource, cfg: CrosscoderConfig, seeds: Sequence[int], optimizer,
                scale_batches: int = 4) -> CrossState:
    """RMS scale (both streams together) and b_dec = the mean from the first batches of each stream; random weights."""
    sample = []
    for step in range(scale_batches):
        batch = source.batch(step, cfg.batch_size)
        check_batch(batch, source.names, source.d_in, step)
        sample.append(batch.x)
    x = np.concatenate(sample, axis=1).astype(np.float64)  # [C, N, E]
    scale = np.sqrt(np.mean(np.sum(x**2, axis=-1), axis=-1) / source.d_in)  # [C]
    if not (scale > 0).all():
        zero = [name for name, s in zip(source.names, scale, strict=True) if not s > 0]
        raise ValueError(f"RMS scale is 0 for crosscoders {zero}: their first {x.shape[1]} training rows are all zero")
    params = jax.vmap(lambda k: init_params(k, source.d_in // 2, cfg))(jnp.stack([jax.random.key(s) for s in seeds]))
    params["b_dec"] = jnp.asarray(np.mean(x / scale[:, None, None], axis=1), jnp.float32)
    return CrossState(params, jax.vmap(optimizer.init)(params), jnp.zeros((len(seeds), cfg.width), jnp.int32),
                      jnp.asarray(scale, jnp.float32))


def job_hash(source: PairSource, cfg: CrosscoderConfig, seeds: Sequence[int]) -> str:
    return json_hash({"crosscoder": to_plain(cfg, results_only=True), "seeds": [int(s) for s in seeds],
                      "names": list(source.names), "d_in": source.d_in, "n_rows": source.n_rows})


def train_crosscoders(source: PairSource, cfg: CrosscoderConfig, seeds: Sequence[int], out_dir: str | pathlib.Path,
                      mesh: Mesh | None = None, progress: bool = True, stop_after: int | None = None) -> CrossResult:
    """Train one crosscoder per stream of `source`, all in one vmapped, sharded step; resumes from ``out_dir``.

    ``stop_after`` ends this call at that step (checkpointed); calling again continues exactly. Resuming with
    any change to the config, seeds or source identity raises `ValueError`."""
    n = len(source.names)
    if len(seeds) != n or len(set(source.names)) != n:
        raise ValueError(f"need one seed and a unique name per crosscoder: names {source.names}, seeds {list(seeds)}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mesh = default_mesh(n) if mesh is None else mesh
    optimizer, abstract, state_sh, step_fn, eval_fn = _compiled(cfg, mesh, n, source.d_in)
    chash = job_hash(source, cfg, seeds)
    manager, state, start = open_job(out_dir, cfg.keep_checkpoints, chash, abstract, state_sh,
                                     lambda: _init_state(source, cfg, seeds, optimizer), what="a crosscoder job")

    x_sh = DEFAULT_RULES.sharding(("sae", "batch", None), mesh, (n, cfg.batch_size, source.d_in))
    held = None
    if cfg.eval_rows > 0:
        held = source.held_out(cfg.eval_rows)  # [C, N, E]
        held = jax.device_put(held, DEFAULT_RULES.sharding(("sae", None, None), mesh, held.shape))
    log = MetricsCSV(out_dir / "metrics.csv", resume_step=start if start else None)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm.tqdm(total=cfg.steps * cfg.batch_size * n, initial=start * cfg.batch_size * n, unit="tok",
                    unit_scale=True, disable=not progress, desc=f"{n} crosscoders")
    t0, tokens, done = time.perf_counter(), 0, start
    for step in range(start, end):
        batch = source.batch(step, cfg.batch_size)
        check_batch(batch, source.names, source.d_in, step)
        state, metrics = step_fn(state, jax.device_put(batch.x, x_sh))
        done = step + 1
        bar.update(cfg.batch_size * n)
        tokens += cfg.batch_size * n
        if done % cfg.log_every == 0 or done == end:
            host = jax.device_get(metrics)
            host["dead_frac"] = np.mean(np.asarray(state.steps_since_fired) >= cfg.dead_window_steps(), axis=-1)
            if held is not None:
                host.update(jax.device_get(eval_fn(state.params, state.scale, held)))
            rate = tokens / (time.perf_counter() - t0)
            log.append([{"step": done, "sae": i, "name": name, "l1_coeff": cfg.l1 or 0.0, "tokens_per_s": rate,
                         **{k: float(v[i]) for k, v in host.items()}} for i, name in enumerate(source.names)])
        if done % cfg.checkpoint_every == 0 or done == end:
            manager.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave({"config_hash": chash, "step": done})))
    bar.close()
    manager.wait_until_finished()
    manager.close()

    host_state = jax.device_get(state)
    out = []
    for i, name in enumerate(source.names):
        cc = Crosscoder(cfg, {k: np.asarray(v[i]) for k, v in host_state.params.items()}, float(host_state.scale[i]))
        with atomic_directory(out_dir / "crosscoders" / name, overwrite=True) as tmp:
            save_crosscoder(tmp, cc, {"name": name, "seed": int(seeds[i]), "steps": done, "config_hash": chash})
        out.append(cc)
    rows = {r["name"]: r for r in read_metrics(out_dir / "metrics.csv") if r["step"] == done}
    return CrossResult(tuple(out), tuple(rows.get(nm, {}) for nm in source.names), out_dir)


def initial_decoder(d_in: int, cfg: CrosscoderConfig, seed: int) -> np.ndarray:
    """The decoder ``[F, 2D]`` a crosscoder of seed ``seed`` starts from (training health's reference)."""
    return np.asarray(init_params(jax.random.key(seed), d_in, cfg)["W_dec"])


@functools.lru_cache(maxsize=16)
def _compiled(cfg: CrosscoderConfig, mesh: Mesh, n: int, e: int):
    optimizer = make_optimizer(cfg)
    abstract = jax.eval_shape(lambda: _state_shapes(n, e, cfg, optimizer))
    state_sh = _shardings(abstract, mesh)

    def multi(state, x):
        def run(with_auxk):
            one = functools.partial(train_step, cfg=cfg, optimizer=optimizer, with_auxk=with_auxk)
            return lambda s, xx: jax.vmap(one)(s, xx)

        if cfg.architecture is CrossArch.L1:
            return run(True)(state, x)
        # AuxK is exactly 0 while no latent is dead: skip its pass (decided outside the vmap, as the SAE trainer)
        any_dead = jnp.any(state.steps_since_fired >= cfg.dead_window_steps())
        return jax.lax.cond(any_dead, run(True), run(False), state, x)

    step_fn = jax.jit(multi, out_shardings=(state_sh, None), donate_argnums=0)
    eval_fn = jax.jit(jax.vmap(functools.partial(held_out_metrics, cfg=cfg)))
    return optimizer, abstract, state_sh, step_fn, eval_fn


def _state_shapes(n: int, e: int, cfg: CrosscoderConfig, optimizer) -> CrossState:
    params = jax.vmap(lambda k: init_params(k, e // 2, cfg))(jax.random.split(jax.random.key(0), n))
    return CrossState(params, jax.vmap(optimizer.init)(params), jnp.zeros((n, cfg.width), jnp.int32),
                      jnp.ones(n, jnp.float32))
