"""Scoring: math on arrays only (numpy, scipy, torch): the pixel-wise Mahalanobis distance (mahalanobis),
3-D SSIM (ssim), the anomaly maps of MHD and its baselines (anomaly_maps; in torch on the device:
device_maps), scipy's filter conventions for torch (filters) and how faithfully the mean reconstruction keeps
a healthy scan (fidelity). No I/O, no models."""
