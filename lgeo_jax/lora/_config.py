"""The `lora` section: the study's adapters, one per rank, trained together."""

from __future__ import annotations

from collections.abc import Iterator

from lgeo_jax.config import Problem, Section, cross_check, default_of, each, field, greater, nonempty_distinct, section
from lgeo_jax.lora._adapters import AdapterSpec


@section
class LoraConfig(Section):
    """One adapter per rank; alpha = alpha_over_rank * r (the paper's 2r: scaling 2 for every rank) or explicit."""

    ranks: tuple[int, ...] = field((4, 8, 16, 32), check=nonempty_distinct(greater(0)))
    alpha_over_rank: float | None = field(2.0, check=greater(0))
    alphas: tuple[float, ...] | None = field(None, check=each(greater(0)))
    # the per-adapter settings every rank shares, with AdapterSpec's own checks
    targets: tuple[str, ...] = default_of(AdapterSpec, "targets", ("q_proj", "k_proj", "v_proj", "o_proj"))
    dropout: float = default_of(AdapterSpec, "dropout", 0.05)
    use_rslora: bool = default_of(AdapterSpec, "use_rslora", False)

    @property
    def names(self) -> tuple[str, ...]:
        """Adapter names in rank order: `r4`, `r8`, ... (directory names in a run, labels in the report)."""
        return tuple(f"r{r}" for r in self.ranks)

    def alpha(self, rank: int) -> float:
        if self.alphas is not None:
            return self.alphas[self.ranks.index(rank)]
        return self.alpha_over_rank * rank

    def adapter_specs(self) -> tuple[AdapterSpec, ...]:
        """The adapters this section describes, in rank order."""
        return tuple(AdapterSpec(rank=r, alpha=self.alpha(r), targets=self.targets, use_rslora=self.use_rslora,
                                 dropout=self.dropout, name=name)
                     for r, name in zip(self.ranks, self.names, strict=True))

    @cross_check("ranks", "alpha_over_rank", "alphas")
    def _alphas(self) -> Iterator[Problem]:
        if (self.alpha_over_rank is None) == (self.alphas is None):
            yield Problem(
                "alphas",
                "set exactly one of lora.alpha_over_rank and lora.alphas "
                f"(got {'both' if self.alphas is not None else 'neither'})",
            )
        elif self.alphas is not None and len(self.alphas) != len(self.ranks):
            yield Problem("alphas", f"expected one alpha per rank ({len(self.ranks)}), got {len(self.alphas)}")

