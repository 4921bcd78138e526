"""mhd-uad: cDDPM + pixel-wise Mahalanobis anomaly detection in brain MRI (Behrendt et al., MICCAI 2024)."""

__version__ = "0.1.0"
