"""Evaluation: the evaluate stage (evaluate) built on per-volume metrics and their aggregation (metrics),
PR curves (curves) and the gallery (gallery); the `score` command (score); the report stage and
`report --base` (report, compare); offline plots (plots)."""
