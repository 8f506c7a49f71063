"""Reading a whole recording back from a shard, for tests that check what a job wrote."""
from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa

from transforms.shards import SCHEMA, Segment, read_segments

ARRAY_COLUMNS = [f.name for f in SCHEMA if f.type == pa.binary()]  # timestamps, frames, face_found, ...


def read_recording(uri: str, fs: fsspec.AbstractFileSystem, recording_id: str | None = None) -> Segment:
    """One recording's segments joined into one Segment (copies: the whole recording is in memory).

    recording_id: which recording, when the shard holds more than one. The result carries the first
    segment's index (0) and start_frame; raises ValueError if segments are missing or out of order.
    """
    segments = [s for s in read_segments(uri, fs) if recording_id is None or s.recording_id == recording_id]
    if not segments:
        raise ValueError(f"{uri}: no segments" + (f" of {recording_id}" if recording_id else ""))
    if len({s.recording_id for s in segments}) > 1:
        raise ValueError(f"{uri} holds several recordings: pass recording_id")
    if segments[0].segment_index != 0:
        raise ValueError(f"{uri}: the recording's first segment is missing")
    for prev, seg in zip(segments, segments[1:]):
        if seg.segment_index != prev.segment_index + 1 or seg.start_frame != prev.start_frame + prev.n_frames:
            raise ValueError(f"{uri}: segment {seg.segment_index} does not follow segment {prev.segment_index}")
    joined = {name: None if getattr(segments[0], name) is None else np.concatenate([getattr(s, name) for s in segments])
              for name in ARRAY_COLUMNS}
    return segments[0]._replace(n_frames=sum(s.n_frames for s in segments), **joined)
