"""`Workspace`: the one place that answers "which base, which original, which reference states, which lock".

Every command, trainer, server and bench asks it instead of rebuilding paths from the data dir. Precedence is
the same everywhere: an explicit argument > an environment override > the config > what `guard prepare` made
under the data dir (`~/.cache/safety-guard`, or $SAFETY_GUARD_HOME), keyed by fingerprints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from guard.config import GuardConfig
from guard.errors import GuardError
from guard.lock import lock_path
from guard.models import check_model_dir, default_aligned_dir, default_original_dir, fingerprint_dir

LOCK_ENV = "SAFETY_GUARD_LOCK"


@dataclass
class Workspace:
    cfg: GuardConfig = field(default_factory=GuardConfig)

    @cached_property
    def home(self) -> Path:
        return self.cfg.runtime.resolved_home()

    # -- models --------------------------------------------------------------------------------------
    def base(self) -> Path:
        """The aligned base: `model.base`, else the one `guard prepare` made (GuardError if neither exists)."""
        if self.cfg.model.base:
            return check_model_dir(self.cfg.model.base, "aligned base model")
        d = default_aligned_dir(self.home)
        if not (d / "config.json").is_file():
            raise GuardError(f"the aligned base is not prepared ({d}): run `guard prepare` first")
        return d

    def base_target(self) -> Path:
        """Where the aligned base is or will be (for `guard align`, which makes it)."""
        return Path(self.cfg.model.base).expanduser() if self.cfg.model.base else default_aligned_dir(self.home)

    def original(self) -> Path:
        """The unaligned original: `model.original`, else the converted default model."""
        d = Path(self.cfg.model.original).expanduser() if self.cfg.model.original else default_original_dir(self.home)
        return check_model_dir(d, "original (unaligned) model")

    @cached_property
    def base_fingerprint(self) -> str:
        return fingerprint_dir(self.base())

    def load_aligned(self, dtype: str | None = None) -> tuple[Any, Any, str]:
        """(model, tokenizer, fingerprint) of the aligned base."""
        from guard.models import load_causal_lm

        model, tok = load_causal_lm(self.base(), dtype or self.cfg.model.dtype)
        return model, tok, self.base_fingerprint

    # -- artifacts keyed by the base -----------------------------------------------------------------
    def references_path(self, anchors_hash: str, fingerprint: str | None = None) -> Path:
        from guard.states import reference_path

        return reference_path(self.home, fingerprint or self.base_fingerprint, anchors_hash)

    def references(self, model: Any, tokenizer: Any, anchors: Any, fingerprint: str | None = None) -> Any:
        """The anchors' reference states on the base (cached; computed on a miss with `model`)."""
        from guard.states import cached_reference

        return cached_reference(model, tokenizer, anchors, fingerprint or self.base_fingerprint, self.home)

    def base_refusal_ratio_path(self, anchors_hash: str, fingerprint: str | None = None) -> Path:
        """Where the base's own refusal ratio on the anchors is cached: beside their reference states."""
        return self.references_path(anchors_hash, fingerprint).with_suffix(".refusals.json")

    def base_refusal_ratio(self, model: Any, tokenizer: Any, anchors: Any, fingerprint: str | None = None) -> float:
        """The base's own refusal ratio on `anchors` (cached; computed on a miss with `model`)."""
        from guard.vetting import base_refusal_ratio

        path = self.base_refusal_ratio_path(anchors.hash, fingerprint)
        return base_refusal_ratio(model, tokenizer, anchors, self.cfg.drift.probe_tokens, path)

    def prepared_lock(self, fingerprint: str | None = None) -> Path:
        """Where `guard prepare` / `guard lock build` keep the lock of the base with `fingerprint` (default: the
        configured base), whether or not it was built yet."""
        return lock_path(self.home, fingerprint or self.base_fingerprint)

    def lock_file(self, explicit: str | os.PathLike[str] | None = None,
                  fingerprint: str | None = None) -> tuple[Path | None, bool]:
        """(lock path, chosen explicitly). `explicit` > $SAFETY_GUARD_LOCK > config lock.path > the prepared
        lock of the base with `fingerprint` (default: the configured base; "" = unknown, no prepared lock).
        Explicit paths need not exist yet (the caller reports a missing file); the prepared one is returned
        whether or not it was built."""
        for chosen in (explicit, os.environ.get(LOCK_ENV), self.cfg.lock.path):
            if chosen:
                return Path(chosen).expanduser(), True
        try:
            fp = fingerprint if fingerprint is not None else self.base_fingerprint
        except GuardError:
            return None, False
        return (self.prepared_lock(fp), False) if fp else (None, False)
