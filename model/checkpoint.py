"""Training checkpoints: the whole train state in one file, written atomically, read back bit-identical.

    save_checkpoint(uri, fs, state, meta)          # state: a pytree of arrays (params, optimiser, step, rng)
    state, meta = load_checkpoint(uri, fs, like)   # like: a state of the same structure (eval_shape is enough)
    meta = checkpoint_meta(uri, fs)                # the meta alone

The file is an .npz: one array per leaf of the state in `jax.tree.flatten` order, and the JSON `meta`
(data position, config and data hashes, ...). It appears under its name only once complete (temp name,
then rename), so a run killed while writing keeps its previous checkpoint. PRNG keys are stored as their
key data and wrapped again on reading.
"""
from __future__ import annotations

import io
import json

import jax
import numpy as np

from transforms.shards import atomic_file

_META = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the state it is read into; str names the file and the leaf."""


def _is_key(leaf) -> bool:
    return jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key)


def save_checkpoint(uri: str, fs, state, meta: dict) -> None:
    """Write `state` (any pytree of arrays) and the JSON-able `meta` to `uri`, atomically."""
    leaves = jax.tree.leaves(state)
    arrays = {f"{i:05d}": np.asarray(jax.random.key_data(a) if _is_key(a) else a) for i, a in enumerate(leaves)}
    arrays[_META] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # uncompressed: parameters do not compress, and reads stay fast
    with atomic_file(uri, fs) as f:
        f.write(buffer.getvalue())


def checkpoint_meta(uri: str, fs) -> dict:
    """The `meta` of the checkpoint at `uri`, without its arrays."""
    with fs.open(uri, "rb") as f, np.load(f) as stored:
        return _meta(stored)


def _meta(stored) -> dict:
    return json.loads(bytes(stored[_META]).decode())


def load_checkpoint(uri: str, fs, like):
    """(state, meta) from `uri`, the state built in the structure of `like`; CheckpointError if the file's
    leaves differ from `like`'s in number, shape or dtype."""
    with fs.open(uri, "rb") as f:
        stored = np.load(io.BytesIO(f.read()))
    meta = _meta(stored)
    template, treedef = jax.tree.flatten(like)
    names = sorted(k for k in stored.files if k != _META)
    if len(names) != len(template):
        raise CheckpointError(f"{uri}: holds {len(names)} arrays, the train state has {len(template)}")
    leaves = []
    for name, want in zip(names, template):
        got = stored[name]
        if _is_key(want):
            leaves.append(jax.random.wrap_key_data(got, impl=jax.random.key_impl(want)))
            continue
        if got.shape != tuple(want.shape) or got.dtype != want.dtype:
            raise CheckpointError(f"{uri}: array {name} is {got.dtype} {got.shape}, the train state wants "
                                  f"{want.dtype} {tuple(want.shape)}")
        leaves.append(got)
    return jax.tree.unflatten(treedef, leaves), meta
