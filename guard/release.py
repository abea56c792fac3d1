"""A released aligned base: the alignment LoRA as a small file, merged into the original bit-identically on any CPU.

Every result in this project is keyed by the aligned base's fingerprint (reference states, the lock, red-team rows),
and `guard align` trains that base with float GEMMs whose low bits depend on the CPU's kernels (AVX2 vs AVX-512 vs
AMX): the same recipe on two machines gives two bases with two fingerprints. A fleet needs one base on every replica,
and a red-team or stress run needs the base it started on when it resumes elsewhere. So the trained LoRA factors are
kept (bf16, ~10 MB for the default model) and merged by integer-exact-order arithmetic: float64 outer products summed
in rank order (elementwise ops: no reduction whose order a kernel picks), then rounded to bf16 by bit arithmetic.
The same merge runs right after training, so "trained here" and "applied from the release" are the same bytes.

The package bundles the release of the default recipe (`guard/releases/`); `guard align --export DIR` copies the
release of any other recipe trained here (kept beside its base) for the other replicas. A release is the trained
LoRA: `align.delta_scale` merges the same one at another strength, so changing it never retrains.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guard.artifacts import atomic_path, read_json, write_json_atomic
from guard.errors import GuardError

if TYPE_CHECKING:
    import torch

BUNDLED_DIR = Path(__file__).parent / "releases"
RELEASE_FORMAT = 1
_FACTORS = "lora.safetensors"
_META = "release.json"


def bf16_bits_round(x: "torch.Tensor") -> "torch.Tensor":
    """float32 -> bfloat16 by round-to-nearest-even on the bit pattern.

    Done with integer ops so no CPU-specific conversion instruction (which may flush denormals) decides a bit.
    """
    import torch

    bits = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # the unsigned pattern
    top = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    return torch.where(top >= 0x8000, top - 0x10000, top).to(torch.int16).view(torch.bfloat16)


def merge_weight(weight: "torch.Tensor", lora_a: "torch.Tensor", lora_b: "torch.Tensor", scaling: float) -> "torch.Tensor":
    """bf16(W + scaling · B @ A), the same bits on every machine.

    B @ A is built as a float64 sum of rank-1 outer products in rank order (each an elementwise product, exact for
    bf16 factors), so no library kernel chooses a summation order.
    """
    import torch

    a, b = lora_a.to(torch.float64), lora_b.to(torch.float64)
    delta = torch.zeros(weight.shape, dtype=torch.float64)
    for i in range(a.shape[0]):
        delta += torch.outer(b[:, i], a[i, :])
    merged = weight.to(torch.float64) + delta * scaling
    return bf16_bits_round(merged.to(torch.float32))


@dataclass(frozen=True)
class Release:
    """A release dir: `lora.safetensors` (factors `<module>.lora_A` / `.lora_B`, bf16) and `release.json`."""

    path: Path
    meta: dict[str, Any]

    @property
    def key(self) -> str:
        return str(self.meta["key"])

    @property
    def original_fingerprint(self) -> str:
        return str(self.meta["original_fingerprint"])

    @classmethod
    def read(cls, path: str | Path) -> "Release":
        p = Path(path).expanduser()
        if not (p / _META).is_file() or not (p / _FACTORS).is_file():
            raise GuardError(f"not an aligned-base release (needs {_META} and {_FACTORS}): {p}")
        meta = read_json(p / _META, "aligned-base release")
        if meta.get("format") != RELEASE_FORMAT:
            raise GuardError(f"aligned-base release {p} has format {meta.get('format')}, this version reads "
                             f"{RELEASE_FORMAT}")
        return cls(p, meta)

    def factors(self) -> dict[str, "torch.Tensor"]:
        from safetensors.torch import load_file

        return load_file(str(self.path / _FACTORS))

    def apply(self, original: Path, out: Path, scale: float = 1.0, key: str | None = None) -> Path:
        """Write the aligned base to `out` (atomically): the original's files with the LoRA merged into its weights,
        its delta multiplied by `scale` (`align.delta_scale`; the merged base's metadata then carries `key`, the
        base's own key, instead of the release's)."""
        meta = self.meta if scale == 1.0 and key is None else {**self.meta, "key": key or self.key, "delta_scale": scale}
        return write_merged(original, out, self.factors(), float(self.meta["scaling"]) * scale, meta)


def bundled(key: str) -> Release | None:
    """The release bundled with the package whose key is `key`, if any."""
    if not BUNDLED_DIR.is_dir():
        return None
    for d in sorted(BUNDLED_DIR.iterdir()):
        if (d / _META).is_file():
            rel = Release.read(d)
            if rel.key == key:
                return rel
    return None


def _check_bf16(factors: dict[str, "torch.Tensor"]) -> None:
    """A release and the base trained beside it must merge the same bf16 factors: the caller rounds them once
    (`bf16_bits_round`) and hands the same tensors to `write_release` and `write_merged`."""
    import torch

    wrong = sorted(k for k, v in factors.items() if v.dtype != torch.bfloat16)
    if wrong:
        raise ValueError(f"{len(wrong)} LoRA factors are not bfloat16 (e.g. {wrong[0]}); round them with bf16_bits_round")


def write_release(out: Path, factors: dict[str, "torch.Tensor"], scaling: float, meta: dict[str, Any]) -> Path:
    """Write a release dir atomically; `factors` are already bf16 (what every merge uses)."""
    from safetensors.torch import save_file

    _check_bf16(factors)
    with atomic_path(Path(out)) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(dict(sorted(factors.items())), str(tmp / _FACTORS))
        write_json_atomic(tmp / _META, {**meta, "format": RELEASE_FORMAT, "scaling": scaling})
    return Path(out)


def write_merged(original: Path, out: Path, factors: dict[str, "torch.Tensor"], scaling: float,
                 meta: dict[str, Any], meta_name: str = "guard_align.json") -> Path:
    """The original's weights with every `<module>.lora_A/B` pair merged into `<module>.weight`; other files copied."""
    from safetensors.torch import load_file, save_file

    _check_bf16(factors)
    files = sorted(Path(original).glob("*.safetensors"))
    if not files:
        raise GuardError(f"no safetensors weights in the original model dir {original}")
    modules = {k.rsplit(".", 1)[0] for k in factors}
    done: set[str] = set()
    with atomic_path(Path(out)) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        for f in files:
            state = load_file(str(f))
            for name in list(state):
                mod = name.removesuffix(".weight")
                if name.endswith(".weight") and mod in modules:
                    state[name] = merge_weight(state[name], factors[f"{mod}.lora_A"], factors[f"{mod}.lora_B"], scaling)
                    done.add(mod)
            save_file(state, str(tmp / f.name), metadata={"format": "pt"})
        missing = modules - done
        if missing:
            raise GuardError(f"{len(missing)} LoRA modules have no weight in {original}, e.g. {sorted(missing)[0]}: "
                             "the release was made for another model")
        for f in sorted(Path(original).iterdir()):  # config, tokenizer, chat template: unchanged
            if f.is_file() and f.suffix != ".safetensors" and not f.name.startswith((".", "guard_")):
                shutil.copy2(f, tmp / f.name)
        write_json_atomic(tmp / meta_name, meta)
    return Path(out)


def describe(rel: Release) -> str:
    m = rel.meta
    return (f"release {rel.path.name}: trained in {m.get('seconds', 0) / 60:.1f} min on {m.get('machine', '?')} "
            f"at {str(m.get('commit', '?'))[:7]}")
