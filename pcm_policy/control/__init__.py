"""Real-time control: an action queue executed at control frequency while the next chunk is computed."""
from pcm_policy.control.controller import ChunkRecord, Controller, ControllerConfig, EpisodeLog

__all__ = ["ChunkRecord", "Controller", "ControllerConfig", "EpisodeLog"]
