"""`lgeo plan`: what a config will cost before anything runs (shapes by `jax.eval_shape` only), and the check
`lgeo run` makes with the same figures before any stage starts: each stage's device memory, host memory and
disk against what this machine has (`check_resources`)."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Iterable

import jax
import jax.numpy as jnp

from lgeo_jax.analysis import SPLICES
from lgeo_jax.config import is_placeholder
from lgeo_jax.crosscoder import CrossArch
from lgeo_jax.lora import target_dims
from lgeo_jax.model import Gemma2Config, abstract_model, count_params
from lgeo_jax.sae import Arch, estimate_sae_memory
from lgeo_jax.sharding import MESH_AXES
from lgeo_jax.stages._corpus import corpus_size_bytes
from lgeo_jax.stages._layout import mesh_is_auto, mesh_sizes, stage_devices, weight_bytes
from lgeo_jax.stages._saes import trains_base_saes
from lgeo_jax.study import StudyConfig

_PRESETS = {(c.n_layers, c.d_model): (name, c) for name, c in (
    ("gemma2_2b", Gemma2Config.gemma2_2b()), ("gemma2_9b", Gemma2Config.gemma2_9b()),
    ("gemma2_27b", Gemma2Config.gemma2_27b()))}
# The synthetic tokenizer's vocabulary (lgeo_jax.data.write_synthetic_dataset's default).
_SYNTHETIC_VOCAB = 1024
# Kept tokens per record when no token budget is set (template + response, no BOS): measured means of the
# Gemma tokenizer on the 5,000-record Alpaca subset (106.9 per record) and of the synthetic default (~63).
_TOKENS_PER_RECORD_ALPACA = 107
_TOKENS_PER_RECORD_SYNTHETIC = 63


def planned_model_config(config: StudyConfig) -> tuple[Gemma2Config, str]:
    """The architecture a config will run, and where it came from (no weights are read)."""
    m = config.model
    if m.is_builtin:
        cfg = m.builtin.with_vocab(_SYNTHETIC_VOCAB)
        return cfg, f"built-in tiny model (vocab {cfg.vocab_size})"
    if not is_placeholder(m.checkpoint) and os.path.isfile(os.path.join(m.checkpoint, "config.json")):
        return Gemma2Config.from_hf_dir(m.checkpoint), f"{m.checkpoint}/config.json"
    preset = _PRESETS.get((m.n_layers, m.d_model))
    if preset is None:
        raise ValueError(f"model.checkpoint {m.checkpoint!r} is not available and model.n_layers/d_model "
                         f"({m.n_layers}, {m.d_model}) match no Gemma-2 preset; point model.checkpoint at the "
                         "HF directory")
    return preset[1], f"preset {preset[0]} (checkpoint not available here; matched by n_layers/d_model)"


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:,.2f} GiB"


def plan_text(config: StudyConfig) -> str:
    cfg, source = planned_model_config(config)
    dtype = jnp.dtype(config.model.param_dtype or "bfloat16")
    total = count_params(abstract_model(cfg, param_dtype=dtype))
    lines = [
        f"Model: {source}",
        f"  {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} q / {cfg.n_kv_heads} kv heads, head_dim "
        f"{cfg.head_dim}, MLP {cfg.mlp_dim}, vocab {cfg.vocab_size}",
        f"  parameters: {total:,} ({_gib(total * dtype.itemsize)} in {dtype.name})",
        "",
        "LoRA adapters (trainable parameters, % of the base model's parameters):",
    ]
    dims = target_dims(cfg)
    for spec in config.lora.adapter_specs():
        n = spec.trainable_params(cfg.n_layers, dims)
        lines.append(f"  rank {spec.rank:>3}, alpha {spec.alpha:g}, targets {','.join(spec.targets)}: {n:>13,} "
                     f"= {100 * n / total:.4f}% (3 d.p.: {100 * n / total:.3f}%)")
    lines.append("  Note: the paper's Table 2 percentages (0.048/0.097/0.193/0.387) round inconsistently in the "
                 "last digit (r16 is 0.1936%, printed 0.193); we print the exact values.")
    lines += ["", *_corpus_lines(config, cfg), "", *_sae_lines(config, cfg), "", *_resource_lines(config), "",
              *_mesh_lines(config)]
    return "\n".join(lines)


PLAN_DEVICE_GIB = 16.0
"""The device memory `lgeo plan` checks a mesh against when `resources.device_memory_gib` is unset: the
smallest common accelerator (a TPU v5e chip, a 16 GB V100)."""


def planned_mesh(config: StudyConfig) -> tuple[int, int]:
    """(devices, bytes per device) `lgeo plan` assumes: the product of the mesh sizes the config sets (auto
    axes 1: `plan` opens no device), and `resources.device_memory_gib` or `PLAN_DEVICE_GIB`."""
    n = math.prod(getattr(config.mesh, axis) or 1 for axis in MESH_AXES)
    return n, _gib_bytes(config.resources.device_memory_gib or PLAN_DEVICE_GIB)


def plan_refusal(config: StudyConfig) -> str | None:
    """Why the config's mesh (`planned_mesh`) cannot hold the study, with what would fit; None when it fits or
    no mesh size is set (an auto mesh depends on the machine, which `lgeo run` checks). The same figures `lgeo
    run` refuses a mesh with before loading anything."""
    if mesh_is_auto(config):
        return None
    n, capacity = planned_mesh(config)
    problems = _device_problems(config, None, n, capacity)
    return "; ".join(problems) or None


def _mesh_lines(config: StudyConfig) -> list[str]:
    """Per stage, per device on the planned mesh: its parts (weights, activations, LoRA state, SAE stacks)."""
    if mesh_is_auto(config):
        return ["Mesh: auto (every device data-parallel, FSDP for weights that do not fit); see the per-device "
                "memory of a given layout with --mesh data=..,fsdp=..,model=.."]
    n, capacity = planned_mesh(config)
    cfg, _ = planned_model_config(config)
    try:
        mesh = mesh_sizes(config, cfg, n, capacity)
    except ValueError as e:
        return [f"Mesh: {e}"]
    lines = [f"Per device on the mesh {_mesh_text(mesh)} ({n} device(s); set it with --mesh or the config's "
             f"mesh section), checked against {_gib(capacity)} per device:"]
    for need in stage_needs(config, n, mesh).values():
        if need.device:
            parts = ", ".join(f"{what} {_gib(size)}" for what, size in need.device_parts) or need.device_what
            lines.append(f"  {need.stage:<9} {_gib(need.device):>14}  ({parts})")
    return lines


def planned_tokens(config: StudyConfig) -> tuple[int, str]:
    """Token vectors the corpus will hold (all extracted splits), and how that figure was arrived at."""
    ex = config.extract
    if ex.token_budget:
        return ex.token_budget, "extract.token_budget"
    records = sum(getattr(config.data, s)[1] - getattr(config.data, s)[0] for s in ex.splits)
    per_record = _TOKENS_PER_RECORD_SYNTHETIC if config.data.is_synthetic else _TOKENS_PER_RECORD_ALPACA
    return records * per_record, f"estimate: {records:,} records x ~{per_record} tokens"


def _corpus_lines(config: StudyConfig, cfg: Gemma2Config) -> list[str]:
    ex = config.extract
    tokens, how = planned_tokens(config)
    per_array = tokens * cfg.d_model * jnp.dtype(ex.store_dtype.value).itemsize
    n_arrays = len(ex.layers) * (1 + len(config.lora.ranks))
    return [f"Corpus ({ex.store_dtype.value}, {tokens:,} token vectors; {how}):",
            f"  {_gb(per_array)} per (adapter, layer) array; {n_arrays} arrays ({len(config.lora.ranks)} adapter "
            f"deltas + the base, stored once, x {len(ex.layers)} layers) plus token metadata: "
            f"{_gb(corpus_size_bytes(config, tokens, cfg.d_model))} on disk"]


def _sae_lines(config: StudyConfig, cfg: Gemma2Config) -> list[str]:
    s = config.sae
    width = s.resolved_width(cfg.d_model)
    n_delta = len(config.lora.ranks) * len(config.extract.layers) * len(s.seeds)
    n_base = len(config.extract.layers) * len(s.seeds) if trains_base_saes(config) else 0
    lines = [f"SAEs: {n_delta} delta + {n_base} base SAEs of {cfg.d_model} -> {width} ({s.architecture.value}), "
             f"batch {s.batch_size}, float32 with Adam, trained in one job:"]
    for devices in (1, 8):
        mem = estimate_sae_memory(cfg.d_model, width, n_delta + n_base, s.batch_size, {"model": devices, "data": 1},
                                  arch=s.architecture)
        lines.append(f"  on {devices} device(s), SAE axis sharded: {mem.describe()}")
    if config.crosscoder.enabled:
        c = config.crosscoder
        n, _ = _crosscoder_memory(config, cfg.d_model, 1, None)
        lines.append(f"Crosscoders: {n} of 2 x {cfg.d_model} -> {c.width} ({c.architecture.value}), batch "
                     f"{c.batch_size}, float32 with Adam, trained in one job:")
        for devices in (1, 8):
            _, mem = _crosscoder_memory(config, cfg.d_model, devices, {"model": devices, "data": 1, "fsdp": 1})
            lines.append(f"  on {devices} device(s), crosscoder axis sharded: {mem.describe('crosscoders')}")
    return lines


def _resource_lines(config: StudyConfig) -> list[str]:
    """Each stage's needs on one device, and this machine's host memory and disk (devices are not opened: a
    running study may hold them)."""
    lines = ["Per stage on 1 device (lower bounds; `lgeo run` checks them against this machine's devices before "
             "starting):"]
    for n in stage_needs(config, 1, {"data": 1, "fsdp": 1, "model": 1}).values():
        if n.device or n.host or n.disk:
            lines.append(f"  {n.stage:<9} device {_gib(n.device):>14}, host {_gib(n.host):>14}, "
                         f"disk {_gib(n.disk):>14}")
    machine = this_machine(config, devices=False)
    have = lambda v: "unknown" if v is None else _gib(v)
    lines.append(f"This machine: host {have(machine.host)}, {have(machine.disk)} free at {machine.disk_path}")
    return lines


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.2f} GB"


# ---- resources: what each stage needs, what this machine has -------------------------------------


@dataclasses.dataclass(frozen=True)
class StageNeeds:
    """A stage's peak memory per device and on the host, and the disk its outputs take (bytes), with the
    biggest part of each named (for messages). Lower bounds: activations beyond the named parts are extra."""

    stage: str
    device: int = 0
    host: int = 0
    disk: int = 0
    device_what: str = ""
    host_what: str = ""
    disk_what: str = ""
    device_parts: tuple[tuple[str, int], ...] = ()  # what `device` is made of, where it has parts


@dataclasses.dataclass(frozen=True)
class Machine:
    """What this machine offers (bytes; None: unknown, not checked), detected or from `resources`."""

    n_devices: int  # global: every process's
    device: int | None
    host: int | None
    disk: int | None
    disk_path: str


class ResourceError(ValueError):
    """A run the machine cannot hold; the message gives each figure and what would fit."""


def stage_needs(config: StudyConfig, n_devices: int, mesh: dict[str, int] | None = None) -> dict[str, StageNeeds]:
    """Each stage's needs per device on a machine of `n_devices` devices, from the planned shapes alone (no
    weights read; `jax.eval_shape` for the model). `mesh`: the {data, fsdp, model} sizes the model stages use
    (default: `config.mesh` resolved without a memory limit): weights split over fsdp x model, residual
    batches over data x fsdp, the LoRA state counted whole (an upper bound: its factors split where their axes
    divide). The SAE jobs use `config.mesh` when any size is set, else `lgeo_jax.sae.default_mesh`'s layout."""
    cfg, _ = planned_model_config(config)
    mesh = mesh_sizes(config, cfg, n_devices, None) if mesh is None else mesh
    weight_split, batch_split = mesh["fsdp"] * mesh["model"], mesh["data"] * mesh["fsdp"]
    dtype = jnp.dtype(config.model.param_dtype or "bfloat16")
    whole = weight_bytes(cfg, config)
    weights = -(-whole // weight_split)
    f32 = 4
    needs = {"data": StageNeeds("data")}
    if config.model.is_builtin:  # pretrained here, on one device: float32 parameters, gradients, two Adam moments
        needs["base"] = StageNeeds("base", device=whole // dtype.itemsize * f32 * 4, disk=whole,
                                   device_what="the built-in model's pretraining state", disk_what="the model")
    else:
        needs["base"] = StageNeeds("base")
    dims = target_dims(cfg)
    lora = sum(spec.trainable_params(cfg.n_layers, dims) for spec in config.lora.adapter_specs())
    needs["adapters"] = StageNeeds("adapters", device=weights + lora * f32 * 4, disk=lora * f32,
                                   device_what="the base weights plus the LoRA parameters, gradients and Adam state",
                                   disk_what="the adapters",
                                   device_parts=(("weights", weights), ("LoRA params + grads + Adam", lora * f32 * 4)))
    ex = config.extract
    residuals = ((1 + len(config.lora.ranks)) * len(ex.layers) * ex.batch_size * config.data.max_length
                 * cfg.d_model * f32 * 2)  # float32 residuals and their store-dtype copy
    local = -(-residuals // batch_split)  # each device holds its rows of the batch
    tokens, _ = planned_tokens(config)
    remote = ex.store is not None and "://" in ex.store and not ex.store.startswith("file://")
    needs["corpus"] = StageNeeds("corpus", device=weights + local, host=residuals,
                                 disk=0 if remote else corpus_size_bytes(config, tokens, cfg.d_model),
                                 device_what="the base weights plus one batch of residuals",
                                 host_what="one batch of residuals", disk_what=f"the corpus ({tokens:,} tokens)",
                                 device_parts=(("weights", weights), ("activations (one batch)", local)))
    sae_layout = None if mesh_is_auto(config) else mesh
    needs["saes"] = _sae_needs(config, cfg.d_model, config.sae.resolved_width(cfg.d_model), n_devices, sae_layout)
    needs["crosscoders"] = _crosscoder_needs(config, cfg.d_model, n_devices, sae_layout)
    needs["evaluate"] = _evaluate_needs(config, cfg, weights, batch_split)
    needs["analysis"] = _analysis_needs(config, cfg.d_model, config.sae.resolved_width(cfg.d_model))
    needs["report"] = StageNeeds("report")
    return needs


def _sae_counts(config: StudyConfig) -> tuple[int, int]:
    """(SAEs in the main job, SAEs in the L1 sweep job)."""
    layers, seeds = len(config.extract.layers), len(config.sae.seeds)
    n = len(config.lora.ranks) * layers * seeds + (layers * seeds if trains_base_saes(config) else 0)
    return n, len(config.sae.l1_sweep)


def _sae_bytes(d_model: int, width: int, config: StudyConfig) -> int:
    """float32 parameters of one SAE."""
    return estimate_sae_memory(d_model, width, 1, 1, {}, arch=config.sae.architecture).params


def _sae_mesh(n_sae: int, n_devices: int) -> dict[str, int]:
    """The mesh shape `lgeo_jax.sae.default_mesh(n_sae)` makes on `n_devices` devices, without opening them."""
    model = math.gcd(n_sae, n_devices)
    return {"model": model, "data": n_devices // model}


def _job_layout(n_devices: int, mesh: dict[str, int] | None):
    """Mesh sizes of a dictionary job of k members: `mesh` (the batch over data x fsdp, the members over model),
    or, None, what `default_mesh(k)` makes."""
    if mesh is None:
        return lambda k: _sae_mesh(k, n_devices)
    return lambda k: {"model": mesh["model"], "data": mesh["data"] * mesh["fsdp"]}


def _sae_needs(config: StudyConfig, d_model: int, width: int, n_devices: int,
               mesh: dict[str, int] | None = None) -> StageNeeds:
    """`mesh`: the SAE jobs' {data, fsdp, model} sizes (None: `default_mesh`'s, per job); the batch splits over
    data x fsdp, the SAE axis over model."""
    s = config.sae
    n, n_sweep = _sae_counts(config)
    layout = _job_layout(n_devices, mesh)
    device = max(estimate_sae_memory(d_model, width, k, s.batch_size, layout(k),
                                     arch=s.architecture).total for k in (n, n_sweep) if k)
    one = _sae_bytes(d_model, width, config)
    # saved SAEs plus `keep_checkpoints` training states (parameters and two Adam moments), both jobs
    disk = (n + n_sweep) * one * (1 + 3 * s.keep_checkpoints)
    return StageNeeds("saes", device=device, host=max(n, n_sweep) * one, disk=disk,
                      device_parts=(("SAE stacks (params, grads, Adam, activations)", device),),
                      device_what=f"training {n} SAEs of width {width:,} in one job (parameters, gradients, Adam, "
                                  "activations)",
                      host_what=f"the trained weights of {max(n, n_sweep)} SAEs of width {width:,}",
                      disk_what=f"{n + n_sweep} SAEs of width {width:,} and their checkpoints")


def _crosscoder_memory(config: StudyConfig, d_model: int, n_devices: int, mesh: dict[str, int] | None):
    """(crosscoders in the job, their training memory per device): a crosscoder trains like an SAE of input
    [h_base; h_adapted] (2 d_model wide), one job on the SAE jobs' mesh (`sae_mesh`)."""
    c = config.crosscoder
    n = len(config.lora.ranks) * len(config.extract.layers) * len(c.seeds)
    arch = Arch.BATCHTOPK if c.architecture is CrossArch.BATCHTOPK else Arch.RELU  # the threshold vector or not
    return n, estimate_sae_memory(2 * d_model, c.width, n, c.batch_size, _job_layout(n_devices, mesh)(n), arch=arch)


def _crosscoder_needs(config: StudyConfig, d_model: int, n_devices: int,
                      mesh: dict[str, int] | None = None) -> StageNeeds:
    if not config.crosscoder.enabled:
        return StageNeeds("crosscoders")
    n, mem = _crosscoder_memory(config, d_model, n_devices, mesh)
    width = config.crosscoder.width
    one = mem.params // mem.saes_per_device
    disk = n * one * (1 + 3 * config.crosscoder.keep_checkpoints)  # saved crosscoders plus training states
    return StageNeeds("crosscoders", device=mem.total, host=n * one, disk=disk,
                      device_parts=(("crosscoder stacks (params, grads, Adam, activations)", mem.total),),
                      device_what=f"training {n} crosscoders of width {width:,} in one job (parameters, gradients, "
                                  "Adam, activations)",
                      host_what=f"the trained weights of {n} crosscoders of width {width:,}",
                      disk_what=f"{n} crosscoders of width {width:,} and their checkpoints")


def _evaluate_needs(config: StudyConfig, cfg: Gemma2Config, weights: int, batch_split: int) -> StageNeeds:
    """The splice pass per device: the weights, float32 log-probs of one batch's stacked pass (base + adapters)
    and of one splice's continuation (`lgeo_jax.lora.splice` runs the splices one after another), the
    replaced residuals of every splice, and the SAEs (delta and random-init per adapter, the dictionary)."""
    if not config.splice.enabled:
        return StageNeeds("evaluate")
    a, f32 = len(config.lora.ranks), 4
    tokens = -(-config.splice.batch_size // batch_split) * config.data.max_length  # per device
    log_probs = tokens * cfg.vocab_size * f32 * (1 + 2 * a)
    replaced = tokens * a * cfg.d_model * f32 * len(SPLICES)
    saes = (2 * a + 1) * _sae_bytes(cfg.d_model, config.sae.resolved_width(cfg.d_model), config)
    return StageNeeds("evaluate", device=weights + log_probs + replaced + saes,
                      device_what="the base weights, one splice batch's log-probs and the SAEs",
                      device_parts=(("weights", weights), ("log-probs (one batch)", log_probs),
                                    ("spliced residuals", replaced), ("SAEs", saes)))


def _analysis_needs(config: StudyConfig, d_model: int, width: int) -> StageNeeds:
    seeds = len(config.sae.seeds)
    per_layer = 1 + len(config.lora.ranks) * seeds + (seeds if trains_base_saes(config) else 0)
    loaded = per_layer * _sae_bytes(d_model, width, config)
    what = f"{per_layer} SAEs of width {width:,} (one layer's)"
    return StageNeeds("analysis", device=loaded, host=loaded, device_what=what, host_what=what)


def this_machine(config: StudyConfig, *, devices: bool = True) -> Machine:
    """Device memory (per device; CPU devices share the host's), host memory (the cgroup limit if lower) and
    free disk where the run writes; each from `config.resources` where set. `devices=False` leaves the
    accelerators unopened (device fields unknown)."""
    r = config.resources
    host = _gib_bytes(r.host_memory_gib) or _physical_memory()
    where = _existing_ancestor(config.run_dir)
    disk = _gib_bytes(r.disk_gib) or shutil.disk_usage(where).free
    if not devices:
        return Machine(0, None, host, disk, where)
    local = jax.local_devices()
    stats = local[0].memory_stats() if local[0].platform != "cpu" else None
    cpu_share = host // len(local) if host is not None and local[0].platform == "cpu" else None  # one RAM
    device = _gib_bytes(r.device_memory_gib) or (stats or {}).get("bytes_limit") or cpu_share
    return Machine(len(stage_devices() or jax.devices()), device, host, disk, where)  # what a stage's mesh spans


def check_resources(config: StudyConfig, stages: Iterable[str]) -> None:
    """Refuses, before anything is loaded, a run whose `stages` cannot fit this machine: the largest device
    and host need of any of them, and the disk all their outputs take together, against `this_machine`."""
    stages = list(stages)
    if not config.resources.check or not stages:
        return
    machine = this_machine(config)
    problems = _device_problems(config, stages, machine.n_devices, machine.device)
    needs = [n for s, n in stage_needs(config, machine.n_devices).items() if s in stages]
    if needs and machine.host is not None:
        peak = max(needs, key=lambda n: n.host)
        if peak.host > machine.host:
            problems.append(f"stage {peak.stage} needs at least {_gib(peak.host)} of host memory for "
                            f"{peak.host_what}, but this machine has {_gib(machine.host)}"
                            + _what_fits(config, peak.stage, "host", machine.host, machine.n_devices))
    disk = sum(n.disk for n in needs)
    if needs and machine.disk is not None and disk > machine.disk:
        biggest = max(needs, key=lambda n: n.disk)
        problems.append(f"stages {', '.join(n.stage for n in needs if n.disk)} write {_gib(disk)} (most: "
                        f"{biggest.disk_what}, {_gib(biggest.disk)}) but {machine.disk_path} has {_gib(machine.disk)} "
                        "free" + _what_fits(config, biggest.stage, "disk", machine.disk - (disk - biggest.disk),
                                            machine.n_devices))
    if problems:
        raise ResourceError("this run does not fit this machine: " + "; ".join(problems) + ". Nothing was "
                            "started. Set resources.check=false to try anyway (or resources.device_memory_gib / "
                            "host_memory_gib / disk_gib where the detected sizes are wrong)")


def _device_problems(config: StudyConfig, stages: Iterable[str] | None, n_devices: int,
                     capacity: int | None) -> list[str]:
    """Why `stages` (None: every stage) do not fit `n_devices` devices of `capacity` bytes each on the config's
    mesh (empty: they fit, or the capacity is unknown), each with what would fit."""
    cfg, _ = planned_model_config(config)
    try:
        mesh = mesh_sizes(config, cfg, n_devices, capacity)
    except ValueError as e:  # an auto mesh with no fsdp that fits, or sizes that do not match the devices
        return [str(e)]
    all_needs = stage_needs(config, n_devices, mesh)
    stages = list(all_needs) if stages is None else list(stages)
    needs = [n for s, n in all_needs.items() if s in stages]
    if capacity is None or not needs:
        return []
    peak = max(needs, key=lambda n: n.device)
    if peak.device <= capacity:
        return []
    return [f"stage {peak.stage} needs at least {_gib(peak.device)} per device ({n_devices} device(s)) for "
            f"{peak.device_what} on the mesh {_mesh_text(mesh)}, but this machine has {_gib(capacity)}"
            + _what_fits(config, peak.stage, "device", capacity, n_devices, None if mesh_is_auto(config) else mesh)
            + _mesh_that_fits(config, stages, n_devices, capacity)]


def _mesh_text(mesh: dict[str, int]) -> str:
    return ",".join(f"{axis}={mesh[axis]}" for axis in MESH_AXES)


def _mesh_that_fits(config: StudyConfig, stages: Iterable[str], n_devices: int, capacity: int) -> str:
    """A hint: the first mesh over `n_devices` on which every stage fits (least tensor parallelism, then fewest
    weight shards: the layouts with the least communication first)."""
    stages = list(stages)
    divisors = [f for f in range(1, n_devices + 1) if n_devices % f == 0]
    for model, fsdp in ((m, f) for m in divisors for f in divisors if n_devices % (m * f) == 0):
        mesh = {"data": n_devices // (model * fsdp), "fsdp": fsdp, "model": model}
        if all(n.device <= capacity for s, n in stage_needs(config, n_devices, mesh).items() if s in stages):
            return f"; the mesh {_mesh_text(mesh)} would fit"
    return f"; no mesh of {n_devices} device(s) fits every stage: use more devices or shrink the largest stage"


def _what_fits(config: StudyConfig, stage: str, kind: str, capacity: int, n_devices: int,
               sae_layout: dict[str, int] | None = None) -> str:
    """A hint at a setting that would fit `capacity`: the largest SAE width for the SAE stages (their needs are
    linear in the width), the largest token budget for the corpus disk."""
    if capacity <= 0:
        return ""
    cfg, _ = planned_model_config(config)
    if stage in ("saes", "analysis"):
        need = (lambda w: getattr(_sae_needs(config, cfg.d_model, w, n_devices, sae_layout), kind)) \
            if stage == "saes" else (lambda w: getattr(_analysis_needs(config, cfg.d_model, w), kind))
        slope = need(2) - need(1)
        width = (capacity - (need(1) - slope)) // slope if slope > 0 else 0
        return (f"; an SAE width of at most {width:,} would fit (or fewer SAEs, a smaller sae.batch_size)" if width > 0
                else "; no SAE width fits with these SAE counts")
    if stage == "evaluate":
        return "; its log-probs grow with splice.batch_size: lower it (1 holds one prompt's) or add fsdp devices"
    if stage == "corpus" and kind == "disk":
        tokens, _ = planned_tokens(config)
        per_token = corpus_size_bytes(config, tokens, cfg.d_model) / max(tokens, 1)
        return (f"; an extract.token_budget of at most {int(capacity // per_token):,} would fit, or point "
                "extract.store at a larger disk")
    return ""


def _gib_bytes(gib: float | None) -> int | None:
    return None if gib is None else int(gib * 2**30)


def _physical_memory() -> int | None:
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    try:  # a container's limit (cgroup v2), when it is below the machine's
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


# ---- what a command runs on ------------------------------------------------------------------------

CPU_WARN_BYTES = 2**30
"""Weights above which running on CPU is almost certainly a mistake (the 2B model is 5 GiB in bf16)."""


def device_summary(config: StudyConfig) -> tuple[str, str | None]:
    """One line for the log: backend, device kind and count, process index / count and the mesh the model
    stages resolve; and a warning when the backend is CPU but the model is a real Gemma-2 (the "GPU user with
    the CPU jaxlib" case), else None. Opens the devices."""
    devices = jax.devices()
    cfg, _ = planned_model_config(config)
    try:  # the mesh a stage runs on: this process's devices in a job of several (`stage_devices`)
        mesh = _mesh_text(mesh_sizes(config, cfg, len(stage_devices() or devices), this_machine(config).device))
    except ValueError as e:
        mesh = f"unresolved ({e})"
    line = (f"backend {jax.default_backend()}, {len(devices)} x {devices[0].device_kind} "
            f"({jax.local_device_count()} local), process {jax.process_index()} of {jax.process_count()}, "
            f"mesh {mesh}")
    weights = weight_bytes(cfg, config)
    warning = None
    if jax.default_backend() == "cpu" and weights > CPU_WARN_BYTES:
        warning = (f"the backend is CPU but the model's weights are {_gib(weights)}: this will be very slow. On a "
                   "GPU install the CUDA jaxlib (pip install -e . \"jax[cuda12]\"), on a TPU VM \"jax[tpu]\"; check "
                   "with python -c 'import jax; print(jax.devices())'")
    return line, warning
