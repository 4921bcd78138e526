"""Scoring: math on arrays only (numpy, scipy, torch): the pixel-wise Mahalanobis distance (mahalanobis),
3-D SSIM (ssim), the anomaly maps of MHD and its baselines (anomaly_maps; in torch on the device:
device_maps) and scipy's filter conventions for torch (filters). No I/O, no models."""
