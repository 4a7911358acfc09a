"""INT8 calibration from real 4-step LCM trajectories (planned; no recipe is shipped yet)."""
