"""Closed-loop episodes in the envs: the env an episode runs in, vectorised policy rollouts, the scripted experts'
rollouts, episodes under the real-time controller, and the summary over episodes. The only part of the library
that makes envs (gymnasium and the simulators load here, never on the training or bench path)."""
