"""Scoring: math on arrays only (numpy, scipy, torch): the pixel-wise Mahalanobis distance (mahalanobis),
3-D SSIM (ssim) and the anomaly maps of MHD and its baselines (anomaly_maps). No I/O, no models."""
