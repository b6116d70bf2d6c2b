"""Dataset layer: PushT replay buffers and robomimic files -> padded windows -> normalized tensors.

Import the submodules themselves: only `replay_buffer` (and `info`, which describes zarr files) imports zarr,
so the training path on an hdf5 dataset, the samplers and the benchmark run without it (the GPU machine).
"""
