"""Who the lock steers, as pure data: the API server's authoritative lock table (no vLLM, no torch).

Names, not LoRA ids: an operator says "lock adapter acme"; the table resolves names to vLLM's LoRA ids only
when it is pushed to the workers (`worker_args`), so an adapter named in the config before it is loaded is
steered from the moment it loads. The served base model's name stands for requests without an adapter.

Precedence per adapter: forced by vetting (policy `lock`) > explicit override > default. Under the
`conditional` policy the default is gated (steered only once the lock's prompt gate flags a request); forced
and explicitly set adapters are steered unconditionally.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from guard.errors import GuardError
from guard.lock import check_strength


@dataclass
class LockTable:
    base_name: str
    strength: float = 1.0  # default strength used when something is switched on without one
    default_on: bool = False
    overrides: dict[str, float] = field(default_factory=dict)  # name -> strength (0 = explicitly off)
    forced: dict[str, str] = field(default_factory=dict)  # name -> why vetting forced the lock on
    conditional: bool = False  # the default is gated by the lock's prompt gate
    request_lock: bool = True  # requests may ask for the lock on themselves
    # the prompt gate's threshold per name, calibrated on that adapter (lock.gate_calibration); None: calibration
    # failed, so its gated requests are steered unconditionally (fail closed)
    thresholds: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def from_config(cls, serve_cfg: object, base_name: str, strength: float = 1.0) -> LockTable:
        policy = getattr(serve_cfg, "lock_policy")
        table = cls(base_name=base_name, strength=check_strength(strength), default_on=policy in ("all", "conditional"),
                    conditional=policy == "conditional", request_lock=bool(getattr(serve_cfg, "request_lock", True)))
        if policy == "adapters":
            for name in getattr(serve_cfg, "lock_adapters"):
                table.overrides[name] = table.strength
        return table

    def strength_of(self, name: str) -> float:
        if name in self.forced:
            s = self.overrides.get(name, 0.0)
            return s if s > 0 else (self.strength or 1.0)
        if name in self.overrides:
            return self.overrides[name]
        return self.strength if self.default_on else 0.0

    def set(self, adapter: str | None, enabled: bool | None, strength: float | None) -> None:
        """One change from POST /guard/lock. adapter None = the default for everything not overridden."""
        if strength is not None:
            strength = check_strength(strength)
        if adapter is None:
            if strength is not None:
                old = self.strength
                self.strength = strength
                # explicit per-adapter strengths that followed the default keep following it
                self.overrides = {k: (strength if v == old and v > 0 else v) for k, v in self.overrides.items()}
            if enabled is not None:
                self.default_on = enabled
            return
        if enabled is False and adapter in self.forced:
            raise GuardError(f"the lock on adapter '{adapter}' was forced on by vetting ({self.forced[adapter]}); "
                             f"unload the adapter instead")
        current = self.strength_of(adapter)
        if enabled is False:
            self.overrides[adapter] = 0.0
        elif enabled is True:
            self.overrides[adapter] = strength if strength is not None else (current or self.strength)
        elif strength is not None:
            self.overrides[adapter] = strength

    def force(self, adapter: str, reason: str) -> None:
        self.forced[adapter] = reason

    def forget(self, adapter: str) -> None:
        """An unloaded adapter: its forced lock, its override and its gate threshold go (a reload is vetted and
        calibrated afresh)."""
        self.forced.pop(adapter, None)
        self.overrides.pop(adapter, None)
        self.thresholds.pop(adapter, None)

    def uncalibrated(self, names: list[str]) -> list[str]:
        """The names with no calibrated gate threshold (never calibrated, or a calibration that failed): what
        switching the gate to read each adapter's own states has to calibrate. A threshold stays valid until the
        lock changes (cleared) or its adapter is unloaded (`forget`)."""
        return [n for n in names if self.thresholds.get(n) is None]

    def strengths(self, names: list[str]) -> dict[str, float]:
        """Effective strength of the base model and each named adapter."""
        return {n: self.strength_of(n) for n in [self.base_name, *names]}

    def gated(self, name: str) -> bool:
        """Is this adapter's steering left to the prompt gate (conditional policy, default strength, and, when
        calibration is on, a calibrated threshold)?"""
        return (self.conditional and self.default_on and name not in self.forced and name not in self.overrides
                and not (name in self.thresholds and self.thresholds[name] is None))

    def worker_args(self, lora_ids: dict[str, int]) -> dict[str, object]:
        """The keyword arguments of GuardWorkerExtension.guard_set_lock: default strength, {lora id: strength},
        whether the default is gated, the lora ids steered unconditionally, the strength of requests that
        ask for the lock themselves, and the gate's calibrated threshold per lora id."""
        default = self.strength if self.default_on else 0.0
        overrides: dict[int, float] = {}
        ungated: list[int] = []
        for name, lid in [(self.base_name, 0), *lora_ids.items()]:
            s = self.strength_of(name)
            if s != default:
                overrides[int(lid)] = s
            if self.conditional and not self.gated(name):
                ungated.append(int(lid))
        thresholds = {int(lid): t for name, lid in [(self.base_name, 0), *lora_ids.items()]
                      if (t := self.thresholds.get(name)) is not None}
        return {"default": default, "overrides": overrides, "gated": self.conditional and self.default_on,
                "ungated": ungated, "force_strength": self.strength if self.request_lock else 0.0,
                "thresholds": thresholds}
