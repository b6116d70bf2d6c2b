"""A policy server on openpi's websocket protocol (`pcm serve`), and the robot side that talks to it.

- `wire`: openpi-client's msgpack encoding of numpy arrays (no pickle), both directions
- `frames`: what one request frame may hold (the per-step observation keys), checked key by key
- `session`: one connection's observation history and noise generator
- `served`: the policy behind the server: checkpoint, sampler (its backend), metadata, one batched chunk call
- `batcher`: the inference worker: requests pending together sampled in one call, under their deadline
- `server`: the websockets server (metadata on connect, API key, error text frames, clean shutdown)
- `client`: a small client speaking only the documented protocol; `remote`: rollouts with actions from a server
- `load`: timed request loops against a server (`pcm serve-bench`); `timing`: what a robot measures per request
"""
