"""Share a run on the Hugging Face Hub: adapter, merged model and/or GGUF, with a model card.

    python -m lib push --run demo --repo user/name [--private] [--dry-run] [--include adapter,merged,gguf]

    from lib.ship.push import run_push
    folder = run_push("demo", "user/name", dry_run=True)   # outputs/demo/push/: exactly what would be uploaded

The folder `outputs/<run>/push/` is built first and uploaded as it is (huggingface_hub
`upload_folder`): the merged model at the top (so `from_pretrained("user/name")` loads it), the
adapter in `adapter/`, the GGUF files, Modelfile and parity.json of export/ at the top, and a
README.md model card stating the base model, the data hash, the configuration, the eval figures,
the merge check and the parity figures. Files are hard-linked where possible (no second copy of
a large model). The token comes from the environment, a `.env` file or Colab secrets
(`lib.run.realmodel.hf_token`) and is passed to huggingface_hub only, never written anywhere.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from lib.run.config import load_config
from lib.run.errors import ConfigError, MissingStageError, SFTError, first_line
from lib.run.paths import run_paths
from lib.run.realmodel import hf_token
from lib.run.rundir import (
    check_result,
    check_trained,
    install,
    is_pending,
    read_manifest,
    remove_leftovers,
    run_lock,
    staging,
)
from lib.run.stages import stage as stage_named
from lib.train.modelcard import model_card

PARTS = ("adapter", "merged", "gguf")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class PushError(SFTError):
    """The upload to the Hub failed (no token, offline, refused)."""


def available_parts(paths) -> dict[str, list[Path]]:
    """Which of adapter, merged, gguf the run has, with the files each contributes."""
    out = {}
    if (paths.adapter / "adapter_config.json").exists():
        out["adapter"] = [p for p in paths.adapter.iterdir() if p.is_file()]
    if (paths.merged / "config.json").exists():
        out["merged"] = [p for p in paths.merged.iterdir() if p.is_file()]
    ggufs = sorted(paths.export.glob("*.gguf")) if paths.export.is_dir() else []
    if ggufs:
        out["gguf"] = ggufs + [p for p in (paths.export / "Modelfile", paths.parity) if p.exists()]
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# The stage whose results each part is, for the intactness and freshness checks.
PART_STAGE = {"adapter": "train", "merged": "merge", "gguf": "export"}


def _checked_sources(paths, wanted: list[str], have: dict) -> dict:
    """Each wanted part complete (its stage not interrupted), intact (every recorded file hashed) and fresh
    all the way up (a GGUF of a merge of an earlier adapter is stale); returns the fingerprints push
    records as its inputs. A merged model or export is reduced to the files its manifest records (never
    a GGUF of another quantization left in export/ by an earlier export)."""
    sources = {}
    for part in wanted:
        name = PART_STAGE[part]
        if name == "train":
            check_trained(paths)  # the adapter's files parse
        sources[name] = check_result(paths, name)
        recorded = (read_manifest(paths, name) or {}).get("outputs")
        if name != "train" and recorded is not None:
            have[part] = [paths.root / rel for rel in sorted(recorded)]
    return sources


def build_folder(run: str, repo: str, include=None) -> Path:
    """Build outputs/<run>/push/: exactly the files that are uploaded, under the run's lock, from results
    checked intact and fresh, installed with a manifest like every stage's."""
    paths = run_paths(run)
    with run_lock(paths, "push"):
        cfg = load_config(paths.config)
        have = available_parts(paths)
        # a part whose stage is being installed (or was killed installing) is refused below, never left out
        wanted = list(include) if include else [p for p in PARTS if p in have or is_pending(paths, PART_STAGE[p])]
        unknown = [p for p in wanted if p not in PARTS]
        if unknown:
            raise ConfigError(f"push --include: unknown part(s) {', '.join(unknown)} (choose from {', '.join(PARTS)})")
        for part in wanted:
            read_manifest(paths, PART_STAGE[part])  # RunDirError naming the stage to rerun if interrupted
        missing = [p for p in wanted if p not in have]
        if missing or not wanted:
            first = PART_STAGE[missing[0] if missing else "adapter"]
            raise MissingStageError(f"{paths.root}: nothing to push for '{missing[0] if missing else 'adapter'}': "
                                    f"{stage_named(first).first(run)}")
        # staging folders of a killed push, and the old push/ of one killed while swapping it in
        remove_leftovers(paths.root, r"\.push-\w{8}|\.push-old(-\d+)?")
        sources = _checked_sources(paths, wanted, have)
        with staging(paths.root, ".push-") as tmp:
            for part in wanted:
                for f in have[part]:
                    if not f.name.endswith(".tmp"):
                        _link_or_copy(f, tmp / ("adapter" if part == "adapter" else "") / f.name)
            (tmp / "README.md").write_text(model_card(cfg, paths, wanted).replace("REPO", repo), encoding="utf-8")
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            install(paths, "push", {paths.push: tmp}, [f"{paths.push.name}/{f}" for f in files], sources)
    return paths.push


def run_push(run: str, repo: str, private: bool = False, dry_run: bool = False, include=None) -> Path:
    """Entry point of `python -m lib push` and notebook 06: stage the folder, then upload it (unless dry_run)."""
    if not isinstance(repo, str) or not _REPO.match(repo):
        raise ConfigError(f"--repo: '{repo}' is not a Hub repository id of the form user/name")
    folder = build_folder(run, repo, include)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    if dry_run:
        print(f"dry run: {len(files)} files in {folder} would be uploaded to {repo}: {_grouped(files)}")
        return folder
    token = hf_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN in the environment or a .env file, or add a Colab "
                        "secret named HF_TOKEN (a token with write access)")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                 commit_message=f"Upload {run} (qlora-notebooks)")
    except Exception as e:  # offline, refused, no write access: one line, whatever the transport raised
        raise PushError(f"upload to {repo} failed: {type(e).__name__}: {first_line(e)[:300]}") from None
    print(f"pushed {len(files)} files to https://huggingface.co/{repo} ({getattr(info, 'commit_url', '')})")
    return folder


def _grouped(files: list[str]) -> str:
    """'README.md, adapter/ (6 files), merged/ (5 files)': a folder's files counted, not listed one by one."""
    groups: dict[str, int] = {}
    for f in files:
        top = f.split("/", 1)[0] + "/" if "/" in f else f
        groups[top] = groups.get(top, 0) + 1
    return ", ".join(g if not g.endswith("/") else f"{g} ({n} file{'s' if n > 1 else ''})" for g, n in groups.items())
