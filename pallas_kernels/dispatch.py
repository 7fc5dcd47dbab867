"""The one way every op in `pallas_kernels` chooses its implementation.

Each op's `api.py` declares an `Op`: a table of named implementations (each imported on first use, with a check of
whether it can run in this process) and, per platform, the order in which `implementation=None` tries them.

- `implementation=None` takes the first implementation in the platform's order that is available here and supports
  the call (the op passes a `supports(name)` predicate for call-dependent limits, e.g. "no KV cache"); which one ran
  and why the others were skipped goes to the debug log (`logging.getLogger("pallas_kernels")`).
- An explicit name is strict: unknown, unavailable or unsupported for this call raises a one-line error. It never
  falls back to something else.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import logging
from collections.abc import Callable, Mapping

import jax

log = logging.getLogger("pallas_kernels")

Supports = Callable[[str], str | None]  # implementation name -> None if it can run this call, else the reason


def always_available() -> str | None:
    return None


def on_platform(*platforms: str) -> Callable[[], str | None]:
    """Availability: the default backend is one of `platforms`."""

    def check() -> str | None:
        backend = jax.default_backend()
        return None if backend in platforms else f"needs a {'/'.join(platforms)} backend (this one is {backend})"

    return check


def with_package(package: str, *platforms: str) -> Callable[[], str | None]:
    """Availability: `package` is installed (and, when given, the default backend is one of `platforms`)."""

    def check() -> str | None:
        if platforms and (reason := on_platform(*platforms)()):
            return reason
        return None if importlib.util.find_spec(package) is not None else f"needs the {package!r} package"

    return check


def at_default_precision(available: Callable[[], str | None]) -> Callable[[], str | None]:
    """Availability: `available`, and the default matmul precision. tokamax's kernels raise on any other (e.g.
    jax_default_matmul_precision="highest", as the tests set), so the platform order then moves on to XLA."""

    def check() -> str | None:
        if reason := available():
            return reason
        precision = jax.config.jax_default_matmul_precision
        if precision in (None, "default"):
            return None
        return f"takes the default matmul precision only (jax_default_matmul_precision={precision!r})"

    return check


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One named implementation: `module:function` inside the op's package, fixed keyword arguments, and an
    availability check (None = usable in this process, else the reason)."""

    target: str
    kwargs: Mapping[str, object] = dataclasses.field(default_factory=dict)
    available: Callable[[], str | None] = always_available


class Op:
    """An op's table of implementations and its per-platform default order.

    package: the op's package (e.g. "pallas_kernels.lightning"); implementations: name -> Implementation;
    default_order: platform ("cpu", "gpu", "tpu") -> names tried in order by `implementation=None`.
    """

    def __init__(self, name: str, package: str, implementations: Mapping[str, Implementation],
                 default_order: Mapping[str, tuple[str, ...]]):  # fmt: skip
        for platform, order in default_order.items():
            unknown = set(order) - set(implementations)
            if unknown:
                raise ValueError(f"{name}: default order for {platform} names unknown implementations {unknown}")
        self.name = name
        self.package = package
        self.implementations = dict(implementations)
        self.default_order = dict(default_order)
        self._loaded: dict[str, Callable] = {}

    def names(self) -> tuple[str, ...]:
        return tuple(self.implementations)

    def choices(self) -> tuple[str | None, ...]:
        """The values a config field naming this op's implementation may take (None = the platform's order)."""
        return (None, *self.implementations)

    def unavailable_reason(self, name: str) -> str | None:
        return self.implementations[name].available()

    def select(self, implementation: str | None, supports: Supports | None = None) -> str:
        """The implementation name that runs this call (see the module docstring); raises ValueError if none."""
        if implementation is not None:
            if implementation not in self.implementations:
                raise ValueError(f"{self.name}: unknown implementation {implementation!r}; choose from "
                                 f"{self.names()} or None")  # fmt: skip
            reason = self.unavailable_reason(implementation) or (supports and supports(implementation))
            if reason:
                raise ValueError(f"{self.name}: implementation {implementation!r} cannot run here: {reason}")
            return implementation
        platform = jax.default_backend()
        skipped = []
        for name in self.default_order.get(platform, ()):
            reason = self.unavailable_reason(name) or (supports and supports(name))
            if not reason:
                if skipped:
                    log.debug("%s: using %r on %s (skipped: %s)", self.name, name, platform, "; ".join(skipped))
                else:
                    log.debug("%s: using %r on %s", self.name, name, platform)
                return name
            skipped.append(f"{name}: {reason}")
        raise ValueError(f"{self.name}: no implementation can run this call on {platform} "
                         f"({'; '.join(skipped) or 'none listed for this platform'})")  # fmt: skip

    def function(self, name: str) -> Callable:
        """The callable of implementation `name` (its fixed keyword arguments bound)."""
        if name not in self._loaded:
            implementation = self.implementations[name]
            module, function = implementation.target.split(":")
            fn = getattr(importlib.import_module(f"{self.package}.{module}"), function)
            self._loaded[name] = functools.partial(fn, **implementation.kwargs) if implementation.kwargs else fn
        return self._loaded[name]

    def resolve(self, implementation: str | None, supports: Supports | None = None) -> Callable:
        """`function(select(implementation, supports))`."""
        return self.function(self.select(implementation, supports))

