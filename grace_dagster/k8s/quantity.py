"""Kubernetes resource quantities ("500m", "32Gi", "1e3") as exact numbers.

The policy compares limits with requests and per-pod totals with the NRP thresholds; float arithmetic would make
"limits within 20% of requests" flip on rounding, so quantities are parsed into `Decimal`s.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
}
# The exponent form needs digits after the e/E, so a lone trailing "E" stays the exa suffix.
_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]))?$")

GIB = Decimal(2**30)


class QuantityError(ValueError):
    """A resource quantity that Kubernetes would refuse."""


def parse_quantity(value: str | int | float) -> Decimal:
    """Return the quantity in base units (cores for CPU, bytes for memory and storage)."""
    if isinstance(value, bool):
        raise QuantityError(f"not a quantity: {value!r}")
    if isinstance(value, int | float):
        return Decimal(str(value))
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise QuantityError(f"not a Kubernetes quantity: {value!r}")
    number, exponent, suffix = match.groups()
    try:
        base = Decimal(number)
        if exponent:
            return base * Decimal(10) ** int(exponent[1:])
    except InvalidOperation as e:  # pragma: no cover - the regex admits only valid decimals
        raise QuantityError(f"not a Kubernetes quantity: {value!r}") from e
    suffix = suffix or ""
    if suffix in _BINARY:
        return base * _BINARY[suffix]
    return base * _DECIMAL[suffix]


def format_cpu(cores: float) -> str:
    """Whole cores as "4", fractions as millicores ("1500m"), so the rendered text is stable."""
    millis = round(Decimal(str(cores)) * 1000)
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def format_gib(gib: float) -> str:
    """Whole GiB as "16Gi", fractions in MiB ("1536Mi")."""
    mib = round(Decimal(str(gib)) * 1024)
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def describe(resource: str, amount: Decimal) -> str:
    """A human reading of an amount: memory and storage in GiB, everything else as a plain number."""
    if resource in ("memory", "ephemeral-storage", "storage"):
        return f"{(amount / GIB).normalize():f}Gi"
    return f"{amount.normalize():f}"
