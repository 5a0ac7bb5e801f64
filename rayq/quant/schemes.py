"""The candidate quantization schemes and what each costs in bytes."""

from __future__ import annotations

from dataclasses import dataclass

from rayq.quant.weights import INT4_WEIGHTS, INT8_WEIGHTS, WeightFormat

SCALE_BYTES = 4  # scales are float32 whatever the model's dtype


@dataclass(frozen=True)
class Scheme:
    """A candidate scheme: a weight format and whether layer inputs are quantized too."""

    name: str
    weights: WeightFormat
    quantize_input: bool
    # Lower ranks are more compressed; the plan tries schemes in rank order.
    rank: int

    def weight_bytes(self, rows: int, columns: int) -> int:
        codes = self.weights.code_bytes(rows, columns)
        return codes + rows * self.weights.scale_count(columns) * SCALE_BYTES

    def extra_bytes(self) -> int:
        """Bytes stored per layer besides the weights: the input scale and zero point."""
        return 8 if self.quantize_input else 0


SCHEMES: dict[str, Scheme] = {
    "int4": Scheme("int4", INT4_WEIGHTS, quantize_input=False, rank=0),
    "w8a8": Scheme("w8a8", INT8_WEIGHTS, quantize_input=True, rank=1),
    "int8": Scheme("int8", INT8_WEIGHTS, quantize_input=False, rank=2),
}

FLOAT = "float"


def by_compression(names: list[str] | tuple[str, ...]) -> list[Scheme]:
    """Return the named schemes, most compressed first."""
    return sorted((SCHEMES[n] for n in names), key=lambda s: s.rank)
