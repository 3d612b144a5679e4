"""Logical axis names -> device mesh axes: the one table that decides how tensors are laid out.

Model code names each array axis logically (`"embed"`, `"mlp"`, ...); this module maps those names onto
the physical mesh (`data`, `fsdp`, `model`) so changing the parallelism layout never touches model code.
It also holds the `mesh` config section (`MeshConfig`): a stage gets its mesh from `config.mesh.build(...)`,
places weights with `place`, host batches with `put`, and runs its jitted step inside `mesh_context(mesh)`
so that the model's `constrain` calls lay out the activations.

The three mesh axes: `data` splits the batch; `fsdp` splits the batch too and additionally the weights'
`embed` axis (fully sharded data parallelism: weights all-gathered per use, never stored whole); `model`
splits heads, MLP width and vocabulary (tensor parallelism).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from lgeo_jax.config import Section, field, greater, section

MESH_AXES = ("data", "fsdp", "model")
MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class LogicalAxisRules:
    """Ordered (logical name, mesh axis / axes / None) pairs; the first rule naming an axis decides it.

    A logical axis may map to several mesh axes (the batch: `data` and `fsdp`); mesh axes of size 1, absent
    from the mesh, or already used by an earlier axis of the same array are skipped.
    """

    rules: tuple[tuple[str, MeshAxes], ...] = (
        ("batch", ("data", "fsdp")),
        ("vocab", "model"),
        ("embed", "fsdp"),
        ("heads", "model"),
        ("kv_heads", "model"),
        ("head_dim", None),
        ("mlp", "model"),
        ("layers", None),
        ("adapters", None),
        ("rank", None),
        ("sae", "model"),
    )

    def spec(self, logical_axes: Sequence[str | None], mesh: Mesh | AbstractMesh) -> PartitionSpec:
        """PartitionSpec for an array whose axes carry `logical_axes` (None: an unnamed, replicated axis)."""
        used: set[str] = set()
        out: list[MeshAxes] = []
        for name in logical_axes:
            wanted = next((axes for logical, axes in self.rules if logical == name), None)
            wanted = (wanted,) if isinstance(wanted, str) else (wanted or ())
            chosen = tuple(a for a in wanted if mesh.shape.get(a, 1) > 1 and a not in used)
            used.update(chosen)
            out.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
        return PartitionSpec(*out)

    def sharding(self, logical_axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
        """NamedSharding for an array of `shape`: `spec`, with mesh axes dropped (last first) from any array
        axis they do not divide evenly, down to replication."""
        return NamedSharding(mesh, _divisible(self.spec(logical_axes, mesh), mesh, shape))


def _divisible(spec: PartitionSpec, mesh: Mesh | AbstractMesh, shape: Sequence[int]) -> PartitionSpec:
    """`spec` with mesh axes dropped (last first) from any array axis they do not divide evenly."""
    if len(spec) != len(shape):
        raise ValueError(f"{len(spec)} logical axes for an array of shape {tuple(shape)}")
    out = []
    for size, axes in zip(shape, spec, strict=True):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


DEFAULT_RULES = LogicalAxisRules()


def make_mesh(data: int = 1, fsdp: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, model) mesh over `devices` (all global devices by default); sizes must multiply to their count.

    Over all devices the order comes from `mesh_utils.create_device_mesh` (the physical torus on TPU, `model`
    innermost so tensor-parallel collectives use the nearest links; process-major elsewhere, so hosts split
    along `data`); a caller's own device list keeps its order.
    """
    n_devices = jax.device_count() if devices is None else len(devices)
    if data * fsdp * model != n_devices:
        raise ValueError(f"mesh data*fsdp*model = {data}*{fsdp}*{model} = {data * fsdp * model} does not match "
                         f"the {n_devices} devices available")
    shape = (data, fsdp, model)
    if devices is None:
        return Mesh(mesh_utils.create_device_mesh(shape, allow_split_physical_axes=True), MESH_AXES)
    return Mesh(np.array(list(devices)).reshape(shape), MESH_AXES)


@section
class MeshConfig(Section):
    """The `mesh` section: how the (global) devices are split into `data` x `fsdp` x `model`.

    Each size is a positive integer or `auto` (null also means auto). Auto fills in what the given sizes
    leave: all remaining devices go to `data` (pure data parallelism), except that when the weights do not
    fit one device (`build`'s `weight_bytes` > `device_bytes`) the fewest devices that make them fit move
    from `data` to `fsdp`. An auto `model` is 1 unless `data` and `fsdp` are both given. The layout changes
    float32 reduction order only, not what is computed, so it is left out of every stage's hash: a run may
    resume on another machine.
    """

    data: int | None = field(None, check=greater(0), affects_results=False)
    fsdp: int | None = field(None, check=greater(0), affects_results=False)
    model: int | None = field(None, check=greater(0), affects_results=False)

    def __post_init__(self):
        for name in MESH_AXES:  # `auto` is the YAML spelling of an unset size
            if getattr(self, name) == "auto":
                object.__setattr__(self, name, None)
        super().__post_init__()

    def sizes(self, n_devices: int, *, weight_bytes: int = 0, device_bytes: int | None = None) -> dict[str, int]:
        """The resolved {data, fsdp, model} sizes for `n_devices` (no device is touched).

        weight_bytes: the model's weights in their stored dtype; device_bytes: what one device may spend on
        its share of them (the caller's budget, after activations and optimizer state); None = no limit.
        """
        given = {a: getattr(self, a) for a in MESH_AXES if getattr(self, a) is not None}
        fixed = math.prod(given.values())
        shown = ", ".join(f"{a}={v}" for a, v in given.items())
        if len(given) == 3:
            if fixed != n_devices:
                raise ValueError(f"mesh {shown}: data*fsdp*model = {fixed}, but there are {n_devices} devices; "
                                 "make the sizes multiply to the device count or set one to auto")
            return given
        if n_devices % fixed:
            raise ValueError(f"mesh {shown}: the given sizes multiply to {fixed}, which does not divide the "
                             f"{n_devices} devices")
        free = n_devices // fixed
        if "data" in given and "fsdp" in given:
            return {**given, "model": free}
        if "data" in given or "fsdp" in given:  # the other one of the two takes every remaining device
            return {a: given.get(a, free if a != "model" else 1) for a in MESH_AXES}
        model = given.get("model", 1)
        for fsdp in (f for f in range(1, free + 1) if free % f == 0):
            if device_bytes is None or weight_bytes / (fsdp * model) <= device_bytes:
                return {"data": free // fsdp, "fsdp": fsdp, "model": model}
        raise ValueError(f"mesh {shown or 'auto'}: the weights ({weight_bytes / 2**30:.2f} GiB) do not fit "
                         f"{device_bytes / 2**30:.2f} GiB per device even sharded over all {free * model} "
                         "devices (fsdp x model); add devices or store the weights in a narrower dtype")

    def build(self, *, weight_bytes: int = 0, device_bytes: int | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
        """The stage's mesh over `devices` (default: every device of every process); see `sizes`."""
        n_devices = jax.device_count() if devices is None else len(devices)
        return make_mesh(**self.sizes(n_devices, weight_bytes=weight_bytes, device_bytes=device_bytes),
                         devices=devices)


# ---- placing arrays ------------------------------------------------------------------------------


def mesh_of(tree: Any) -> Mesh:
    """The mesh `tree`'s arrays live on: the one mesh of its `NamedSharding` arrays, or, when none is placed
    on a mesh, a one-device mesh of the single device holding them all (a model that was never placed)."""
    arrays = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
    meshes = {x.sharding.mesh for x in arrays if isinstance(x.sharding, NamedSharding)}
    devices = {d for x in arrays for d in x.devices()}
    if len(meshes) == 1:
        return meshes.pop()
    if not meshes and len(devices) == 1:
        return make_mesh(devices=list(devices))
    raise ValueError(f"arrays on {len(meshes)} meshes and {len(devices)} devices: place them on one mesh "
                     "(`lgeo_jax.sharding.place`) or pass the mesh to use")


def put(x: Any, logical_axes: Sequence[str | None], mesh: Mesh, rules: LogicalAxisRules = DEFAULT_RULES) -> jax.Array:
    """`x` laid out on `mesh` as its `logical_axes` say (committed there). A device array already laid out so
    keeps its buffers (`device_put` reuses them: a 9B model on one device is never duplicated). A host (numpy)
    array is read slice by slice for the local devices only, so every process may pass the same global array
    without a cross-host check."""
    sharding = rules.sharding(logical_axes, mesh, np.shape(x))
    if isinstance(x, jax.Array):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of `mesh` (what every process can read back, e.g. a step's losses)."""
    return NamedSharding(mesh, PartitionSpec())


def place(module: Any, mesh: Mesh | None, rules: LogicalAxisRules = DEFAULT_RULES) -> Any:
    """An NNX module with every variable placed on `mesh` by its `logical_axes` metadata (`put`); the module
    itself when `mesh` is None. Fails naming the variable when one carries no axes."""
    if mesh is None:
        return module
    graphdef, state = nnx.split(module)

    def one(path, var):
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            raise ValueError(f"{type(module).__name__}.{'.'.join(map(str, path))} has no logical_axes metadata; "
                             "annotate it where it is created")
        return var.replace(value=put(var.get_value(), axes, mesh, rules))

    return nnx.merge(graphdef, nnx.map_state(one, state))


def mesh_context(mesh: Mesh):
    """The context a jitted call runs in so that the model's `constrain` calls lay activations out on `mesh`.
    Only the abstract mesh is set (the devices come from the placed arguments), so it also works while a
    caller is already tracing, e.g. `residuals` under `jax.make_jaxpr`, where `jax.set_mesh` is refused."""
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: LogicalAxisRules = DEFAULT_RULES) -> jax.Array:
    """Inside jit: `x` laid out as `logical_axes` say on the mesh in context (`mesh_context`); outside any
    mesh context it is returned unchanged, so model code runs the same without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = _divisible(rules.spec(logical_axes, mesh), mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, spec)
