"""Models from the Hugging Face Hub, for users with internet or with models already downloaded.

A model is looked for first in the local Hub cache, where `huggingface_hub` and `transformers`
keep what they downloaded ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub:
`models--owner--name/refs/<revision>` names a commit, `snapshots/<commit>/` holds its files).
Otherwise it is downloaded: by `huggingface_hub` when installed, else over plain HTTPS from
$HF_ENDPOINT (https://huggingface.co), with the token from $HF_TOKEN (or the file `huggingface-cli
login` writes), resuming a file whose download broke off, with a progress bar per file, and every
shard a `model.safetensors.index.json` names.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from lmforge.errors import LmforgeError

# what a model needs: config, tokenizer, chat template, generation defaults, the image
# preprocessing of a vision-language model, and the weights
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json")
PATTERNS = FILES + ("*.safetensors", "model.safetensors.index.json")


def wanted(name: str) -> bool:
    return "/" not in name and any(fnmatch.fnmatch(name, p) for p in PATTERNS)


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return _hf_home() / "hub"


def cached_snapshot(model_id: str, revision: str = "main") -> Path | None:
    """The folder of `model_id` at `revision` (a branch, tag or commit) in the local Hub cache,
    when it holds a complete model."""
    repo = hub_cache() / f"models--{model_id.replace('/', '--')}"
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = repo / "snapshots" / commit
    return snap if complete(snap) else None


def complete(folder: Path) -> bool:
    """A config and all the weights: one safetensors file, or every shard its index names."""
    if not (folder / "config.json").is_file():
        return False
    if (folder / "model.safetensors").is_file():
        return True
    index = folder / "model.safetensors.index.json"
    return index.is_file() and all((folder / s).is_file() for s in shards(index))


def shards(index: Path) -> list[str]:
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


def link_snapshot(snap: Path, dest: Path) -> None:
    """The snapshot's files in `dest`, as links to the cache's own copies (no second copy of the
    weights); copies where links cannot be made."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in snap.iterdir():
        if not wanted(f.name):
            continue
        target, out = f.resolve(), dest / f.name
        out.unlink(missing_ok=True)
        try:
            out.symlink_to(target)
        except OSError:
            shutil.copyfile(target, out)


def token() -> str | None:
    tok = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if tok:
        return tok.strip()
    saved = _hf_home() / "token"
    return saved.read_text().strip() if saved.is_file() else None


def download(url: str, dest: Path, auth: str | None = None, progress: bool = True) -> None:
    """`url` into `dest` by way of `dest.part`, continuing a part left by a broken download."""
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "lmforge"}
    if auth:
        headers["Authorization"] = f"Bearer {auth}"
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        r = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing past what we have: the part is the whole file
            part.replace(dest)
            return
        raise
    with r:
        if have and r.status != 206:  # the server ignored the range: start over
            have = 0
        total = int(r.headers.get("Content-Length") or 0) + have
        with open(part, "ab" if have else "wb") as f, tqdm(total=total or None, initial=have, unit="B", unit_scale=True,
                                                           desc=dest.name, disable=not progress) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    part.replace(dest)


def http_pull(model_id: str, revision: str, dest: Path, progress: bool = True) -> None:
    """The model's files over plain HTTPS (without huggingface_hub)."""
    base = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{model_id}/resolve/{revision}/"
    auth = token()
    dest.mkdir(parents=True, exist_ok=True)

    def get(name: str, optional: bool = False) -> bool:
        if (dest / name).is_file():
            return True
        try:
            download(base + name, dest / name, auth, progress)
            return True
        except urllib.error.HTTPError as e:
            if e.code == 404 and optional:
                return False
            if e.code in (401, 403):
                raise LmforgeError(f"{model_id}: the Hub refused access (HTTP {e.code}); set HF_TOKEN to a token "
                                   "that can read it") from None
            raise

    for name in FILES:
        get(name, optional=name != "config.json")
    if not get("model.safetensors", optional=True):
        get("model.safetensors.index.json")
        for shard in shards(dest / "model.safetensors.index.json"):
            get(shard)


def hub_downloader():
    """huggingface_hub's snapshot_download when it is installed, else None (plain HTTPS then)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    return snapshot_download


def pull_hf(model_id: str, dest: Path, revision: str = "main", force: bool = False, progress: bool = True) -> Path:
    """`model_id` at `revision` in `dest`: from the local Hub cache, else downloaded."""
    if complete(dest) and not force:
        return dest
    snap = cached_snapshot(model_id, revision)
    if snap is not None:
        print(f"found in the Hugging Face cache: {snap}")
        link_snapshot(snap, dest)
        return dest
    snapshot_download = hub_downloader()
    try:
        if snapshot_download is not None:
            snapshot_download(model_id, revision=revision, local_dir=str(dest), allow_patterns=list(PATTERNS), token=token())
        else:
            http_pull(model_id, revision, dest, progress)
    except (urllib.error.URLError, OSError) as e:
        why = " ".join(str(e).split())  # huggingface_hub's messages run over several lines
        raise LmforgeError(f"could not download {model_id} from the Hugging Face Hub: {why[:300]}") from None
    if not complete(dest):
        raise LmforgeError(f"{model_id}: the download has no config.json or misses weight shards")
    return dest
