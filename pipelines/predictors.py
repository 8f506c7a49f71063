"""Streaming BVP predictors over 30 fps face crops: ME-rPPG (chunk, flow) and the GREEN/CHROM/POS baselines.

Every predictor takes crops block by block (`push`) and returns the whole recording's BVP at `finish`, so
a video of any length passes in memory bounded by one chunk of crops plus one float per frame. Frames
without a face enter the model as zeros (as in the published implementation) and their BVP is zeroed.
"""
from __future__ import annotations

import numpy as np

from transforms.baselines import BASELINES, rgb_means

FPS = 30.0
ME_NAMES = ("me-chunk", "me-flow")
MODEL_NAMES = ME_NAMES + tuple(BASELINES)


class ModelSet:
    """Models loaded once for a whole run; `predictors()` gives fresh per-recording state.

    names: model names, ME-rPPG ones optionally with their weights as `me-chunk:pure` (rlap, pure or a
    path; default `weights`). Each distinct set of ME weights is read once, however many modes use it.
    """

    def __init__(self, names, weights: str = "rlap"):
        self.names = tuple(names)
        if not self.names:
            raise ValueError(f"no model given; choose from {', '.join(MODEL_NAMES)}")
        self._specs = {name: self._parse(name, weights) for name in self.names}
        self._me = {}
        for kind, w in self._specs.values():
            if kind in ME_NAMES and w not in self._me:
                import model

                self._me[w] = model.load("me-rppg", weights=w)

    @staticmethod
    def _parse(name: str, weights: str) -> tuple[str, str | None]:
        kind, _, w = name.partition(":")
        if kind not in MODEL_NAMES or (w and kind not in ME_NAMES):
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)} "
                             "(ME-rPPG as me-chunk:WEIGHTS with rlap, pure or a path)")
        return kind, (w or weights) if kind in ME_NAMES else None

    def predictors(self) -> dict:
        """{name: predictor} with fresh state, for one recording."""
        return {name: self._make(*self._specs[name]) for name in self.names}

    def _make(self, kind: str, weights: str | None):
        if kind == "me-chunk":
            return MEChunkPredictor(self._me[weights])
        if kind == "me-flow":
            return MEFlowPredictor(self._me[weights])
        return BaselinePredictor(kind)


class MEChunkPredictor:
    """ME-rPPG chunk mode: 160-frame chunks through the jitted network, state carried between them."""

    def __init__(self, me):
        import model

        self._apply = model.apply_chunk
        self._me = me
        self._chunk = me.cfg.chunk
        self._state = me.initial_state
        self._pending: list[np.ndarray] = []
        self._pending_found: list[np.ndarray] = []
        self._out: list[tuple] = []  # (BVP on the device, face_found) per chunk

    def push(self, crops: np.ndarray, face_found: np.ndarray) -> None:
        self._pending.append(np.where(face_found[:, None, None, None], crops, 0).astype(np.uint8))
        self._pending_found.append(face_found)
        n = sum(len(p) for p in self._pending)
        if n >= self._chunk:
            frames, found = np.concatenate(self._pending), np.concatenate(self._pending_found)
            full = n - n % self._chunk
            self._run(frames[:full], found[:full])
            self._pending, self._pending_found = [frames[full:]], [found[full:]]

    def _run(self, frames: np.ndarray, found: np.ndarray) -> None:
        # one chunk per call keeps a single compiled shape whatever the video length; the result stays
        # on the device until finish(), so JAX's async dispatch overlaps the model with decoding
        for s in range(0, len(frames), self._chunk):
            bvp, self._state = self._apply(self._me.params, frames[s : s + self._chunk], self._state)
            self._out.append((bvp, found[s : s + self._chunk]))

    def finish(self) -> np.ndarray:
        frames = np.concatenate(self._pending) if self._pending else np.zeros((0, 36, 36, 3), np.uint8)
        n = len(frames)
        if n:
            # Pad the tail to a whole chunk by repeating its last frame, exactly as apply_chunk pads a
            # partial chunk itself, so the tail reuses the one compiled shape instead of compiling anew.
            padded = np.concatenate([frames, np.repeat(frames[-1:], self._chunk - n, axis=0)])
            bvp, _ = self._apply(self._me.params, padded, self._state)
            self._out.append((bvp[:n], np.concatenate(self._pending_found)))
        self._pending, self._pending_found = [], []
        return np.concatenate([np.asarray(b, np.float64) * f for b, f in self._out]) if self._out else np.zeros(0)


class MEFlowPredictor:
    """ME-rPPG flow mode: one frame per call, constant state, as a real-time client would run it."""

    def __init__(self, me):
        import model

        self._step = model.flow_step
        self._me = me
        self._state = me.initial_state
        self._out: list = []  # BVP per frame, left on the device until finish() (no sync per frame)
        self._found: list[np.ndarray] = []

    def push(self, crops: np.ndarray, face_found: np.ndarray) -> None:
        for crop, found in zip(crops, face_found):
            bvp, self._state = self._step(self._me.params, crop if found else np.zeros_like(crop), self._state, 1.0 / FPS)
            self._out.append(bvp)
        self._found.append(face_found)

    def finish(self) -> np.ndarray:
        if not self._out:
            return np.zeros(0)
        return np.asarray([np.asarray(b).reshape(-1)[0] for b in self._out], np.float64) * np.concatenate(self._found)


class BaselinePredictor:
    """GREEN, CHROM or POS on the spatial mean colour of each face crop."""

    def __init__(self, name: str):
        self._method = BASELINES[name]
        self._means: list[np.ndarray] = []

    def push(self, crops: np.ndarray, face_found: np.ndarray) -> None:
        self._means.append(rgb_means(crops, face_found))

    def finish(self) -> np.ndarray:
        if not self._means:
            return np.zeros(0)
        return self._method(np.concatenate(self._means), FPS)
