"""Helpers shared by the serve tests and the serving benchmark: synthetic artifacts and a server process.

- `random_lock`: a SafetyLock of the right shape with random unit directions, folded into o_proj biases from
  the checkpoint's own weights (guard.lock.fold_biases) — a stand-in until the real lock is built.
- `add_stand_in_gate`: a prompt gate for the conditional lock that separates two given prompt sets.
- `random_lora`: a peft-format LoRA adapter written directly as safetensors. Small B = a benign adapter
  (anchor drift far below threshold); large B = a "harmful" stand-in whose anchor drift is far above the
  fail threshold (no harmful training data involved).
- `GuardServer`: starts `guard serve ...` (or plain vLLM) in its own process group on 127.0.0.1, waits for
  /health, and kills the whole group on stop (no leftovers).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from guard.artifacts import read_json


def _o_proj_weights(model_dir: Path, layers: list[int]) -> dict[int, Any]:
    from safetensors import safe_open

    out: dict[int, Any] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                for i in layers:
                    if key.endswith(f"layers.{i}.self_attn.o_proj.weight"):
                        out[i] = st.get_tensor(key).float()
    return out


def random_lock(model_dir: Path, out: Path, heads: int = 12, strength: float = 6.0, seed: int = 0,
                fingerprint: str | None = None) -> Path:
    """A SafetyLock with random directions on `heads` random heads, each shifted by `strength`."""
    import torch

    from guard.lock import LockHead, SafetyLock, fold_biases
    from guard.models import ModelShape, fingerprint_dir

    shape = ModelShape.from_config(read_json(model_dir / "config.json"))
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(shape.num_layers * shape.num_heads, generator=g)[:heads].tolist()
    chosen = tuple(LockHead(layer=p // shape.num_heads, head=p % shape.num_heads, accuracy=0.5, strength=strength)
                   for p in sorted(picks))
    directions = torch.randn(len(chosen), shape.head_dim, generator=g)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    weights = _o_proj_weights(model_dir, sorted({h.layer for h in chosen}))
    biases = fold_biases(chosen, directions, shape, weights)
    lock = SafetyLock(chosen, directions, biases, shape, fingerprint or fingerprint_dir(model_dir), alpha=strength,
                      meta={"note": "random directions (test stand-in)"})
    return lock.save(out)


def add_stand_in_gate(lock_path: Path, model_dir: Path, flag: list[str], keep: list[str], layer: int,
                      dev: list[str] | None = None) -> Path:
    """Give a lock file a prompt gate that flags the `flag` prompts and not the `keep` ones on this model (HF,
    fp32): weight = mean state difference at `layer`, bias at the midpoint of the two groups' scores. A stand-in
    with a wide margin, so bf16 and fp32 engines decide alike. `dev`: calibration prompts carried in the gate,
    with their mean HF score as `dev_mean` (what `guard lock build` stores)."""
    import torch

    from guard.lock import PromptGate, load_lock
    from guard.models import load_causal_lm
    from training.lockgate import layer_states

    model, tok = load_causal_lm(model_dir, "float32")
    a = layer_states(model, tok, flag, [layer])[:, 0]
    b = layer_states(model, tok, keep, [layer])[:, 0]
    w = a.mean(0) - b.mean(0)
    w = w / w.norm()
    lo, hi = float((b @ w).max()), float((a @ w).min())
    if not lo < hi:
        raise ValueError("the stand-in gate cannot separate these prompts at this layer")
    lock = load_lock(lock_path)
    meta: dict = {"note": "stand-in: mean difference of two prompt sets", "max_fpr": 0.02}
    if dev:
        meta["dev_prompts"] = list(dev)
        meta["dev_mean"] = float((layer_states(model, tok, dev, [layer])[:, 0] @ w).mean()) - (lo + hi) / 2
    lock.gate = PromptGate(layer, w, -(lo + hi) / 2, 0.0, meta=meta)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return lock.save(lock_path)


def random_lora(model_dir: Path, out: Path, rank: int = 8, b_std: float = 1e-3, seed: int = 0,
                targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj"), hidden: int | None = None) -> Path:
    """A peft LoRA adapter dir with random A and B ~ N(0, b_std). `hidden` overrides the base's size (a
    deliberately incompatible adapter for error tests)."""
    import torch
    from safetensors.torch import save_file

    cfg = read_json(model_dir / "config.json")
    h = hidden or int(cfg["hidden_size"])
    heads, kv = int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    hd = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    dims = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(int(cfg["num_hidden_layers"])):
        for t in targets:
            d_in, d_out = dims[t]
            key = f"base_model.model.model.layers.{layer}.self_attn.{t}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * b_std
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": list(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "base_model_name_or_path": str(model_dir),
    }, indent=2))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 120.0) -> tuple[int, Any]:
    """(status, parsed JSON or text) without raising on 4xx/5xx."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


_LIVE: set[GuardServer] = set()  # started and not yet stopped: stopped at exit, SIGTERM included


def _stop_live() -> None:
    for srv in list(_LIVE):
        srv.stop()


def _exit_on_sigterm() -> None:
    """A bench killed with SIGTERM (a queue stopped, a session ending) would leave its servers' process groups
    running, each holding cores and gigabytes; as SystemExit, `with`/`finally` blocks and atexit stop them."""
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


atexit.register(_stop_live)


class GuardServer:
    """One server process group: `guard serve` args (guarded) or a plain vLLM argv (unguarded)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, port: int | None = None,
                 log_path: Path | None = None) -> None:
        self.port = port
        self.argv = argv
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @classmethod
    def guarded(cls, port: int, *guard_args: str, env: dict[str, str] | None = None,
                log_path: Path | None = None) -> GuardServer:
        guard = str(Path(sys.executable).parent / "guard")
        return cls([guard, "serve", "--port", str(port), *guard_args], env, port, log_path)

    @classmethod
    def plain(cls, port: int, model_dir: Path, *vllm_args: str, eager: bool = True,
              log_path: Path | None = None) -> GuardServer:
        argv = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model_dir),
                "--served-model-name", model_dir.name, "--host", "127.0.0.1", "--port", str(port),
                "--max-model-len", "512", *(["--enforce-eager"] if eager else []), *vllm_args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAFETY_GUARD")}
        return cls(argv, {**env, "VLLM_PLUGINS": ""}, port, log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> GuardServer:
        if self.proc is not None and self.proc.poll() is None:
            return self  # already running: a second start would orphan the first process group
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        _exit_on_sigterm()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        _LIVE.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()  # its engine and worker processes may outlive the API server
                raise RuntimeError(f"server exited with {code}; log: {self.log_path}")
            try:
                if http("GET", self.url + "/health", timeout=2)[0] == 200:
                    return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout} s; log: {self.log_path}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        finally:
            try:  # children that ignored SIGTERM
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc = None
            _LIVE.discard(self)

    def __enter__(self) -> GuardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- OpenAI calls ----------------------------------------------------------------------------------
    def chat(self, model: str, prompt: str, max_tokens: int = 24, **kw: Any) -> str:
        status, body = http("POST", self.url + "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, **kw})
        if status != 200:
            raise RuntimeError(f"chat failed ({status}): {body}")
        return body["choices"][0]["message"]["content"]
