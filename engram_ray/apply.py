"""``apply``: turn a committed run into an edited model on disk.

HF models (``model.path``) become an HF directory (config, tokenizer, safetensors) written
tensor by tensor (``export.py``); factory models become ``OUT/model.safetensors`` holding the
edited state dict. The model comes from the run's own config unless given explicitly, and an
``s3://`` output is written locally first and uploaded once complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence

from engram_ray.core.edit import apply_edit, plan_edit
from engram_ray.io.storage import Storage
from engram_ray.io.store import open_run
from engram_ray.models.loading import ModelSpec, build_empty, load_model, model_dir, tied_aliases

__all__ = ["apply_run", "run_model_spec"]


def run_model_spec(run, model: str | None = None) -> ModelSpec:
    """The model a run was extracted from (``model`` overrides: a directory or URI)."""
    if model is not None:
        return ModelSpec(path=model)
    spec = (run.info.get("config") or {}).get("model")
    if not spec:
        raise ValueError(f"run {run.uri} does not record its model; pass --model")
    return ModelSpec.from_dict(spec)


def apply_run(
    run_uri: str,
    forget: Sequence[str],
    *,
    alpha: float = 1.0,
    scale: str = "uniform",
    modules=None,
    out: str,
    model: str | None = None,
    storage_options=None,
) -> str:
    """Write the model with ``forget`` edited out of it to ``out``; returns ``out``."""
    run = open_run(run_uri, storage_options)
    spec = run_model_spec(run, model)
    plan = plan_edit(run, forget or [], alpha=alpha, scale=scale, modules=modules)
    dest = Storage(out, storage_options)
    remote = dest.remote
    local_out = os.path.join(tempfile.mkdtemp(prefix="engram-apply-"), "model") if remote else out
    if spec.path is not None:
        from engram_ray.io.export import write_edited_checkpoint

        src = model_dir(spec.path, storage_options)
        aliases = tied_aliases(build_empty(spec, storage_options))
        write_edited_checkpoint(src, local_out, plan, aliases)
    else:
        from safetensors.torch import save_file

        net = load_model(spec, storage_options)
        apply_edit(net, plan)
        state, seen = {}, set()
        for k, v in net.state_dict().items():
            if v.data_ptr() in seen:  # tied tensors are stored once, like HF does
                continue
            seen.add(v.data_ptr())
            state[k] = v.contiguous()
        if os.path.exists(local_out) and os.listdir(local_out):
            raise FileExistsError(f"output directory {out} exists and is not empty")
        os.makedirs(local_out, exist_ok=True)
        tmp = os.path.join(local_out, "model.safetensors.partial")
        save_file(state, tmp)
        os.replace(tmp, os.path.join(local_out, "model.safetensors"))  # complete, or absent
    if remote:
        dest.fs.put(local_out + "/", dest.root, recursive=True)
        shutil.rmtree(os.path.dirname(local_out), ignore_errors=True)
    return out
