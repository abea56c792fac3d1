"""The fine-tuning methods `guard harden` offers, registered once: `sft` (no regularizer), `sbr`, `asft`.

A method is its loss term and the config fields it reads. Each module below defines its term class and
registers a `Method`: how to build the term from a `MethodInputs` (the base, the anchors and their reference
states, the original model when the method needs it) and which config field is its λ. The loss is
CE + term(model); the term already carries λ (`training/trainer.py: optimizer_step` adds it once per step).

    from training import methods
    term = methods.get("sbr").build(inputs)       # None for sft
    lam = methods.get(cfg.harden.method).lam(cfg.harden)      # the configured λ (None for sft)
    field = methods.get("sbr").lam_field                      # "sbr_lambda": the config key --lambda sets
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guard.config import HardenConfig
from guard.errors import GuardError


@dataclass
class MethodInputs:
    """What a method may need to build its term; built once before training."""

    h: HardenConfig
    model: Any  # the frozen base (before LoRA is added)
    tokenizer: Any
    anchors: Any = None  # the *probe* anchors (guard.anchors.AnchorSet): drift reports, their system prompt
    reference: Any = None  # guard.states.ReferenceStates of the probe anchors on the base
    base: Path | None = None
    original: Path | None = None  # the unaligned original (AsFT only)


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[MethodInputs], Any]  # -> a term `term(model) -> (loss, logs)`, or None
    lam_field: str | None  # the `harden` config key holding the method's λ (None: no regularizer)
    needs_original: bool = False
    summary: str = ""

    def lam(self, h: HardenConfig) -> float | None:
        """The method's λ as configured."""
        return None if self.lam_field is None else float(getattr(h, self.lam_field))


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise GuardError(f"method '{method.name}' is registered twice")
    _REGISTRY[method.name] = method
    return method


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise GuardError(f"unknown method '{name}' (choose from {', '.join(_REGISTRY)})") from None


register(Method("sft", build=lambda _: None, lam_field=None, summary="plain LoRA fine-tuning, no regularizer"))

from training.methods import sbr  # noqa: E402,F401  (each registers itself, in this order)
from training.methods import asft  # noqa: E402,F401
