"""Logical axis names -> device mesh axes: the one table that decides how tensors are laid out.

Model code names each array axis logically (`"embed"`, `"mlp"`, ...); this module maps those names onto
the physical mesh (`data`, `fsdp`, `model`) so changing the parallelism layout never touches model code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class LogicalAxisRules:
    """Ordered (logical name, mesh axis or None) pairs; the first rule whose mesh axis is free wins."""

    rules: tuple[tuple[str, str | None], ...] = (
        ("batch", "data"),
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

    def spec(self, logical_axes: Sequence[str | None], mesh: Mesh) -> PartitionSpec:
        """PartitionSpec for an array whose axes carry `logical_axes`; mesh axes of size 1 or used are skipped."""
        used: set[str] = set()
        out = []
        for name in logical_axes:
            choice = None
            for logical, mesh_axis in self.rules:
                if logical == name and mesh_axis is not None and mesh_axis in mesh.shape:
                    if mesh_axis not in used and mesh.shape[mesh_axis] > 1:
                        choice = mesh_axis
                        used.add(mesh_axis)
                    break
            out.append(choice)
        return PartitionSpec(*out)

    def sharding(self, logical_axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
        """NamedSharding that falls back to replication on axes the mesh does not divide evenly."""
        spec = list(self.spec(logical_axes, mesh))
        for i, axis in enumerate(spec):
            if axis is not None and shape[i] % mesh.shape[axis]:
                spec[i] = None
        return NamedSharding(mesh, PartitionSpec(*spec))


DEFAULT_RULES = LogicalAxisRules()


def make_mesh(data: int = 1, fsdp: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, model) mesh over `devices` (all devices by default); sizes must multiply to their count."""
    devices = list(jax.devices() if devices is None else devices)
    if data * fsdp * model != len(devices):
        raise ValueError(f"mesh data*fsdp*model = {data}*{fsdp}*{model} = {data * fsdp * model} does not match "
                         f"the {len(devices)} devices available")
    return Mesh(np.array(devices).reshape(data, fsdp, model), ("data", "fsdp", "model"))
